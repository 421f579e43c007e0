"""Training throughput under DeepSpeed ZeRO-3 on 2 CPU ranks: megakor's engine against transformers'
LlamaForCausalLM (attention "sdpa") wrapped in the same DeepSpeed config.

    python bench/engine.py                                   # llama-50m, seq 512, micro batch 2 (~3-5 min)
    python bench/engine.py --preset debug --steps 3 --seq-len 64   # a quick smoke run

The script starts its own 2 ranks (it re-executes itself with env:// variables, gloo, DS_ACCELERATOR=cpu,
one thread per rank). Both systems get the same DeepSpeed JSON (`deepspeed_config`: ZeRO-3, AdamW,
clipping, fp32, micro batch B, global batch 2B), the same weights (the HF model is built from a fixed
seed and megakor's engine loads its state dict through `build_engine`'s weight path) and the same
random token batches. megakor steps with `train_step` (global-token loss normalisation), transformers
with engine(input_ids, labels) → backward → step (its per-rank mean, averaged over DP by ZeRO: the same
gradient, as every row has the same number of labelled tokens). The two systems alternate step by step
(and swap which goes first) inside the same processes, so machine load hits both alike; a step's time
is the slower rank's forward+backward+step, and the table reports medians. The first step's losses
(same weights, same batch, before any update) must agree within 1e-4.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
LOSS_TOL = 1e-4


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-50m", help="megakor model preset (megakor.model.args.PRESETS)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per system")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per system first")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# ---- launcher (parent process) -------------------------------------------------------------------

def launch(argv: list[str]) -> int:
    """Run this script as ranks 0..WORLD-1; rank 0's output streams through, others' on failure."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(WORLD):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "SLURM_"))}
        env.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], cwd=REPO, env=env, text=True,
                                      stdout=None if rank == 0 else subprocess.PIPE,
                                      stderr=None if rank == 0 else subprocess.STDOUT))
    codes = [p.wait() for p in procs[:1]]
    for p in procs[1:]:
        out, _ = p.communicate()
        codes.append(p.returncode)
        if p.returncode:
            sys.stderr.write(out[-6000:])
    return max(codes, key=abs)


# ---- one rank ------------------------------------------------------------------------------------

def run_rank(a) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import deepspeed
    import transformers

    from megakor.checkpoint.hf import HFCheckpoint
    from megakor.config import load_config
    from megakor.model.args import preset, to_hf_config
    from megakor.parallel import build_parallel_state, init_distributed, shutdown_distributed
    from megakor.train import engine as megakor_engine
    from megakor.train.engine import build_engine, deepspeed_config, param_groups
    from megakor.train.loop import setup_logging, train_step

    setup_logging()
    rank, world, device = init_distributed()
    ps = build_parallel_state(1, 1)
    B, L = a.micro_batch, a.seq_len
    cfg = load_config(None, [f"model.init_from={a.preset}", "model.dtype=fp32", "parallel.zero_stage=3",
                             f"train.micro_batch={B}", f"train.global_batch={B * ps.dp}", f"train.seq_len={L}",
                             "optim.schedule=constant", f"train.seed={a.seed}"])
    ds_config = deepspeed_config(cfg, ps.dp, device.type)
    args = preset(a.preset)
    say = print if rank == 0 else (lambda *x, **k: None)

    # transformers' model: same config, fixed seed (identical on every rank), fp32, SDPA attention.
    hf_json = to_hf_config(args)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_json.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(a.seed)
    hf = transformers.LlamaForCausalLM(hf_cfg).float()
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    n_params = sum(p.numel() for p in hf.parameters())

    # megakor's engine, built as training builds it, its weights read from transformers' state dict.
    ckpt = HFCheckpoint.from_state_dict(hf_json, weights)
    with mock.patch.object(megakor_engine, "open_weights", lambda *_, c=ckpt, **__: c):
        ours, _, _ = build_engine(cfg, ps, device)
    del weights, ckpt
    theirs, _, _, _ = deepspeed.initialize(model=hf, model_parameters=param_groups(hf, cfg.optim.weight_decay),
                                           config=dict(ds_config))

    # Random token batches from a fixed seed: step i, rank r → the same rows for both systems.
    def batch(step: int):
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + step * 1009 + rank)
        ids = torch.randint(0, args.vocab_size, (B, L), generator=g)
        labels = torch.cat([ids[:, 1:], ids.new_full((B, 1), -100)], dim=1)  # megakor's labels are pre-shifted
        return ids, labels

    def megakor_step(ids, labels):
        pos = torch.arange(L).unsqueeze(0).expand(B, L)
        return train_step(ours, [{"input_ids": ids, "position_ids": pos, "labels": labels}], ps, device).loss

    def hf_step(ids, labels):
        loss = theirs(input_ids=ids, labels=ids).loss  # shifts internally: the same predicted tokens
        theirs.backward(loss)
        theirs.step()
        mean = loss.detach().double().clone()
        dist.all_reduce(mean)  # the global loss, as train_step reports it (equal label counts per row)
        return float(mean) / world

    systems = {"megakor": megakor_step, "transformers": hf_step}
    times = {k: [] for k in systems}
    losses = {k: [] for k in systems}
    say(f"engine benchmark: {a.preset} ({n_params / 1e6:.1f}M parameters), {world} CPU ranks × 1 thread, "
        f"ZeRO-3 fp32, micro batch {B} × seq {L} per rank, global batch {B * world}; "
        f"{a.warmup} warm-up + {a.steps} timed steps per system, alternating", flush=True)
    for i in range(a.warmup + a.steps):
        ids, labels = batch(i)
        order = list(systems) if i % 2 == 0 else list(reversed(systems))
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            loss = systems[name](ids, labels)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
            losses[name].append(loss)
            if i >= a.warmup:
                times[name].append(float(dt))
            say(f"  step {i + 1}{' (warm-up)' if i < a.warmup else ''} {name:<13} {float(dt):7.2f} s  loss {loss:.6f}",
                flush=True)

    if rank == 0:
        l0m, l0h = losses["megakor"][0], losses["transformers"][0]
        diff = abs(l0m - l0h)
        print(f"\nfirst-step loss (same weights, same batch): megakor {l0m:.6f}  transformers {l0h:.6f}  "
              f"|diff| {diff:.2e} ({'OK' if diff <= LOSS_TOL else 'MISMATCH'}, tolerance {LOSS_TOL:g})")
        print(f"last-step loss: megakor {losses['megakor'][-1]:.6f}  transformers {losses['transformers'][-1]:.6f}")
        load = os.getloadavg()
        print(f"machine load average (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs\n")
        tokens = B * L * world
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{'system':<14}{'step median (s)':>16}{'min (s)':>9}{'max (s)':>9}{'tokens/s':>10}")
        for k, v in times.items():
            print(f"{k:<14}{med[k]:>16.3f}{min(v):>9.3f}{max(v):>9.3f}{tokens / med[k]:>10.1f}")
        print(f"\nthroughput ratio megakor/transformers: {med['transformers'] / med['megakor']:.2f}x (target >= 1.0)",
              flush=True)
        if diff > LOSS_TOL:
            sys.stderr.write(f"bench/engine.py: first-step losses differ by {diff:.2e} > {LOSS_TOL:g}; "
                             "the comparison is not of the same computation\n")
    dist.barrier()
    shutdown_distributed()
    if rank == 0 and abs(losses["megakor"][0] - losses["transformers"][0]) > LOSS_TOL:
        sys.exit(1)


def main():
    a = parse_args()
    if "RANK" not in os.environ:
        sys.exit(launch(sys.argv[1:]))
    run_rank(a)


if __name__ == "__main__":
    main()
