"""The GPU training path, checked on CPU around the kernels it calls (issue: packed documents in one
attention call per layer, an optimizer that never JIT-builds, no host syncs in the model).

- The varlen path (flash-attn's or torch's `varlen_attn`, stood in here by an independent reference
  built from a block-diagonal causal mask) equals the per-document SDPA path, forward and gradients,
  and is called exactly once per layer per micro-batch with the collate function's cu_seqlens.
- Both shapes of torch's `varlen_attn` signature get the right call.
- A forward+backward of a packed micro-batch makes no device→host sync in model code.
- The generated DeepSpeed JSON selects fused torch AdamW on CUDA and sizes ZeRO-3's buckets from the
  hidden size; TORCH_CUDA_ARCH_LIST suffixes are removed before DeepSpeed parses them.
- Micro-batches are prefetched in the background without moving the resumable position.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megakor.config import ConfigError, load_config
from megakor.data.blend import BatchIterator, Prefetcher, collate, make_sample
from megakor.model import attention as attn
from megakor.model.args import preset
from megakor.model.llama import Llama


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, **_):
    """Attention over packed [N, heads, D] tensors from a dense block-diagonal causal mask: an independent
    stand-in for a varlen kernel, computed with tensor ops only (no host reads of cu_seqlens)."""
    n = q.shape[0]
    i = torch.arange(n)
    doc = torch.bucketize(i, cu_q[1:].long(), right=True)
    allowed = (i[:, None] >= i[None, :]) & (doc[:, None] == doc[None, :])
    if window_size[0] >= 0:
        allowed &= (i[:, None] - i[None, :]) <= window_size[0]
    if k.shape[1] != q.shape[1]:
        assert enable_gqa, "GQA shapes need enable_gqa on this signature"
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed)
    return out.transpose(0, 1)


def packed_batch(T=48, rows=2, seed=0, vocab=512):
    """Rows of several documents each (what the data layer hands the trainer), collated."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(rows):
        tokens = rng.integers(3, vocab, size=T + 1)
        starts = np.zeros(T + 1, dtype=bool)
        starts[rng.choice(np.arange(1, T), size=4, replace=False)] = True
        samples.append(make_sample(tokens, starts, np.ones(T + 1, dtype=bool)))
    return collate(samples)


def model_and_batch(window=None):
    torch.manual_seed(0)
    args = preset("debug")
    if window:
        import dataclasses

        args = dataclasses.replace(args, sliding_window=window)
    model = Llama(args, loss_chunk_tokens=32)
    model.init_weights(torch.Generator().manual_seed(0))
    # fp64: the two paths sum in different orders, and 1e-6 should measure the paths, not fp32 rounding.
    return model.double(), packed_batch()


def loss_and_grads(model, b, **kw):
    model.zero_grad()
    loss = model(b["input_ids"], b["position_ids"], b["labels"], reduction="sum", **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("window", [None, 8])
def test_varlen_path_equals_per_document_sdpa_and_is_called_once_per_layer(monkeypatch, window):
    model, b = model_and_batch(window)
    want_loss, want_grads = loss_and_grads(model, b)  # per-document SDPA (or the masked path with a window)
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
        calls.append((cu_q, max_q))
        return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size, enable_gqa=enable_gqa)

    monkeypatch.setattr(attn, "torch_varlen_attn", kernel)
    for layer in model.layers.values():
        layer.attention.backend = "varlen"
    loss, grads = loss_and_grads(model, b, cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"])
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert len(calls) == model.args.num_layers  # one call per layer for the whole micro-batch
    assert all(cu is b["cu_seqlens"] and m == b["max_seqlen"] for cu, m in calls)
    assert len(b["cu_seqlens"]) - 1 > b["input_ids"].shape[0]  # the batch really is packed


def test_both_varlen_signatures_get_a_causal_gqa_call(monkeypatch):
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    seen = {}

    def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1)):
        seen["2.11"] = window_size
        key, value = (t.repeat_interleave(2, dim=1) for t in (key, value))  # fewer KV heads, natively
        return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window_size)

    def torch_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        seen["2.12"] = (window_size, enable_gqa)
        return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window_size,
                                enable_gqa=enable_gqa)

    def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        seen["2.10"] = (is_causal, key.shape[1])
        return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0))

    outs = []
    for fn in (torch_2_11, torch_2_12, torch_2_10):
        monkeypatch.setattr(attn, "torch_varlen_attn", fn)
        outs.append(attn._torch_varlen(q, k, v, cu, 7, None))
    assert seen == {"2.11": (-1, 0), "2.12": ((-1, 0), True), "2.10": (True, 4)}
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])
    monkeypatch.setattr(attn, "torch_varlen_attn", torch_2_12)
    attn._torch_varlen(q, k, v, cu, 7, 4)
    assert seen["2.12"] == ((3, 0), True)  # Mistral's window W attends to the W-1 previous tokens
    monkeypatch.setattr(attn, "torch_varlen_attn", torch_2_10)
    with pytest.raises(RuntimeError, match="no sliding window"):
        attn._torch_varlen(q, k, v, cu, 7, 4)


def test_auto_backend_picks_sdpa_on_cpu():
    assert attn.choose_backend("auto", torch.zeros(1)) == "sdpa"


class SyncCounter:
    """Counts Tensor.item / tolist / __bool__ / nonzero calls (each a device→host sync on a GPU)."""

    NAMES = ("item", "tolist", "__bool__", "nonzero")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _name=name, _original=original, **kw):
                self.calls.append(_name)
                return _original(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, wrapped)
        original_nonzero = torch.nonzero

        def nonzero(*a, **kw):
            self.calls.append("torch.nonzero")
            return original_nonzero(*a, **kw)

        monkeypatch.setattr(torch, "nonzero", nonzero)


def test_packed_forward_backward_makes_no_host_sync_in_model_code(monkeypatch):
    model, b = model_and_batch()
    monkeypatch.setattr(attn, "torch_varlen_attn", reference_varlen)
    for layer in model.layers.values():
        layer.attention.backend = "varlen"
    counter = SyncCounter(monkeypatch)
    # Counting starts after the data layer made the metadata: the model gets it from the batch.
    loss = model(b["input_ids"], b["position_ids"], b["labels"], reduction="sum", cu_seqlens=b["cu_seqlens"],
                 max_seqlen=b["max_seqlen"])
    loss.backward()
    assert counter.calls == []
    # The same forward without metadata has to ask the tensors where documents start: the counter sees it.
    model(b["input_ids"], b["position_ids"], b["labels"], reduction="sum")
    assert counter.calls


def test_dynamic_rope_takes_the_longest_document_from_the_host(monkeypatch):
    import dataclasses

    args = dataclasses.replace(preset("debug"), rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                               max_position_embeddings=16)
    rope = attn.RotaryEmbedding(args)
    pos = torch.arange(40).unsqueeze(0)
    want = rope(pos, torch.float32)
    counter = SyncCounter(monkeypatch)
    got = rope(pos, torch.float32, max_seqlen=40)
    assert counter.calls == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _cfg(*overrides):
    return load_config(None, ["train.global_batch=16", "train.micro_batch=2", *overrides])


def test_deepspeed_json_on_cuda_selects_fused_torch_adamw_and_gpu_sized_zero3():
    from megakor.train.engine import deepspeed_config

    ds = deepspeed_config(_cfg(), dp=2, device_type="cuda", hidden_size=2048)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["fused"] is True
    z = ds["zero_optimization"]
    assert z["reduce_bucket_size"] == 2048 ** 2 and z["stage3_prefetch_bucket_size"] == int(0.9 * 2048 ** 2)
    assert z["stage3_param_persistence_threshold"] == 20480 and z["overlap_comm"] is True
    # One data-parallel rank: a partition is the whole parameter, so nothing is gathered per use.
    one = deepspeed_config(_cfg(), dp=1, device_type="cuda", hidden_size=2048)["zero_optimization"]
    assert one["stage3_param_persistence_threshold"] >= 2**40
    # ... unless parameters are offloaded: persistent ones would stay on the GPU.
    off = deepspeed_config(_cfg("parallel.offload_params=true"), 1, "cuda", 2048)["zero_optimization"]
    assert off["stage3_param_persistence_threshold"] == 20480
    # What DeepSpeed's engine makes of the optimizer section: torch.optim.AdamW, fused.
    from deepspeed.runtime.engine import DeepSpeedEngine

    params = dict(ds["optimizer"]["params"])
    cls, extra = DeepSpeedEngine.get_optimizer_configuration(None, params, True)
    opt = cls([torch.nn.Parameter(torch.zeros(2))], **params, **extra)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    # Asked for DeepSpeed's own Adam: no torch_adam, so DeepSpeed builds FusedAdam.
    assert deepspeed_config(_cfg("optim.implementation=deepspeed"), 2, "cuda")["optimizer"]["params"].get("torch_adam") is None
    # A user's DeepSpeed JSON still overrides the generated sizes.
    cpu = deepspeed_config(_cfg(), dp=2, device_type="cpu", hidden_size=2048)
    assert "reduce_bucket_size" not in cpu["zero_optimization"] and "fused" not in cpu["optimizer"]["params"]


def test_user_deepspeed_json_overrides_generated_zero_sizes(tmp_path):
    import json

    from megakor.train.engine import deepspeed_config

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 1234}}))
    ds = deepspeed_config(_cfg(f"deepspeed.config={f}"), 2, "cuda", 2048)
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 1234


def test_cuda_arch_list_suffixes_are_sanitised_for_deepspeed(monkeypatch):
    from megakor.train.engine import prepare_deepspeed_ops, sanitized_cuda_arch_list

    assert sanitized_cuda_arch_list("9.0a;10.0a+PTX") == "9.0;10.0+PTX"
    assert sanitized_cuda_arch_list("8.0 8.6 9.0a") == "8.0 8.6 9.0"
    # DeepSpeed's own JIT builder for FusedAdam fails on the raw list and parses the sanitised one.
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    builder = FusedAdamBuilder()
    builder.jit_mode = True
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a;10.0a+PTX")
    with pytest.raises(ValueError, match="0a"):
        builder.compute_capability_args()
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvcc")
    prepare_deepspeed_ops(_cfg("optim.implementation=deepspeed"), "cuda")
    import os

    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0;10.0+PTX"
    builder.compute_capability_args()
    assert "9.0" in os.environ["TORCH_CUDA_ARCH_LIST"] and "10.0+PTX" in os.environ["TORCH_CUDA_ARCH_LIST"]


def test_deepspeed_adam_without_nvcc_is_one_sentence(monkeypatch):
    from megakor.train.engine import prepare_deepspeed_ops

    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    with pytest.raises(ConfigError, match="lacks; set optim.implementation=torch"):
        prepare_deepspeed_ops(_cfg("optim.implementation=deepspeed"), "cuda")
    prepare_deepspeed_ops(_cfg(), "cuda")  # the default builds nothing


class Counting(torch.utils.data.Dataset):
    def __init__(self):
        self.built = []

    def __getitem__(self, i):
        self.built.append(i)
        pos = torch.arange(4)
        return {"input_ids": torch.full((4,), i), "labels": torch.full((4,), i), "position_ids": pos}


def test_prefetcher_hands_out_the_iterator_batches_and_keeps_the_consumed_position():
    plain = BatchIterator(Counting(), micro_batch=2, global_batch=4, consumed_samples=8)
    want = [next(plain)["input_ids"][:, 0].tolist() for _ in range(6)]
    it = BatchIterator(Counting(), micro_batch=2, global_batch=4, consumed_samples=8)
    feed = Prefetcher(it, depth=4)
    got = [next(feed)["input_ids"][:, 0].tolist() for _ in range(6)]
    assert got == want
    # Samples beyond what was handed out were built, but the position saved is what the trainer took.
    assert it.state_dict() == {"consumed_samples": 8 + 12}
    feed.close()


class Broken(Counting):
    def __getitem__(self, i):
        if i >= 4:
            raise OSError("shard unreadable")
        return super().__getitem__(i)


def test_prefetcher_raises_the_worker_error_on_every_later_call():
    feed = Prefetcher(BatchIterator(Broken(), micro_batch=2, global_batch=2), depth=2)
    next(feed), next(feed)
    for _ in range(2):
        with pytest.raises(OSError, match="shard unreadable"):
            next(feed)
    feed.close()

