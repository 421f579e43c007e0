"""Trainer pieces that need no process group: rank layout, LR schedules, the DeepSpeed JSON and its
conflicts, FLOPs accounting, layout-independent random init, and the evaluation protocol."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megakor.config import ConfigError, load_config
from megakor.parallel import Topology, launch_world_size
from megakor.train.engine import RandomInit, deepspeed_config, train_dtype
from megakor.train.metrics import device_peak_tflops, flops_per_token, matmul_parameters, step_flops, throughput
from megakor.train.schedule import lr_at


# ---- topology ------------------------------------------------------------------------------------

def test_rank_order_matches_deepspeed_pipe_model_data_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    for world, tp, pp in ((8, 2, 2), (8, 4, 1), (12, 2, 3), (4, 1, 4)):
        ours = Topology(world, tp, pp)
        theirs = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
        for rank in range(world):
            c = theirs.get_coord(rank)
            assert ours.coords(rank) == (c.pipe, c.data, c.model)
            assert ours.rank(c.pipe, c.data, c.model) == rank
        assert sorted(map(sorted, ours.dp_groups())) == sorted(map(sorted, theirs.get_axis_comm_lists("data")))
        assert sorted(map(sorted, ours.tp_groups())) == sorted(map(sorted, theirs.get_axis_comm_lists("model")))
        if pp > 1:
            assert sorted(map(sorted, ours.pp_groups())) == sorted(map(sorted, theirs.get_axis_comm_lists("pipe")))


def test_topology_groups_partition_the_world_tp_innermost():
    t = Topology(8, tp=2, pp=2)
    assert t.dp == 2
    assert t.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert t.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert t.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert t.model_parallel_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(ConfigError, match=r"6 processes cannot be split into parallel.tensor=4 × parallel.pipeline=1; "
                                          r"use a world size that is a multiple of 4"):
        Topology(6, tp=4)


def test_launch_world_size_reads_env_and_mpirun():
    assert launch_world_size({"WORLD_SIZE": "4"}) == 4
    assert launch_world_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    assert launch_world_size({}) == 1


# ---- schedules -----------------------------------------------------------------------------------

def test_schedules_warm_up_from_zero_and_reach_their_ends():
    lr, lo = 1e-3, 1e-4
    for sched in ("cosine", "wsd", "constant"):
        assert lr_at(0, sched, lr, lo, 10, 100) == 0.0
        assert lr_at(5, sched, lr, lo, 10, 100) == pytest.approx(5e-4)
        assert lr_at(10, sched, lr, lo, 10, 100) == pytest.approx(lr)
    assert lr_at(55, "cosine", lr, lo, 10, 100) == pytest.approx(lo + (lr - lo) * 0.5)
    assert lr_at(100, "cosine", lr, lo, 10, 100) == pytest.approx(lo)
    assert lr_at(150, "cosine", lr, lo, 10, 100) == pytest.approx(lo)  # past the end: stays at min_lr
    # wsd with decay_steps=0: the last 20% (steps 80..100) decay linearly.
    assert lr_at(80, "wsd", lr, lo, 10, 100) == pytest.approx(lr)
    assert lr_at(90, "wsd", lr, lo, 10, 100) == pytest.approx((lr + lo) / 2)
    assert lr_at(100, "wsd", lr, lo, 10, 100) == pytest.approx(lo)
    assert lr_at(95, "wsd", lr, lo, 10, 100, decay_steps=10) == pytest.approx((lr + lo) / 2)
    assert lr_at(90, "wsd", lr, lo, 10, 100, decay_steps=10) == pytest.approx(lr)
    assert lr_at(70, "constant", lr, lo, 10, 100) == lr
    cos = [lr_at(s, "cosine", lr, lo, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    assert lr_at(0, "cosine", lr, lo, 0, 100) == lr  # no warmup: the peak from the first step


# ---- the DeepSpeed JSON --------------------------------------------------------------------------

def _cfg(*overrides):
    return load_config(None, ["train.global_batch=16", "train.micro_batch=2", *overrides])


def test_deepspeed_json_follows_our_config():
    ds = deepspeed_config(_cfg("optim.lr=2e-4", "optim.weight_decay=0.05", "train.grad_clip=0.5"), dp=4,
                          device_type="cpu")
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["optimizer"] == {"type": "AdamW", "params": {"torch_adam": True, "lr": 2e-4, "betas": [0.9, 0.95],
                                                          "eps": 1e-8, "weight_decay": 0.05}}
    assert "offload_optimizer" not in ds["zero_optimization"]
    gpu = deepspeed_config(_cfg("parallel.offload_optimizer=true", "parallel.offload_params=true"), 1, "cuda")
    # Offloaded states: torch's AdamW on the CPU copies (no DeepSpeed CPUAdam to build).
    assert gpu["bf16"]["enabled"] is True and gpu["optimizer"]["params"]["torch_adam"] is True
    assert "fused" not in gpu["optimizer"]["params"]
    assert gpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert gpu["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert train_dtype(_cfg(), "cuda") == torch.bfloat16 and train_dtype(_cfg(), "cpu") == torch.float32


def test_shipped_deepspeed_files_only_add_fields():
    from conftest import REPO

    for path in sorted((REPO / "configs" / "deepspeed").glob("*.json")):
        ds = deepspeed_config(_cfg(f"deepspeed.config={path}"), dp=2, device_type="cuda")
        assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 2, path


def test_deepspeed_file_adds_fields_and_conflicts_name_both_values(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 1000},
                             "train_micro_batch_size_per_gpu": "auto", "comms_logger": {"enabled": False}}))
    ds = deepspeed_config(_cfg(f"deepspeed.config={f}"), dp=2, device_type="cpu")
    assert ds["zero_optimization"] == {**ds["zero_optimization"], "stage": 3, "stage3_prefetch_bucket_size": 1000}
    assert ds["comms_logger"] == {"enabled": False} and ds["train_micro_batch_size_per_gpu"] == 2
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ConfigError, match=r"sets train_micro_batch_size_per_gpu=4 but train.micro_batch=2 gives 2; "
                                          r"remove train_micro_batch_size_per_gpu from the file"):
        deepspeed_config(_cfg(f"deepspeed.config={f}"), dp=2, device_type="cpu")
    f.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"sets zero_optimization.stage=2 but parallel.zero_stage=3 gives 3"):
        deepspeed_config(_cfg(f"deepspeed.config={f}"), dp=2, device_type="cpu")
    f.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=8 but train.global_batch / \(train.micro_batch "
                                          r"× data-parallel size 2\) = 4 gives 4"):
        deepspeed_config(_cfg(f"deepspeed.config={f}"), dp=2, device_type="cpu")
    f.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="defines a scheduler; megakor sets the learning rate from optim.schedule"):
        deepspeed_config(_cfg(f"deepspeed.config={f}"), dp=2, device_type="cpu")
    with pytest.raises(ConfigError, match="parallel.offload_params needs parameter partitioning; set parallel.zero_stage=3"):
        deepspeed_config(_cfg("parallel.offload_params=true", "parallel.zero_stage=2"), dp=2, device_type="cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        deepspeed_config(_cfg(f"deepspeed.config={tmp_path / 'nope.json'}"), dp=2, device_type="cpu")


# ---- FLOPs ---------------------------------------------------------------------------------------

def test_flops_per_token_counts_matmuls_and_attention():
    from megakor.model.args import preset

    a = preset("debug")  # hidden 64, ffn 176, 2 layers, heads 4 (dim 16), kv 2, vocab 512, untied
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 176
    n = 2 * per_layer + 512 * 64  # blocks + LM head; embedding lookup and norms excluded
    assert matmul_parameters(a) == n
    assert flops_per_token(a, 128) == 6 * n + 12 * 2 * 4 * 16 * 128
    assert device_peak_tflops(torch.device("cpu"), torch.bfloat16) is None
    t = throughput(tokens=1_000_000, seconds=2.0, world_size=4, flops=1e15, dense_flops=2e15, peak_tflops=250.0)
    assert t["tokens_per_sec"] == 500_000 and t["tflops_per_device"] == pytest.approx(125.0)
    assert t["mfu"] == pytest.approx(0.5) and t["mfu_dense_attention"] == pytest.approx(1.0)
    assert "mfu" not in throughput(1, 1.0, 1, 1.0, 1.0, None)
    # Attention per document: a row of one 128-token document costs what flops_per_token says; the same
    # 128 tokens as 4 documents of 32 cost a quarter of the attention.
    assert step_flops(a, 128, 128 ** 2) == pytest.approx(128 * flops_per_token(a, 128))
    assert step_flops(a, 128, 4 * 32 ** 2) == pytest.approx(128 * 6 * n + 12 * 2 * 4 * 16 * 4 * 32 ** 2)


# ---- weights -------------------------------------------------------------------------------------

def test_random_init_is_the_same_for_every_tp_layout():
    from megakor.checkpoint.hf import load_state_dict, merge_tp_shards
    from megakor.model.args import preset

    args = preset("debug")
    full = load_state_dict(RandomInit(args, seed=7), 0, 1)
    merged = merge_tp_shards([load_state_dict(RandomInit(args, seed=7), r, 2) for r in range(2)], args)
    assert full.keys() == merged.keys()
    for k in full:
        expected = full[k][: args.vocab_size] if k in ("tok_embeddings.weight", "lm_head.weight") else full[k]
        assert torch.equal(merged[k], expected), k
    assert torch.equal(full["norm.weight"], torch.ones(64))
    std = full["layers.0.mlp.up_proj.weight"].std().item()
    assert abs(std - args.initializer_range) < 0.002
    other = load_state_dict(RandomInit(args, seed=8), 0, 1)
    assert not torch.equal(other["layers.0.mlp.up_proj.weight"], full["layers.0.mlp.up_proj.weight"])


# ---- evaluation protocol -------------------------------------------------------------------------

def test_eval_split_follows_the_evaluate_protocol(tmp_path):
    from conftest import tiny_tokenizer_dir

    from megakor.data.blend import PackedSource
    from megakor.data.indexed import IndexedWriter
    from megakor.evaluate import document_chunks, pack_chunks
    from megakor.tokenizer import load_tokenizer
    from megakor.train.loop import eval_split

    tok = load_tokenizer(tiny_tokenizer_dir(tmp_path / "tok"))
    texts = ["대한민국은 민주공화국이다.", "The quick brown fox jumps over the lazy dog. " * 3,
             "모든 권력은 국민으로부터 나온다."]
    w = IndexedWriter(str(tmp_path / "ev"), len(tok), tok.eos_token_id)
    for t in texts:
        w.add(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    w.finish()
    src = PackedSource(str(tmp_path / "ev"), seq_len=16, shuffle=False)
    split = eval_split("ko", src, 16, 0, tok.bos_token_id, tok)
    want = pack_chunks(document_chunks(tok, texts, 16), 16)
    assert split.rows.tolist() == [list(r) for r in want]
    assert split.characters == sum(map(len, texts)) and split.documents == 3
    first = eval_split("ko", src, 16, 1, tok.bos_token_id, tok)  # about one row: whole leading documents only
    assert first.documents == 1 and first.characters == len(texts[0])
    assert math.isclose(first.rows.shape[-1], 16)


def test_weight_decay_skips_norms_and_biases():
    from megakor.model.args import preset
    from megakor.model.llama import Llama
    from megakor.train.engine import param_groups

    model = Llama(preset("debug", attention_bias=True, o_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n in names.values() if "norm" in n or n.endswith(".bias")}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
