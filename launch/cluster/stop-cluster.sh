#!/usr/bin/env bash
# Stop the cluster started by start-cluster.sh (by recorded PIDs only).  --clean also deletes $SLURM_BASE.
set -uo pipefail
S=${SLURM_BASE:-${TMPDIR:-/tmp}/trident-slurm}
[ -f "$S/pids" ] || { echo "[trident-slurm] no $S/pids, nothing to stop"; [ "${1:-}" = --clean ] && rm -rf "$S"; exit 0; }
export SLURM_CONF=$S/etc/slurm.conf

# cancel remaining jobs so their slurmstepd/tasks exit before slurmd goes away
if [ -f "$SLURM_CONF" ]; then
  ids=$(timeout 5 squeue -h -o %i 2>/dev/null || true)
  if [ -n "$ids" ]; then timeout 10 scancel $ids 2>/dev/null || true; sleep 2; fi
fi

pid_of() { awk -v n="$1" '$1==n {print $2}' "$S/pids" | tail -n1; }
is_ours() { kill -0 "$1" 2>/dev/null && [ "$(cat /proc/$1/comm 2>/dev/null)" = "$2" ]; }  # pids can be reused
for name in slurmd slurmctld slurmdbd mariadbd munged; do   # reverse start order
  pid=$(pid_of $name)
  [ -n "$pid" ] || continue
  if is_ours "$pid" "$name"; then
    t=$(date +%s.%N); kill -TERM "$pid"
    for i in $(seq 1 60); do is_ours "$pid" "$name" || break; sleep 0.25; done
    if is_ours "$pid" "$name"; then echo "[trident-slurm] $name ($pid) did not exit, SIGKILL"; kill -KILL "$pid"; fi
    echo "[trident-slurm] stopped $name ($pid) in $(echo "$(date +%s.%N) $t" | awk '{printf "%.1fs", $1-$2}')"
  else
    echo "[trident-slurm] $name ($pid) was not running"
  fi
done
rm -f "$S/pids"
[ "${1:-}" = --clean ] && rm -rf "$S" && echo "[trident-slurm] removed $S"
exit 0
