#!/usr/bin/env bash
# Stop the one-node CI Slurm cluster started by .ci/slurm_up.sh (munged is left running
# unless called with --all). Idempotent.
set -uo pipefail

stop() {  # stop <name> <pidfile>: SIGTERM the daemon, wait up to 20 s
  local name=$1 pidfile=$2 pid
  pid=$(cat "$pidfile" 2>/dev/null || pgrep -x "$name" | head -n1 || true)
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  echo "[slurm_down] stopping $name ($pid)" >&2
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}

stop slurmd /run/slurm/slurmd.pid
stop slurmctld /run/slurm/slurmctld.pid
if [[ ${1:-} == --all ]]; then
  stop munged /run/munge/munged.pid
fi
exit 0
