"""Helpers for multi-process tests: start N ranks with env:// variables, a synthetic packed corpus,
and reading a run's exact scalars back from its metrics file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


from megakor.parallel import free_port  # noqa: E402,F401  (re-exported for the tests)


def rank_env(rank: int, world_size: int, port: int, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "SLURM_"))}
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    env.update(extra or {})
    return env


def launch(nprocs: int, argv: list[str], timeout: float = 240, env: dict | None = None) -> list[tuple[int, str]]:
    """Run `python argv` as ranks 0..nprocs-1 of one env:// job; [(returncode, stdout+stderr)] per rank.
    On timeout every rank is killed and an AssertionError carries their output."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=rank_env(r, nprocs, port, env),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for r in range(nprocs)]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            outputs.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        texts = [p.communicate()[0] for p in procs]
        raise AssertionError(f"ranks did not finish in {timeout} s:\n" + "\n".join(t[-3000:] for t in texts if t))
    return outputs


def check(outputs: list[tuple[int, str]]) -> str:
    """Rank 0's output, after asserting every rank exited 0."""
    for r, (rc, out) in enumerate(outputs):
        assert rc == 0, f"rank {r} exited {rc}:\n{out[-6000:]}"
    return outputs[0][1]


def write_corpus(prefix: Path, n_docs: int, vocab: int, seed: int, eos: int = 1, max_len: int = 60) -> str:
    """A preprocessed source of random documents (ids in [3, vocab)), each ending with EOS."""
    from megakor.data.indexed import IndexedWriter

    rng = np.random.default_rng(seed)
    w = IndexedWriter(str(prefix), vocab, eos)
    for _ in range(n_docs):
        w.add(rng.integers(3, vocab, size=int(rng.integers(5, max_len))).tolist() + [eos])
    w.finish()
    return str(prefix)


def write_texts(prefix: Path, tok, texts: list[str], vocab: int) -> str:
    """A preprocessed source of real texts, tokenised by `tok`, each ending with its EOS."""
    from megakor.data.indexed import IndexedWriter

    w = IndexedWriter(str(prefix), vocab, tok.eos_token_id)
    for t in texts:
        w.add(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    w.finish()
    return str(prefix)


def read_scalars(tb_dir: str | Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar tag from the run's metrics.jsonl (exact values) under `tb_dir`."""
    from megakor.train.metrics import read_scalars as read

    return read(tb_dir, tag)


def main(argv: list[str]) -> None:
    """`python tests/dist_utils.py CONFIG '[[overrides of run 1], [overrides of run 2], ...]'`: several
    training runs one after another in the same processes (one process start-up for all of them)."""
    import json

    import torch

    torch.set_num_threads(1)
    from megakor.config import load_config
    from megakor.train.loop import setup_logging, train

    setup_logging()
    for overrides in json.loads(argv[1]):
        train(load_config(argv[0], overrides))


if __name__ == "__main__":
    main(sys.argv[1:])
