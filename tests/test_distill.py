"""Self-distillation replay (`distill: true` on a data source): its rows are scored by KL(start ‖ model)
over the vocabulary instead of cross-entropy. Checked against references written with full logits and
torch's own `kl_div` / `cross_entropy`: the chunked KL and its gradients, the model's mixed loss, the
blend's per-sample flags, the layout refusal, and the trainer under ZeRO-3 on 2 ranks against a
single-process loop."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_hf_checkpoint
from dist_utils import check, launch, read_scalars, write_corpus

CONFIG = "configs/runs/tiny_cpu.yaml"


def test_chunked_kl_and_its_gradients_equal_full_logits():
    from megakor.model.layers import lm_head_distill_kl

    torch.manual_seed(0)
    N, D, V, padded = 37, 16, 50, 64  # rows >= V are padding: no word of either model
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(padded, D, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(N, D, dtype=torch.float64), torch.randn(padded, D, dtype=torch.float64)
    mask = torch.rand(N) > 0.3
    got = lm_head_distill_kl(h, w, th, tw, mask, V, chunk_tokens=8)
    (got * 1.7).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.kl_div((h2 @ w2[:V].t()).log_softmax(-1)[mask], (th @ tw[:V].t()).log_softmax(-1)[mask],
                   log_target=True, reduction="sum")
    (ref * 1.7).backward()
    assert ref > 1.0  # different heads: a real divergence
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)
    assert torch.all(w.grad[V:] == 0)
    same = lm_head_distill_kl(th, tw, th, tw, mask, V, chunk_tokens=8)
    assert abs(float(same)) < 1e-9  # a model against itself


def test_bf16_kl_is_the_kl_of_the_bf16_weights_not_rounding_noise():
    """A student a small step from its teacher, both in bf16 (the GPU's training dtype): the KL and its
    gradient are those of the bf16 values computed exactly, not of bf16-rounded logits (logits near 20
    round by ±0.06, more than the drift)."""
    from megakor.model.layers import lm_head_distill_kl

    torch.manual_seed(0)
    N, D, V = 64, 64, 512
    tw = (torch.randn(V, D) * 0.6).bfloat16()
    th = (torch.randn(N, D) * 1.5).bfloat16()
    w = (tw.double() + torch.randn(V, D, dtype=torch.float64) * 0.01).bfloat16().requires_grad_()
    h = th.clone().requires_grad_()
    mask = torch.ones(N, dtype=torch.bool)
    got = lm_head_distill_kl(h, w, th, tw, mask, V, chunk_tokens=16)
    got.backward()
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.kl_div((h2 @ w2.t()).log_softmax(-1), (th.double() @ tw.double().t()).log_softmax(-1), log_target=True,
                   reduction="sum")
    ref.backward()
    assert (th.double() @ tw.double().t()).abs().max() > 10  # logits large enough for bf16 to round them coarsely
    assert abs(float(got.detach()) - float(ref)) / float(ref) < 1e-3
    rel = (w.grad.double() - w2.grad).norm() / w2.grad.norm()
    assert rel < 2e-2, rel  # bf16 storage of the gradient itself: ~0.4% per element


def test_model_loss_mixes_cross_entropy_and_kl_by_row(hf_checkpoints):
    from megakor.checkpoint.source import build_model

    model, _ = build_model(str(hf_checkpoints["tied"]))
    model = model.double()
    teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # the student has moved away from its start
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.manual_seed(1)
    B, T, V = 3, 12, model.args.vocab_size
    ids = torch.randint(3, V, (B, T))
    labels = torch.randint(3, V, (B, T))
    labels[0, :2] = labels[2, 5:7] = -100
    rows, others = torch.tensor([0, 2]), torch.tensor([1])
    t_hidden = teacher.hidden_states(ids[rows])
    got = model(ids, labels=labels, reduction="sum", teacher=(rows, others, t_hidden, teacher.head_weight))
    logits, t_logits = model.logits(model.hidden_states(ids)), teacher.logits(t_hidden)
    ce = F.cross_entropy(logits[1], labels[1], ignore_index=-100, reduction="sum")
    kl = sum(F.kl_div(logits[r][labels[r] != -100].log_softmax(-1), t_logits[i][labels[r] != -100].log_softmax(-1),
                      log_target=True, reduction="sum") for i, r in enumerate(rows.tolist()))
    assert kl > 1e-3
    torch.testing.assert_close(got, ce + kl, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="summed"):
        model(ids, labels=labels, reduction="mean", teacher=(rows, others, t_hidden, teacher.head_weight))


def test_blend_flags_distilled_samples_and_plain_blends_carry_no_flag(tmp_path):
    from megakor.data.blend import build_datasets

    a = write_corpus(tmp_path / "a", n_docs=60, vocab=100, seed=0)
    b = write_corpus(tmp_path / "b", n_docs=60, vocab=100, seed=1)
    blend, _ = build_datasets([{"path": a, "weight": 0.7}, {"path": b, "weight": 0.3, "distill": True}], None, None, 16)
    flags = [bool(blend[i]["distill"]) for i in range(200)]
    assert flags == [blend.locate(i)[0] == 1 for i in range(200)]
    assert 0.2 < sum(flags) / 200 < 0.4
    plain, _ = build_datasets([{"path": a, "weight": 0.7}, {"path": b, "weight": 0.3}], None, None, 16)
    assert "distill" not in plain[0]
    assert torch.equal(plain[5]["input_ids"], blend[5]["input_ids"])  # the flag changes no sample


def test_distillation_with_tensor_or_pipeline_parallelism_is_refused_in_one_sentence():
    from megakor.config import ConfigError, load_config

    for layout in ("parallel.tensor=2", "parallel.pipeline=2"):
        with pytest.raises(ConfigError, match=r"\['replay'\] set distill: true.*set parallel.tensor=1 and parallel.pipeline=1"):
            load_config(CONFIG, ["data.sources=[{path: x}, {path: y, name: replay, distill: true}]", layout,
                                 "parallel.zero_stage=1"])
    load_config(CONFIG, ["data.sources=[{path: x}, {path: y, name: replay, distill: true}]"])  # TP = PP = 1 is fine
    with pytest.raises(ConfigError, match=r"data.eval source\(s\) \['held'\] set distill: true.*remove distill"):
        load_config(CONFIG, ["data.sources=[{path: x}]", "data.eval=[{path: y, name: held, distill: true}]"])
    from megakor.data.blend import SourceSpec

    with pytest.raises(ValueError, match="data source replay: distill='yes'; write true or false"):
        SourceSpec.from_dict({"path": "y", "name": "replay", "distill": "yes"})


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    hf = make_hf_checkpoint(root / "hf", "tied")
    ko = write_corpus(root / "ko", n_docs=80, vocab=300, seed=0)
    replay = write_corpus(root / "replay", n_docs=80, vocab=300, seed=1)
    sources = [{"path": ko, "weight": 0.5, "name": "ko"}, {"path": replay, "weight": 0.5, "name": "replay", "distill": True}]
    overrides = [f"model.init_from={hf}", f"data.sources={json.dumps(sources)}", "train.steps=3", "optim.lr=1e-2",
                 "optim.warmup_steps=0", "train.eval_batches=0", "checkpoint.every=0", f"checkpoint.dir={root / 'ck'}",
                 f"logging.tensorboard_dir={root / 'tb'}", f"data.cache_dir={root / 'cache'}"]
    out = check(launch(2, ["tests/dist_utils.py", CONFIG, json.dumps([overrides])], timeout=300))
    return root, overrides, out


def single_process_losses(overrides: list[str], distill: bool) -> dict[int, float]:
    """The trainer's step written out in one process with full logits: Σ (CE of plain rows + KL of
    distilled rows against the start) / labelled tokens, clip, torch AdamW, the configured schedule."""
    from megakor.checkpoint.source import build_model
    from megakor.config import load_config
    from megakor.data.blend import BatchIterator, build_datasets
    from megakor.train.engine import param_groups
    from megakor.train.schedule import lr_from_config

    cfg = load_config(CONFIG, overrides)
    model, _ = build_model(cfg.model.init_from)
    teacher = copy.deepcopy(model).requires_grad_(False)
    blend, _ = build_datasets(cfg.data.sources, None, None, cfg.train.seq_len, cfg.train.seed, cfg.data.cache_dir, 0)
    batches = BatchIterator(blend, cfg.train.global_batch, cfg.train.global_batch)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps)
    losses = {}
    for step in range(1, cfg.train.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_from_config(cfg, step)
        b = next(batches)
        flags = b["distill"] if distill else torch.zeros(len(b["labels"]), dtype=torch.bool)
        logits = model.logits(model.hidden_states(b["input_ids"], b["position_ids"]))
        total = 0.0
        for r in range(len(flags)):
            keep = b["labels"][r] != -100
            if flags[r]:
                with torch.no_grad():
                    target = teacher.logits(teacher.hidden_states(b["input_ids"][r:r + 1], b["position_ids"][r:r + 1]))[0]
                total = total + F.kl_div(logits[r][keep].log_softmax(-1), target[keep].log_softmax(-1), log_target=True,
                                         reduction="sum")
            else:
                total = total + F.cross_entropy(logits[r][keep], b["labels"][r][keep], reduction="sum")
        loss = total / (b["labels"] != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = float(loss.detach())
    return losses


def test_zero3_trainer_with_a_distilled_source_equals_the_single_process_loop(distilled_run):
    root, overrides, out = distilled_run
    assert "['replay'] are scored against the starting model" in out
    got = read_scalars(root / "tb", "train/loss")
    ref = single_process_losses(overrides, distill=True)
    plain = single_process_losses(overrides, distill=False)
    print("\ntrainer", got, "\nreference", ref, "\nall cross-entropy", plain)
    assert sorted(got) == [1, 2, 3]
    for s in ref:
        assert abs(got[s] - ref[s]) / ref[s] < 1e-5, (s, got[s], ref[s])
    # The test can fail: at step 1 the student is the teacher, so the replay rows add nothing, and the loss
    # is well below the all-cross-entropy run's.
    assert got[1] < 0.8 * plain[1]
