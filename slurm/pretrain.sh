#!/bin/bash
# megakor pretraining under Slurm: one process per task on every node, torch.distributed
# env:// rendezvous (MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK/LOCAL_RANK).
#
# Usage (from the repo root; logs/ must exist, Slurm does not create it):
#   mkdir -p logs
#   sbatch --gpus-per-node=8 slurm/pretrain.sh CONFIG [section.key=value ...]            # 1 node x 8 GPUs
#   sbatch --nodes=4 --gpus-per-node=8 slurm/pretrain.sh CONFIG train.micro_batch=2  # 4 nodes x 8 GPUs
#   sbatch --ntasks-per-node=2 --cpus-per-task=1 slurm/pretrain.sh CONFIG               # CPU-only node
#   sbatch --nodes=2 --ntasks-per-node=4 --cpus-per-task=8 slurm/pretrain.sh CONFIG     # 2 CPU-only nodes
# Every #SBATCH default below can be overridden on the sbatch command line. checkpoint.dir (and
# logging.tensorboard_dir) must be on a filesystem every node sees. Submitting the same command again
# after a crash resumes too: the trainer always starts from the newest complete checkpoint there.
#
# GPUs are deliberately NOT requested in the header: "#SBATCH --gpus-per-node=8" would be
# rejected outright on a CPU-only cluster (CI), and a header line cannot be conditional.
# Request them at submission (--gpus-per-node=8). If the job ends up with no visible GPU
# (no nvidia-smi, or it lists none), the script sets DS_ACCELERATOR=cpu.
# Each task sees all GPUs of its node and picks cuda:$LOCAL_RANK (no --gpus-per-task).
#
# Preemption / time limit: Slurm sends USR1 to this batch shell 180 s before the limit
# (--signal=B:USR1@180; by hand: scancel --signal=USR1 --batch JOBID). The shell forwards
# it (and TERM) to the srun step; every rank finishes the current step (the ranks agree on
# which), they save a checkpoint together and exit with $MEGAKOR_REQUEUE_EXIT (default 42;
# 180 s must cover one step plus one save: raise it with --signal=B:USR1@SECONDS if not).
# On that code this script runs
# `scontrol requeue $SLURM_JOB_ID`: the job goes back to PENDING with the same id, restarts
# from the top (SLURM_RESTART_COUNT=1,2,...) and appends to the same log (--open-mode=append).
# An exit code alone never requeues (only with a cluster-wide RequeueExit=, which we don't
# rely on). Slurm holds a requeued job for AuthInfo cred_expire (default 120 s) before it
# can start again. Any other code ends the job: 0 done, 2 a configuration mistake, 3 too many
# non-finite steps in a row (train.max_skipped_steps), others a crash (1: a rank failed; its error is
# in the log once, and srun --kill-on-bad-exit=1 has ended the other tasks).
#
# Test hook: MEGAKOR_TRAIN_CMD="shell command" replaces `python launch/train.py`; it runs via
# `bash -c` with "--config CONFIG overrides..." as its positional arguments ("$@").
#
#SBATCH --job-name=megakor
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -uo pipefail

if [[ $# -lt 1 || -z ${SLURM_JOB_ID:-} ]]; then
  echo "usage: sbatch [sbatch options] slurm/pretrain.sh CONFIG [section.key=value ...]" >&2
  exit 2
fi
CONFIG=$1; shift
REQUEUE_EXIT=${MEGAKOR_REQUEUE_EXIT:-42}
say() { echo "megakor: [$(date +%FT%T)] $*"; }
cd "${SLURM_SUBMIT_DIR:-.}"

# Rendezvous: first node of the allocation; port derived from the job id, kept below the
# Linux ephemeral range (32768+) so it does not collide with outgoing connections.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
export WORLD_SIZE=$SLURM_NTASKS
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} PYTHONUNBUFFERED=1 MEGAKOR_REQUEUE_EXIT=$REQUEUE_EXIT

ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if (( ngpu == 0 )); then
  export DS_ACCELERATOR=cpu
  say "no GPU visible -> DS_ACCELERATOR=cpu (for GPUs submit with --gpus-per-node=8)"
fi

if [[ -n ${MEGAKOR_TRAIN_CMD:-} ]]; then
  cmd=(bash -c "$MEGAKOR_TRAIN_CMD" megakor-train --config "$CONFIG" "$@")
else
  cmd=("${PYTHON:-python}" launch/train.py --config "$CONFIG" "$@")
fi
say "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} nodes $SLURM_JOB_NODELIST" \
    "master $MASTER_ADDR:$MASTER_PORT world $WORLD_SIZE gpus/node $ngpu: ${cmd[*]}"

# srun in Slurm >= 22.05 does not inherit --cpus-per-task from sbatch: pass it explicitly.
# --kill-on-bad-exit=1: a task that exits non-zero (a failed rank prints its error and leaves at once)
# ends every other task of the step, instead of leaving them in a collective until the process-group
# timeout with the whole allocation held.
# Per-task rank variables only exist inside the step, hence the small bash -c wrapper. It reports the
# requeue code as 0 (and rank 0 leaves a mark for this shell, on the same node): otherwise the first rank
# to exit with it would get the others, still leaving after the save, killed, and srun would report
# their signal instead. The trainer handles USR1/TERM itself; the wrapper only outlives them.
export MEGAKOR_REQUEUE_MARK=${TMPDIR:-/tmp}/megakor-requeue-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}
rm -f "$MEGAKOR_REQUEUE_MARK"
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" bash -c \
  'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
   trap : USR1 TERM
   "$@"; rc=$?
   if (( rc == MEGAKOR_REQUEUE_EXIT )); then
     if (( RANK == 0 )); then : >"$MEGAKOR_REQUEUE_MARK"; fi
     exit 0
   fi
   exit $rc' \
  megakor "${cmd[@]}" &
srun_pid=$!

forward() { say "got SIG$1, forwarding to the training step"; kill -"$1" "$srun_pid" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early (>128) whenever a trapped signal arrives: keep waiting for srun.
rc=0; wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do rc=0; wait "$srun_pid" || rc=$?; done
if [[ -e $MEGAKOR_REQUEUE_MARK ]]; then rc=$REQUEUE_EXIT; rm -f "$MEGAKOR_REQUEUE_MARK"; fi

# Said first: `scontrol requeue` may end this script before its next line runs.
say "training step exited with $rc"
if (( rc == REQUEUE_EXIT )); then
  say "trainer asked for requeue (exit $rc): scontrol requeue $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
