"""The GPU benchmark: the bare model against transformers, the real training path, and the Triton kernels,
on one GPU, in one command (about 5 minutes on an H100/H200).

    python bench/gpu.py                          # everything: bare, real (ZeRO-3, ZeRO-2, ZeRO-3 leaf), kernels
    python bench/gpu.py --parts real --steps 20  # one part
    python bench/gpu.py --smoke                  # the same plumbing on CPU with the debug preset (seconds)

Brings: a CUDA build of torch, transformers and DeepSpeed. GPU images often lack DeepSpeed: on a machine
with pip, `pip wheel --no-deps deepspeed==0.19.8` gives a pure-Python wheel; it also needs hjson, pydantic
with its matching pydantic-core, annotated-types, typing-inspection and typing-extensions>=4.16.

(a) bare: megakor's `Llama` against transformers' `LlamaForCausalLM` (attention "sdpa"), same weights
    and batch (B rows of one document each, bf16), forward+backward only: median tokens/s, MFU, peak
    memory (each model measured alone on the GPU), and the two losses before any update. megakor is also
    timed on packed rows (documents of 64-1024 tokens, one varlen attention call per layer).
(b) real: `launch/train.py` on one GPU, preset llama3-1b, seq 4096, micro-batch 4, synthetic packed
    documents of 64-2048 tokens, `--steps` steps, under ZeRO-3, ZeRO-2 and ZeRO-3 with decoder blocks as
    leaf modules: median tokens/s and MFU over steps 6..N (attention counted per document, and dense),
    the p90/p50 step-time ratio, and the median time breakdown (data, forward+backward, optimizer), all
    read from the run's metrics.jsonl.
(c) kernels: the fused Triton RMSNorm, SwiGLU and RoPE against eager PyTorch, forward+backward.

It prints a table and writes `<out>/gpu-<device>-<date>.json` (default out: bench/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIRST_MEASURED_STEP = 6  # steps before it warm up (Triton compiles, allocator grows)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="bare,real,kernels", help="comma-separated: bare, real, kernels")
    ap.add_argument("--preset", default="llama3-1b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="training steps of each real-path run")
    ap.add_argument("--real-runs", default="zero3,zero2,zero3_per_layer,zero3_gathered",
                    help=f"which real-path runs, in order, of {', '.join(RUNS)}")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--smoke", action="store_true", help="CPU, debug preset, tiny sizes: checks the plumbing")
    a = ap.parse_args(argv)
    if a.smoke:
        a.preset, a.seq_len, a.micro_batch, a.steps = "debug", 64, 2, 8
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton kernels run on CPU tensors, interpreted
    return a


def median(xs):
    return statistics.median(xs) if xs else None


def percentile(xs, q):
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else None


# ---- the attention kernel, first -----------------------------------------------------------------

def varlen_check(device) -> dict:
    """The auto backend's one varlen call against causal SDPA per document, on GQA shapes (32 query, 8
    KV heads), forward and backward, on packed rows. If it fails, the real path runs with SDPA so the
    rest of the benchmark still measures something (and says so)."""
    import torch
    import torch.nn.functional as F

    from megakor.model.attention import attention, choose_backend

    pk = packed_rows(2, 2048, 100, 64, 1024, seed=2)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, T = pk["input_ids"].shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, h, 64, generator=g).to(device, dt).requires_grad_() for h in (32, 8, 8))
    pos, cu = pk["position_ids"].to(device), pk["cu_seqlens"].to(device)
    out = {"backend": choose_backend("auto", q), "documents": int(pk["cu_seqlens"].numel() - 1)}
    try:
        y = attention(q, k, v, pos, None, "auto", cu, pk["max_seqlen"])
        y.float().square().sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        bounds = pk["cu_seqlens"].tolist()
        refs = []
        for s0, e0 in zip(bounds[:-1], bounds[1:]):
            seg = [t.reshape(B * T, t.shape[2], 64)[s0:e0].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
            refs.append(F.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        ref = torch.cat(refs).view(B, T, 32, 64)
        ref.float().square().sum().backward()
        scale = ref.float().abs().max()
        out["max_rel_err_fwd"] = float((y.float() - ref.float()).abs().max() / scale)
        out["max_rel_err_grad"] = max(float((a_.float() - t.grad.float()).abs().max() / t.grad.float().abs().max())
                                      for a_, t in zip(grads, (q, k, v)))
        out["ok"] = out["max_rel_err_fwd"] < 2e-2 and out["max_rel_err_grad"] < 5e-2
    except Exception as e:  # noqa: BLE001 - reported; the benchmark goes on with SDPA
        out["ok"], out["error"] = False, f"{type(e).__name__}: {e}"
    return out


# ---- (a) the bare model ---------------------------------------------------------------------------

def packed_rows(B: int, T: int, vocab: int, lo: int, hi: int, seed: int):
    """B rows of T tokens made of documents with lengths drawn from [lo, hi], collated by the data layer."""
    import numpy as np

    from megakor.data.blend import collate, make_sample

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(B):
        starts = np.zeros(T + 1, dtype=bool)
        at = 0
        while at < T + 1:
            starts[at] = True
            at += int(rng.integers(lo, hi + 1))
        samples.append(make_sample(rng.integers(0, vocab, size=T + 1), starts, np.ones(T + 1, dtype=bool)))
    return collate(samples)


def timed(step, device, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of `step()` (device-synchronised)."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_with_memory(step, device) -> tuple[float, int]:
    """(median seconds of `step()`, peak bytes allocated while timing it; 0 off CUDA)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device)
    return seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def bare(a, device, attention_backend: str = "auto") -> dict:
    import torch
    import transformers

    from megakor.checkpoint.hf import to_hf_state_dict
    from megakor.model.args import preset, to_hf_config
    from megakor.model.attention import choose_backend, rope_inv_freq
    from megakor.model.llama import Llama
    from megakor.train.metrics import device_peak_tflops, step_flops

    args = preset(a.preset)
    B, T = a.micro_batch, a.seq_len
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = device_peak_tflops(device, dtype)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (B, T + 1), generator=g)
    ids = tokens[:, :T].to(device)
    labels = tokens[:, 1:].clone()
    labels[:, -1] = -100  # transformers shifts inside: it predicts T-1 tokens of each row, so do we
    labels = labels.to(device)
    pos = torch.arange(T, device=device).expand(B, T)
    packed = packed_rows(B, T, args.vocab_size, 64, 1024, seed=1)
    packed_dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    out = {"preset": a.preset, "batch": B, "seq_len": T, "tokens_per_step": B * T, "peak_tflops": peak}

    def figures(seconds, flops, memory):
        r = {"fwd_bwd_s": seconds, "tokens_per_sec": B * T / seconds, "tflops": flops / seconds / 1e12,
             "peak_memory_gb": memory / 1e9}
        if peak:
            r["mfu"] = r["tflops"] / peak
        return r

    dense_flops = step_flops(args, B * T, B * T * T)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(args, attention_backend=attention_backend, loss_chunk_tokens=1024)
    model.init_weights()
    model.to(dtype)
    model.rope.inv_freq = rope_inv_freq(args).to(device)  # fp32, as the trainer keeps it
    out["attention_backend"] = choose_backend(attention_backend, ids)

    def mk_step():
        loss = model(ids, pos, labels, reduction="mean")
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    with torch.no_grad():
        out["loss_megakor"] = float(model(ids, pos, labels, reduction="mean"))
    s, mem = timed_with_memory(mk_step, device)
    out["megakor"] = figures(s, dense_flops, mem)

    # The LM head + loss in chunks of 4096 tokens instead of 1024 (fewer, larger matmuls; 4x the logits memory).
    model.loss_chunk_tokens = 4096
    s, mem = timed_with_memory(mk_step, device)
    out["megakor_chunk4096"] = figures(s, dense_flops, mem)
    model.loss_chunk_tokens = 1024

    lengths = packed["cu_seqlens"].diff().long()
    out["packed_documents"] = int(lengths.numel())

    def packed_step():
        loss = model(packed_dev["input_ids"], packed_dev["position_ids"], packed_dev["labels"], reduction="mean",
                     cu_seqlens=packed_dev["cu_seqlens"], max_seqlen=packed_dev["max_seqlen"])
        loss.backward()
        model.zero_grad(set_to_none=True)

    s, mem = timed_with_memory(packed_step, device)
    out["megakor_packed"] = figures(s, step_flops(args, B * T, float((lengths * lengths).sum())), mem)

    hf_state = to_hf_state_dict({k: v.detach().to("cpu") for k, v in model.state_dict().items()}, args)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    config = transformers.LlamaConfig(**to_hf_config(args))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config)
    hf.to(dtype)
    result = hf.load_state_dict(hf_state, strict=False)
    out["hf_load_missing"], out["hf_load_unexpected"] = list(result.missing_keys), list(result.unexpected_keys)
    hf_labels = tokens[:, :T].to(device)

    def hf_step():
        loss = hf(input_ids=ids, labels=hf_labels).loss
        loss.backward()
        hf.zero_grad(set_to_none=True)

    with torch.no_grad():
        out["loss_transformers"] = float(hf(input_ids=ids, labels=hf_labels).loss)
    s, mem = timed_with_memory(hf_step, device)
    out["transformers"] = figures(s, dense_flops, mem)
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["loss_rel_diff"] = abs(out["loss_megakor"] - out["loss_transformers"]) / abs(out["loss_transformers"])
    out["ratio_vs_transformers"] = out["megakor"]["tokens_per_sec"] / out["transformers"]["tokens_per_sec"]
    if out["transformers"]["peak_memory_gb"]:
        out["memory_ratio_vs_transformers"] = out["megakor"]["peak_memory_gb"] / out["transformers"]["peak_memory_gb"]
    return out


# ---- (b) the real path ----------------------------------------------------------------------------

def synthetic_corpus(prefix: Path, vocab: int, eos: int, tokens_needed: int, lo: int, hi: int, seed: int = 0) -> str:
    import numpy as np

    from megakor.data.indexed import IndexedWriter

    rng = np.random.default_rng(seed)
    w = IndexedWriter(str(prefix), vocab, eos)
    total = 0
    while total < tokens_needed:
        n = int(rng.integers(lo, hi + 1))
        w.add(rng.integers(0, min(vocab, eos), size=n - 1).tolist() + [eos])
        total += n
    w.finish()
    return str(prefix)


# zero3 gathers each decoder block as one leaf module (the default); zero3_per_layer hooks every linear
# layer, as DeepSpeed does by default. zero3_gathered keeps ZeRO-3's per-use gathers of every parameter above 10·h elements, as on several
# data-parallel ranks (with one rank megakor keeps parameters whole: `zero_settings`).
RUNS = {"zero3": ["parallel.zero_stage=3", "logging.profile_step=5"], "zero2": ["parallel.zero_stage=2"],
        "zero3_per_layer": ["parallel.zero_stage=3", "parallel.zero3_leaf_modules=false"],
        "zero3_gathered": ["parallel.zero_stage=3", "deepspeed.config={work}/gathered.json"],
        "zero3_chunk4096": ["parallel.zero_stage=3", "model.loss_chunk_tokens=4096"]}


def real_run(a, name: str, prefix: str, work: Path) -> dict:
    from megakor.train.metrics import read_scalars

    d = work / name
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config",
           str(REPO / "configs" / "runs" / "bench_gpu_llama3_1b.yaml"), f"model.init_from={a.preset}",
           f"data.sources=[{{path: {prefix}}}]", f"data.cache_dir={d / 'cache'}", f"train.steps={a.steps}",
           f"train.seq_len={a.seq_len}", f"train.micro_batch={a.micro_batch}", f"train.global_batch={a.micro_batch}",
           f"checkpoint.dir={d / 'ck'}", f"logging.tensorboard_dir={d / 'tb'}",
           *(o.format(work=work) for o in RUNS[name])]
    if a.smoke:
        cmd += ["model.dtype=fp32"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (work / f"{name}.log").write_text(log)
    if proc.returncode:
        return {"error": f"exit {proc.returncode}", "log_tail": log[-4000:], "wall_s": wall}
    for prof in (d / "tb").glob("profile_step*.txt"):
        (work / f"{name}-{prof.stem}.log").write_text(prof.read_text())
    rows = read_scalars(d / "tb")
    measured = sorted(s for s in rows["time/step"] if s >= min(FIRST_MEASURED_STEP, a.steps))  # after profile_step 5

    def med(tag):
        return median([rows[tag][s] for s in measured if s in rows.get(tag, {})])

    step_times = [rows["time/step"][s] for s in measured]
    out = {"steps_measured": [measured[0], measured[-1]], "wall_s": wall,
           "median_tokens_per_sec": med("train/tokens_per_sec"), "median_mfu": med("train/mfu"),
           "median_mfu_dense_attention": med("train/mfu_dense_attention"),
           "median_tflops_per_device": med("train/tflops_per_device"),
           "p50_step_s": percentile(step_times, 50), "p90_step_s": percentile(step_times, 90),
           "max_step_s": max(step_times),
           "median_time": {k: med(f"time/{k}") for k in ("data", "forward_backward", "optimizer", "step")},
           "peak_memory_gb": max(rows["train/memory_gb"].values()),
           "losses": [rows["train/loss"][s] for s in sorted(rows["train/loss"])],
           "step_times": {str(s): rows["time/step"][s] for s in sorted(rows["time/step"])},
           "console": [line for line in log.splitlines() if line.startswith(("step ", "megakor:"))][-3:]}
    out["p90_p50_step_time"] = out["p90_step_s"] / out["p50_step_s"]
    return out


def real(a, device) -> dict:
    from megakor.model.args import preset

    args = preset(a.preset)
    work = Path(tempfile.mkdtemp(prefix="megakor-bench-gpu-"))
    lo, hi = (64, 2048) if not a.smoke else (4, 40)
    prefix = synthetic_corpus(work / "synthetic", args.vocab_size, args.eos_token_id or 2,
                              a.steps * a.micro_batch * a.seq_len * 5 // 4 + 4 * hi, lo, hi)
    out = {"work_dir": str(work), "document_lengths": [lo, hi]}
    (work / "gathered.json").write_text(json.dumps({"zero_optimization": {
        "stage3_param_persistence_threshold": 10 * args.hidden_size}}))
    for name in a.real_runs.split(","):
        out[name] = real_run(a, name, prefix, work)
        r = out[name]
        print(f"real/{name}: " + (r["error"] + "\n" + r["log_tail"] if "error" in r else
                                  f"median {r['median_tokens_per_sec']:.0f} tok/s, MFU {r['median_mfu'] or 0:.1%}, "
                                  f"p90/p50 {r['p90_p50_step_time']:.2f}, {r['wall_s']:.0f} s"), flush=True)
    return out


# ---- (c) kernels ----------------------------------------------------------------------------------

def kernels(a, device) -> dict:
    import torch

    from megakor.model import kernels as k
    from megakor.model import triton_kernels as tk

    torch.manual_seed(0)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    N, D, F, H, HD = (16384, 2048, 8192, 32, 64) if not a.smoke else (64, 32, 64, 2, 16)
    x = torch.randn(N, D, device=device, dtype=dt, requires_grad=True)
    w = torch.randn(D, device=device, dtype=dt, requires_grad=True)
    gate = torch.randn(N, F, device=device, dtype=dt, requires_grad=True)
    up = torch.randn(N, F, device=device, dtype=dt, requires_grad=True)
    q = torch.randn(4, N // 4, H, HD, device=device, dtype=dt, requires_grad=True)
    ang = torch.randn(4, N // 4, HD, device=device)
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)
    cases = {
        "rms_norm": (lambda: tk.rms_norm(x, w, 1e-5), lambda: k.rms_norm_reference(x, w, 1e-5), (x, w)),
        "swiglu": (lambda: tk.swiglu(gate, up), lambda: k.swiglu_reference(gate, up), (gate, up)),
        "rope": (lambda: tk.rope(q, cos, sin), lambda: k.rope_reference(q, cos, sin), (q,)),
    }
    out = {}
    for name, (fused, eager, inputs) in cases.items():
        ref = eager()
        got = fused()
        err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
        grad = torch.randn_like(ref)

        def run(fn):
            y = fn()
            y.backward(grad)
            for t in inputs:
                t.grad = None

        out[name] = {"rel_err_fwd": err, "triton_s": timed(lambda: run(fused), device, 3, 10),
                     "eager_s": timed(lambda: run(eager), device, 3, 10)}
        out[name]["speedup"] = out[name]["eager_s"] / out[name]["triton_s"]
    return out


# ---- report ---------------------------------------------------------------------------------------

def table(result: dict) -> str:
    lines = ["| what | tokens/s | MFU | peak memory (GB) | note |", "|---|---|---|---|---|"]
    b = result.get("bare")
    if b:
        for key, label in (("megakor", "megakor Llama, fwd+bwd, one document per row"),
                           ("megakor_chunk4096", "same, loss in chunks of 4096 tokens"),
                           ("megakor_packed", f"megakor Llama, fwd+bwd, packed ({b['packed_documents']} documents)"),
                           ("transformers", "transformers LlamaForCausalLM (sdpa), fwd+bwd")):
            r = b[key]
            lines.append(f"| {label} | {r['tokens_per_sec']:,.0f} | {r.get('mfu', 0):.1%} | "
                         f"{r['peak_memory_gb']:.1f} | |")
        lines.append(f"| bare ratio vs transformers | {b['ratio_vs_transformers']:.2f}× | | "
                     f"{b.get('memory_ratio_vs_transformers', 0):.2f}× | loss rel diff {b['loss_rel_diff']:.1e} |")
    r = result.get("real", {})
    for name in RUNS:
        if name in r and "error" not in r[name]:
            x = r[name]
            t = x["median_time"]
            lines.append(f"| launch/train.py {name}, packed 64-2048 | {x['median_tokens_per_sec']:,.0f} | "
                         f"{x['median_mfu'] or 0:.1%} (dense {x['median_mfu_dense_attention'] or 0:.1%}) | "
                         f"{x['peak_memory_gb']:.1f} | p90/p50 {x['p90_p50_step_time']:.2f}; step {t['step']:.3f} s = "
                         f"data {t['data']:.3f} + fwd/bwd {t['forward_backward']:.3f} + optim {t['optimizer']:.3f} |")
        elif name in r:
            lines.append(f"| launch/train.py {name} | failed: {r[name]['error']} | | | |")
    for name, x in result.get("kernels", {}).items():
        lines.append(f"| kernel {name} fwd+bwd | | | | Triton {x['triton_s'] * 1e3:.2f} ms vs eager "
                     f"{x['eager_s'] * 1e3:.2f} ms: {x['speedup']:.2f}×, rel err {x['rel_err_fwd']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    if not a.smoke and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; run with --smoke to check the plumbing on CPU", file=sys.stderr)
        return 2
    if a.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    device = torch.device("cpu" if a.smoke else "cuda")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("transformers", "deepspeed", "triton", "flash_attn"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - absent packages are reported as such
            versions[pkg] = None
    result = {"device": name, "date": datetime.date.today().isoformat(), "versions": versions,
              "command": " ".join(["python", "bench/gpu.py", *(argv if argv is not None else sys.argv[1:])])}
    t0 = time.perf_counter()
    parts = a.parts.split(",")
    result["varlen_check"] = varlen_check(device)
    print("varlen_check:", json.dumps(result["varlen_check"]), flush=True)
    if not result["varlen_check"]["ok"]:
        global RUNS
        RUNS = {k: v + ["model.attention=sdpa"] for k, v in RUNS.items()}
    if "bare" in parts:
        result["bare"] = bare(a, device, "auto" if result["varlen_check"]["ok"] else "sdpa")
        print(json.dumps(result["bare"], indent=1), flush=True)
    if "kernels" in parts:
        result["kernels"] = kernels(a, device)
        print(json.dumps(result["kernels"], indent=1), flush=True)
    if "real" in parts:
        result["real"] = real(a, device)
    result["wall_s"] = time.perf_counter() - t0
    runs = result.get("real", {})
    main_run = runs.get("zero3")
    if main_run and "error" not in main_run:
        result["real_path"] = {k: main_run[k] for k in ("median_mfu", "median_mfu_dense_attention",
                                                         "median_tokens_per_sec", "p90_p50_step_time",
                                                         "median_time", "peak_memory_gb")}
    print(table(result))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    path = out / f"gpu-{slug}-{result['date']}{'-smoke' if a.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
