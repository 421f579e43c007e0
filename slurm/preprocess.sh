#!/bin/bash
# megakor corpus preprocessing as a Slurm array job: each task cleans and tokenises its share of the
# inputs into PREFIX.tasks/<task>/ (resumable); the first task of the array, once it has succeeded,
# submits the merge (this script with --merge) as a job that runs after every task has succeeded
# (--dependency=afterok:<array job>). The merge deduplicates across all tasks and writes PREFIX.bin,
# PREFIX.idx, PREFIX.json and PREFIX.report.json; then PREFIX is ready for data.sources.
#
# Usage (from the repo root; logs/ must exist, Slurm does not create it):
#   mkdir -p logs
#   sbatch --array=0-15 slurm/preprocess.sh --input data/ko/ --tokenizer ckpt/llama3-8b --output-prefix cache/ko
#   sbatch --array=0-3 --cpus-per-task=16 slurm/preprocess.sh --input 'web/*.jsonl.zst' --tokenizer tok/ \
#       --output-prefix cache/web --near-dup-threshold 0.85
# Any option of launch/preprocess.py can follow. Number the tasks from 0 (--array=0-N); every task
# needs the same input paths on a shared filesystem. Each task uses --cpus-per-task tokenising processes
# (override with --workers). A task that failed is resubmitted alone with the same options:
#   sbatch --array=2 slurm/preprocess.sh --input ... (same as before)
# it redoes only its unfinished work units and, as the first task of its array, submits the merge
# again; a merge whose tasks failed is cancelled by Slurm (--kill-on-invalid-dep=yes).
# Progress: one line per task every $MEGAKOR_PROGRESS_SECONDS (default 30) in logs/<job>-<array>_<task>.out.
# The merge's own sbatch options can be added through $MEGAKOR_MERGE_SBATCH (e.g. "--mem=64G").
#
#SBATCH --job-name=megakor-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
set -uo pipefail

say() { echo "megakor: [$(date +%FT%T)] $*"; }
cd "${SLURM_SUBMIT_DIR:-.}"
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 MEGAKOR_PROGRESS_SECONDS=${MEGAKOR_PROGRESS_SECONDS:-30}

if [[ ${1:-} == --merge ]]; then
  shift
  say "merge job ${SLURM_JOB_ID:-?}: $PY launch/preprocess.py --merge $*"
  "$PY" launch/preprocess.py --merge --quiet "$@"; rc=$?
  say "merge exited with $rc"
  exit "$rc"
fi
if [[ -z ${SLURM_ARRAY_TASK_ID:-} || $# -lt 1 ]]; then
  echo "usage: sbatch --array=0-N slurm/preprocess.sh --input PATHS --tokenizer DIR --output-prefix P [options of launch/preprocess.py]" >&2
  exit 2
fi

say "array job $SLURM_ARRAY_JOB_ID task $SLURM_ARRAY_TASK_ID (tasks $SLURM_ARRAY_TASK_MIN-$SLURM_ARRAY_TASK_MAX)" \
    "on $(hostname), ${SLURM_CPUS_PER_TASK:-1} CPUs"
# --workers first, so a --workers in "$@" overrides it.
"$PY" launch/preprocess.py --slurm-array --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"; rc=$?
say "task $SLURM_ARRAY_TASK_ID exited with $rc"
if (( rc == 0 && SLURM_ARRAY_TASK_ID == SLURM_ARRAY_TASK_MIN && ${SLURM_RESTART_COUNT:-0} == 0 )); then
  # The merge's log goes next to this task's.
  log_dir=$(dirname "$(scontrol -o show job "$SLURM_JOB_ID" | sed -n 's/.* StdOut=\([^ ]*\).*/\1/p')")
  merge_id=$(sbatch --parsable --dependency="afterok:$SLURM_ARRAY_JOB_ID" --kill-on-invalid-dep=yes \
               --job-name="${SLURM_JOB_NAME}-merge" --output="${log_dir:-logs}/${SLURM_JOB_NAME}-merge-%j.out" \
               --ntasks=1 --cpus-per-task=1 --time="${MEGAKOR_MERGE_TIME:-24:00:00}" ${MEGAKOR_MERGE_SBATCH:-} \
               "$0" --merge "$@")
  if [[ -z $merge_id ]]; then
    say "could not submit the merge; run it yourself once every task is done: sbatch slurm/preprocess.sh --merge $*"
    exit 1
  fi
  say "submitted merge job $merge_id; it runs when every task of array job $SLURM_ARRAY_JOB_ID has succeeded"
fi
exit "$rc"
