"""End-to-end tests of slurm/pretrain.sh on a real (one-node) Slurm cluster.

Bring the cluster up first with `bash .ci/slurm_up.sh` (root, Debian); without it these tests
skip, except under CI=true, where an unusable cluster (no tools, no controller, its node down,
drained or not responding) fails them. The first two replace the trainer by a stand-in via
MEGAKOR_TRAIN_CMD; the others run the real launch/train.py (configs/runs/tiny_cpu.yaml, 2 CPU
tasks): to completion; interrupted by `scancel --signal=USR1 --batch`, requeued and resumed with the
uninterrupted job's loss sequence; and with rank 0 failing while it loads the weights, which must end
the job (srun --kill-on-bad-exit=1) with that rank's message in the log.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "slurm/pretrain.sh"
REQUEUE_EXIT = 42  # slurm/pretrain.sh default for MEGAKOR_REQUEUE_EXIT


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client tools not installed (run `bash .ci/slurm_up.sh`)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld not answering (run `bash .ci/slurm_up.sh`)"
    if out.returncode != 0:
        return f"sinfo failed, cluster not up (run `bash .ci/slurm_up.sh`): {out.stderr.strip()}"
    states = out.stdout.split()
    # A trailing "*" means the node is not responding: jobs would wait for it forever.
    if not any(s in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable Slurm node (states: {states})"
    return None


_problem = _cluster_problem()


@pytest.fixture(autouse=True)
def _usable_cluster():
    if _problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the Slurm cluster is unusable: {_problem}")
        pytest.skip(_problem)

# Stand-in trainer (Python, like launch/train.py). First run (SLURM_RESTART_COUNT unset/0):
# say "ready", then block until USR1, "save" and exit with the requeue code. Later runs:
# print and exit 0.
STANDIN = r"""exec python3 -c '
import os, signal, sys, time
e = os.environ
rank, restart = e["RANK"], int(e.get("SLURM_RESTART_COUNT") or 0)
print("STANDIN rank=%s local_rank=%s world_size=%s master=%s:%s ds=%s restart=%d args=%s" % (
    rank, e["LOCAL_RANK"], e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"],
    e.get("DS_ACCELERATOR", ""), restart, " ".join(sys.argv[1:])), flush=True)
if e.get("STANDIN_WAIT_USR1") and restart == 0:
    def on_usr1(*_):
        print("STANDIN rank=%s got USR1, saving" % rank, flush=True)
        sys.exit(int(e["MEGAKOR_REQUEUE_EXIT"]))
    signal.signal(signal.SIGUSR1, on_usr1)
    print("STANDIN rank=%s ready" % rank, flush=True)
    while True:
        time.sleep(0.1)
print("STANDIN rank=%s done restart=%d" % (rank, restart), flush=True)
' "$@"
"""


def _sbatch_args(out: Path, *extra: str) -> list[str]:
    # CI node has 2 CPUs and no GPU: override the 8-tasks x 8-CPUs header defaults.
    return ["sbatch", "--job-name=megakor-test", "--ntasks-per-node=2", "--cpus-per-task=1",
            "--time=3", f"--output={out}", *extra, SCRIPT]


def _env(**kw: str) -> dict[str, str]:
    env = {**os.environ, "MEGAKOR_TRAIN_CMD": STANDIN, **kw}
    for k in ("SLURM_JOB_ID", "SLURM_JOBID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # don't leak an enclosing job's rendezvous into the test job
    return env


def _job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                         timeout=15).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _first_node() -> str:
    nodes = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True).stdout.strip()
    return subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                          text=True).stdout.split()[0]


def test_pretrain_sets_per_rank_env(tmp_path):
    out = tmp_path / "job-%j.out"
    proc = subprocess.run(
        [*_sbatch_args(out, "--wait", "--parsable"), "configs/runs/tiny.yaml", "train.lr=1e-4"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    job_id = proc.stdout.strip().split(";")[0]
    log = (tmp_path / f"job-{job_id}.out").read_text() if job_id else ""
    assert proc.returncode == 0, f"sbatch rc={proc.returncode}\n{proc.stderr}\n{log}"

    lines = {int(m["rank"]): m for m in re.finditer(
        r"STANDIN rank=(?P<rank>\d+) local_rank=(?P<local>\d+) world_size=(?P<ws>\d+) "
        r"master=(?P<addr>[^:\s]+):(?P<port>\d+) ds=(?P<ds>\S*) restart=\d+ args=(?P<args>.*)", log)}
    assert sorted(lines) == [0, 1], log
    master = _first_node()
    for rank, m in lines.items():
        assert m["local"] == str(rank)  # one node: LOCAL_RANK == RANK
        assert m["ws"] == "2"
        assert m["addr"] == master
        assert 10000 <= int(m["port"]) < 30000
        assert m["ds"] == "cpu"  # CI node has no GPU
        assert m["args"] == "--config configs/runs/tiny.yaml train.lr=1e-4"
    assert lines[0]["port"] == lines[1]["port"]
    assert "training step exited with 0" in log


def test_pretrain_requeues_on_usr1(tmp_path):
    out = tmp_path / "job-%j.out"
    proc = subprocess.run([*_sbatch_args(out, "--parsable"), "configs/runs/tiny.yaml"], cwd=REPO,
                          env=_env(STANDIN_WAIT_USR1="1"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    log_path = tmp_path / f"job-{job_id}.out"
    log = lambda: log_path.read_text() if log_path.exists() else ""  # noqa: E731
    try:
        deadline = time.monotonic() + 30
        # Wait until both ranks have installed their USR1 handler.
        while len(re.findall(r"^STANDIN rank=\d+ ready$", log(), re.M)) < 2:
            assert time.monotonic() < deadline, f"stand-in never got ready\n{log()}\n{_job_info(job_id)}"
            time.sleep(0.2)
        # What --signal=B:USR1@180 does before the time limit: signal the batch shell only.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=15)

        deadline = time.monotonic() + 50  # requeued job waits cred_expire (10 s in CI conf)
        while (info := _job_info(job_id)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED",
                                                                 "TIMEOUT", "NODE_FAIL"):
            assert time.monotonic() < deadline, f"job did not finish\n{log()}\n{info}"
            time.sleep(0.5)
    finally:
        if _job_info(job_id).get("JobState") not in ("COMPLETED", None):
            subprocess.run(["scancel", job_id], timeout=15)

    text = log()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    assert info["Restarts"] == "1", f"{info}\n{text}"
    saved = re.findall(r"^STANDIN rank=\d+ got USR1, saving$", text, re.M)
    assert len(saved) == 2, text  # both ranks saved in run 1
    assert f"trainer asked for requeue (exit {REQUEUE_EXIT})" in text, text
    assert re.search(r"job \d+ restart 0 ", text) and re.search(r"job \d+ restart 1 ", text), text
    for rank in (0, 1):
        assert f"STANDIN rank={rank} done restart=1" in text, text


# ---- the real trainer: configs/runs/tiny_cpu.yaml, 2 CPU tasks ------------------------------------

STEPS = 30
_STAMP = re.compile(r"^megakor: \[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\] (.*)$", re.M)


def _real_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in _env().items() if k != "MEGAKOR_TRAIN_CMD"}
    env["PYTHON"] = sys.executable
    return {**env, **extra}


def _submit(d: Path, overrides: list[str], **env: str) -> tuple[str, Path]:
    d.mkdir(parents=True)  # for the log: Slurm does not create directories
    proc = subprocess.run([*_sbatch_args(d / "job-%j.out", "--parsable", "--time=10"), "configs/runs/tiny_cpu.yaml",
                           *overrides, f"checkpoint.dir={d / 'ck'}", f"logging.tensorboard_dir={d / 'tb'}"],
                          cwd=REPO, env=_real_env(**env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    return job_id, d / f"job-{job_id}.out"


def _wait_finished(job_id: str, log: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (info := _job_info(job_id)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                             "NODE_FAIL", "OUT_OF_MEMORY"):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=15)
            pytest.fail(f"job {job_id} did not finish in {timeout} s: {info}\n{_read(log)[-4000:]}")
        time.sleep(0.5)
    return info


def _read(log: Path) -> str:
    return log.read_text() if log.exists() else ""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(work dir, overrides) for tiny_cpu jobs on a synthetic corpus, and the uninterrupted reference job."""
    from dist_utils import write_corpus

    root = tmp_path_factory.mktemp("slurm_train")
    prefix = write_corpus(root / "train", 300, vocab=512, seed=0)
    overrides = [f"data.sources=[{{path: {prefix}}}]", f"data.cache_dir={root / 'cache'}", f"train.steps={STEPS}",
                 "checkpoint.every=0"]
    job_id, log = _submit(root / "uninterrupted", overrides)
    info = _wait_finished(job_id, log, 240)
    return root, overrides, info, _read(log)


def test_sbatch_runs_the_real_trainer_on_cpu_nodes(tiny):
    from dist_utils import read_scalars

    root, _, info, text = tiny
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", f"{info}\n{text[-4000:]}"
    assert "no GPU visible -> DS_ACCELERATOR=cpu" in text and "megakor: 2 processes, tp=1 dp=2" in text
    assert "training step exited with 0" in text
    losses = read_scalars(root / "uninterrupted" / "tb", "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    ck = root / "uninterrupted" / "ck"
    assert (ck / "latest").read_text() == f"global_step{STEPS}"
    from megakor.train.checkpointing import problem

    assert problem(ck / f"global_step{STEPS}") is None  # every file matches the manifest


def test_usr1_saves_requeues_and_resumes_on_the_uninterrupted_course(tiny):
    from dist_utils import read_scalars

    root, overrides, _, _ = tiny
    job_id, log = _submit(root / "preempted", overrides)
    try:
        deadline = time.monotonic() + 120
        while f"step 2/{STEPS} " not in _read(log):
            assert time.monotonic() < deadline, f"no step 2 in 120 s\n{_read(log)[-4000:]}\n{_job_info(job_id)}"
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=15)
        info = _wait_finished(job_id, log, 240)
    finally:
        if _job_info(job_id).get("JobState") not in ("COMPLETED", None):
            subprocess.run(["scancel", job_id], timeout=15)
    text = _read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-4000:]}"
    stopped = int(re.search(r"stop requested \(SIGUSR1/SIGTERM\) at step (\d+)", text)[1])
    assert 2 <= stopped < STEPS
    assert f"saved checkpoint {root / 'preempted' / 'ck' / f'global_step{stopped}'}" in text
    assert f"trainer asked for requeue (exit {REQUEUE_EXIT})" in text
    assert f"resumed from {root / 'preempted' / 'ck' / f'global_step{stopped}'} at step {stopped}" in text
    want = read_scalars(root / "uninterrupted" / "tb", "train/loss")
    got = read_scalars(root / "preempted" / "tb", "train/loss")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in want), [(s, got[s], want[s]) for s in want if got[s] != want[s]]
    stamps = {msg: time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%S")) for t, msg in _STAMP.findall(text)}
    exited = next(t for m, t in stamps.items() if m == f"training step exited with {REQUEUE_EXIT}")
    restarted = next(t for m, t in stamps.items() if re.match(rf"job {job_id} restart 1 ", m))
    print(f"\nstopped at step {stopped}; requeue latency (exit {REQUEUE_EXIT} -> restart 1) "
          f"{restarted - exited:.0f} s; losses (bitwise equal to the uninterrupted job) "
          + " ".join(f"{s}:{got[s]:.6f}" for s in sorted(got)))


def test_a_rank_failing_while_loading_weights_ends_the_job(tiny):
    """srun --kill-on-bad-exit=1: rank 0 fails (test hook) while rank 1 waits in ZeRO-3's first gather;
    the job ends FAILED, not held, with rank 0's message once in its log."""
    root, overrides, _, _ = tiny
    message = "checkpoint shard model-00002-of-00004.safetensors vanished from the shared filesystem"
    start = time.monotonic()
    job_id, log = _submit(root / "failing", overrides, MEGAKOR_TEST_FAIL_LOADING_WEIGHTS=message)
    info = _wait_finished(job_id, log, 120)
    seconds = time.monotonic() - start
    text = _read(log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{text[-4000:]}"
    assert text.count(message) == 1 and f"error: rank 0: FileNotFoundError: {message}" in text, text[-4000:]
    assert re.search(r"training step exited with [1-9]", text), text[-4000:]
    print(f"\nSlurm job {job_id}: rank 0 failed loading weights; job {info['JobState']} (exit {info['ExitCode']}) "
          f"{seconds:.0f} s after submission")
