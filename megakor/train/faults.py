"""What a long run must survive: preemption signals and non-finite steps, plus the test hooks that fake both.

Preemption (Slurm's `--signal=B:USR1@180`, a time limit, `scancel`): SIGUSR1 and SIGTERM only set a flag.
Signals reach ranks at different moments, so the flag is agreed on inside the step, in the same
all-reduce as the non-finite check: every rank finishes that step, the loop saves a checkpoint (collective)
and the trainer exits with `requeue_exit_code()`, on which slurm/pretrain.sh requeues the job; the next
start resumes from the newest complete checkpoint.

Non-finite steps: if any rank's loss is NaN/inf, every rank back-propagates NaN on its last micro-batch, so
the global gradient norm is NaN everywhere and DeepSpeed's ZeRO optimizer discards the step (that norm is
its overflow: no weight, AdamW moment or step-count update) on every rank alike. A step DeepSpeed discards
on its own (finite loss, non-finite gradient norm) counts the same way. The data position still advances:
the bad batch is not retried. `train.max_skipped_steps` consecutive skips stop the run without saving.
Without ZeRO (parallel.zero_stage=0) DeepSpeed has no such check and applies the step: the run stops.

A failure on one rank (`end_job`): the failing rank prints its error once and leaves at once with
`os._exit` (under mpirun through MPI_Abort), without waiting in any collective or in the process group's
teardown. A launcher that sees a rank exit non-zero ends the others: `deepspeed` and `torchrun` do,
`mpirun` does on MPI_Abort, `srun` does with --kill-on-bad-exit=1 (slurm/pretrain.sh). Without such a
launcher the peers' collectives fail as soon as the failed rank's connections close (gloo), or after
parallel.timeout_seconds (NCCL); those ranks print one line saying a peer failed, not a second copy of
the error.

Test hooks (environment variables; not for production use):
  MEGAKOR_INJECT_NAN_STEP=3 or 3,5-7      global rank 0 multiplies its loss by NaN at those steps
  MEGAKOR_TEST_KILL_DURING_SAVE=STEP      every rank SIGKILLs itself in the middle of writing checkpoint STEP
  MEGAKOR_TEST_USR1_AT_STEP=STEP          global rank 1 (or 0 alone) sends itself SIGUSR1 when step STEP begins
  MEGAKOR_TEST_FAIL_LOADING_WEIGHTS=MSG   global rank 0 raises FileNotFoundError(MSG) as it opens the weights
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import traceback

import torch
import torch.distributed as dist

REQUEUE_EXIT = 42  # slurm/pretrain.sh's default for MEGAKOR_REQUEUE_EXIT


class NumericalFault(RuntimeError):
    """Too many consecutive non-finite steps: the run stops and keeps its last checkpoint."""


def requeue_exit_code() -> int:
    """The exit status that asks the batch script to requeue the job."""
    return int(os.environ.get("MEGAKOR_REQUEUE_EXIT", REQUEUE_EXIT))


class StopSignals:
    """While active, SIGUSR1/SIGTERM set `received` (the signal's name) instead of killing the process."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python's rule for signal handlers
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


def agree(loss_finite: bool | torch.Tensor, stop_requested: bool, device,
          also_read: torch.Tensor | None = None) -> tuple[bool, bool, list[float]]:
    """(some rank's loss is non-finite, some rank was asked to stop, `also_read`'s values), the same on
    every rank. `loss_finite` may be a device tensor: it and `also_read` (e.g. the step's reduced loss)
    come back to the host in this one read, the step's single agreed device→host sync."""
    if isinstance(loss_finite, torch.Tensor):
        not_finite = (~loss_finite).to(device=device, dtype=torch.float64).reshape(1)
    else:
        not_finite = torch.tensor([float(not loss_finite)], dtype=torch.float64, device=device)
    flags = torch.cat([not_finite, torch.tensor([float(stop_requested)], dtype=torch.float64, device=device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    extra = also_read.to(torch.float64).reshape(-1) if also_read is not None else flags.new_zeros(0)
    values = torch.cat([flags, extra]).tolist()
    return bool(values[0]), bool(values[1]), values[2:]


class SkippedSteps:
    """Counts skipped steps; raises NumericalFault after `limit` in a row (0 = no limit)."""

    def __init__(self, limit: int, total: int = 0, consecutive: int = 0):
        self.limit, self.total, self.consecutive = limit, total, consecutive

    def record(self, skipped: bool) -> None:
        self.total += skipped
        self.consecutive = self.consecutive + 1 if skipped else 0

    def check(self, step: int, last_checkpoint: str | None) -> None:
        if self.limit and self.consecutive >= self.limit:
            where = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
            raise NumericalFault(
                f"steps {step - self.consecutive + 1}-{step} all had a non-finite loss or gradient norm "
                f"(train.max_skipped_steps={self.limit} in a row); stopped without saving, {where}: lower optim.lr "
                "or remove the offending data, then resume")


# ---- one rank fails: end the job ----------------------------------------------------------------

# What a collective raises on the ranks that did not fail, once a failed peer's connections close
# (gloo), it was aborted (NCCL) or the process-group timeout ran out.
_PEER_GONE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|Socket Timeout|"
                        r"timed out|Timeout|NCCL communicator was aborted|ProcessGroup.*abort", re.I)


def _global_rank() -> int:
    if dist.is_initialized():
        return dist.get_rank()
    from megakor.train.preflight import launch_rank

    return launch_rank()


def report(error: BaseException, code: int) -> int:
    """An agreed error (a configuration mistake, too many non-finite steps: the same on every rank):
    its sentence once, from rank 0; returns `code` for a normal exit."""
    if _global_rank() == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    return code


def end_job(error: BaseException, code: int = 1) -> None:
    """A rank failed on its own (module docstring): print its error once and leave now, which ends the
    job under every launcher. Returns only when no process group exists (a single process, or an
    error before joining): then the caller exits normally."""
    rank = _global_rank()
    peer_gone = isinstance(error, getattr(dist, "DistError", ())) or bool(_PEER_GONE.search(str(error)))
    if peer_gone:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        print(f"megakor: rank {rank} stopping: a collective failed because another rank ended ({first}); "
              "that rank's error is the one to read", file=sys.stderr, flush=True)
    else:
        frames = traceback.format_exception(error)
        sys.stderr.write("".join(frames[:-1]))  # where it happened; the message itself once, below
        print(f"error: rank {rank}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    sys.stdout.flush()
    if "mpi4py.MPI" in sys.modules:  # mpirun: MPI_Abort ends every rank of the job
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)
    os._exit(code)


# ---- test hooks ----------------------------------------------------------------------------------

def _steps(spec: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def inject_nan(step: int, rank: int) -> bool:
    """Test hook MEGAKOR_INJECT_NAN_STEP: whether this rank poisons its loss at `step` (global rank 0 only,
    so the other ranks must learn of it from the agreement)."""
    spec = os.environ.get("MEGAKOR_INJECT_NAN_STEP")
    return bool(spec) and rank == 0 and step in _steps(spec)


def kill_during_save(step: int) -> None:
    """Test hook MEGAKOR_TEST_KILL_DURING_SAVE: die as a failing node would, half-way through a save."""
    spec = os.environ.get("MEGAKOR_TEST_KILL_DURING_SAVE")
    if spec and step in _steps(spec):
        print(f"megakor: test hook: SIGKILL while writing checkpoint {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def send_usr1_at(step: int, rank: int, world_size: int) -> None:
    """Test hook MEGAKOR_TEST_USR1_AT_STEP: one rank (1, or 0 alone) signals itself as `step` begins,
    as Slurm's --signal would; the ranks agree to stop after that step."""
    spec = os.environ.get("MEGAKOR_TEST_USR1_AT_STEP")
    if spec and step == int(spec) and rank == min(1, world_size - 1):
        os.kill(os.getpid(), signal.SIGUSR1)


def fail_loading_weights() -> None:
    """Test hook MEGAKOR_TEST_FAIL_LOADING_WEIGHTS: global rank 0 fails where it opens the weights, as a
    shard deleted (or a filesystem lost) after preflight would, while the other ranks wait for it."""
    message = os.environ.get("MEGAKOR_TEST_FAIL_LOADING_WEIGHTS")
    if message and (not dist.is_initialized() or dist.get_rank() == 0):
        raise FileNotFoundError(message)
