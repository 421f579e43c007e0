"""One rank fails, the whole job ends (megakor.train.faults.end_job): rank 0 raises while it opens the
weights (test hook MEGAKOR_TEST_FAIL_LOADING_WEIGHTS) while rank 1 waits for it in ZeRO-3's first
parameter gather. Under every launcher both ranks have exited within 60 s, the exit status is non-zero
and rank 0's message appears once. (The Slurm side, srun --kill-on-bad-exit, is in test_slurm_cluster.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from dist_utils import REPO, free_port, launch, rank_env, write_corpus

CONFIG = "configs/runs/tiny_cpu.yaml"
MESSAGE = "checkpoint shard model-00002-of-00004.safetensors vanished from the shared filesystem"
LIMIT = 60


@pytest.fixture(scope="module")
def argv(tmp_path_factory):
    root = tmp_path_factory.mktemp("failfast")
    prefix = write_corpus(root / "train", 100, vocab=512, seed=0)
    return ["launch/train.py", "--config", CONFIG, f"data.sources=[{{path: {prefix}}}]",
            f"checkpoint.dir={root / 'ck'}", "logging.tensorboard_dir=", "parallel.timeout_seconds=300"]


def _launcher_env() -> dict:
    env = {k: v for k, v in rank_env(0, 1, 0).items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["MEGAKOR_TEST_FAIL_LOADING_WEIGHTS"] = MESSAGE
    return env


def _run(cmd: list[str]) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=_launcher_env(), capture_output=True, text=True, timeout=LIMIT + 30,
                           start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{cmd[:4]} still running after {LIMIT + 30} s:\n{(e.stdout or b'')[-3000:]}")
    return r.returncode, r.stdout + r.stderr, time.monotonic() - start


def _check(code: int, text: str, seconds: float, launcher: str) -> None:
    assert code != 0, text[-3000:]
    assert seconds < LIMIT, (seconds, text[-3000:])
    assert text.count(MESSAGE) == 1, text[-6000:]  # rank 0's error, once; rank 1 says only that a peer failed
    assert f"error: rank 0: FileNotFoundError: {MESSAGE}" in text
    print(f"\n{launcher}: rank 0 failed loading weights; every rank gone after {seconds:.1f} s, exit {code}")


def test_env_launch_both_ranks_exit_when_rank_0_fails_loading_weights(argv):
    start = time.monotonic()
    outputs = launch(2, argv, timeout=LIMIT, env={"MEGAKOR_TEST_FAIL_LOADING_WEIGHTS": MESSAGE})
    seconds = time.monotonic() - start
    assert all(rc != 0 for rc, _ in outputs), outputs
    assert "another rank ended" in outputs[1][1], outputs[1][1][-3000:]
    _check(outputs[0][0], outputs[0][1] + outputs[1][1], seconds, "env:// (2 processes)")


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun"])
def test_every_launcher_ends_the_job_when_rank_0_fails_loading_weights(argv, launcher):
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port, *argv]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port, *argv]
    else:
        if shutil.which("mpirun") is None:
            pytest.skip("Open MPI's mpirun is not installed")
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        cmd = ["mpirun", *root, "--oversubscribe", "-np", "2", "-x", "MEGAKOR_TEST_FAIL_LOADING_WEIGHTS",
               sys.executable, *argv]
    code, text, seconds = _run(cmd)
    _check(code, text, seconds, launcher)
