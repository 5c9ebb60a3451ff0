#!/usr/bin/env bash
# Stop the cluster started by start-cluster.sh: its daemons (by recorded PIDs only), then, for --nodes >= 2,
# every process left in its nodes' network namespaces, the namespaces, their bridge and /etc/netns entries.
#   stop-cluster.sh [--clean]      --clean also deletes $SLURM_BASE
#   stop-cluster.sh --network-only remove what any earlier cluster of this SLURM_PORT_BASE left in the network
#                                  (start-cluster.sh runs this first: a killed test run leaves nothing behind)
set -uo pipefail
S=${SLURM_BASE:-${TMPDIR:-/tmp}/trident-slurm}
PB=${SLURM_PORT_BASE:-6817}
NS=trident$PB-
BRIDGE=trbr$PB

remove_network() {
  local ns pids
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS" || true); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    # shellcheck disable=SC2086 # one pid per word
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
    for _ in $(seq 1 40); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.25; done
    ip netns del "$ns" 2>/dev/null && echo "[trident-slurm] removed namespace $ns"
    rm -rf "/etc/netns/$ns"
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE" && echo "[trident-slurm] removed bridge $BRIDGE"
  fi
  return 0
}

if [ "${1:-}" = --network-only ]; then
  command -v ip >/dev/null && remove_network
  exit 0
fi
if [ ! -f "$S/pids" ]; then
  echo "[trident-slurm] no $S/pids, nothing to stop"
  [ -f "$S/network" ] && remove_network
  [ "${1:-}" = --clean ] && rm -rf "$S"
  exit 0
fi
export SLURM_CONF=$S/etc/slurm.conf

# cancel remaining jobs so their slurmstepd/tasks exit before slurmd goes away
if [ -f "$SLURM_CONF" ]; then
  ids=$(timeout 5 squeue -h -o %i 2>/dev/null || true)
  if [ -n "$ids" ]; then timeout 10 scancel $ids 2>/dev/null || true; sleep 2; fi
fi

is_ours() { kill -0 "$1" 2>/dev/null && [ "$(cat /proc/$1/comm 2>/dev/null)" = "$2" ]; }  # pids can be reused
for name in slurmd slurmctld slurmdbd mariadbd munged; do   # reverse start order; one slurmd per node
  for pid in $(awk -v n="$name" '$1==n {print $2}' "$S/pids"); do
    if is_ours "$pid" "$name"; then
      t=$(date +%s.%N); kill -TERM "$pid"
      for i in $(seq 1 60); do is_ours "$pid" "$name" || break; sleep 0.25; done
      if is_ours "$pid" "$name"; then echo "[trident-slurm] $name ($pid) did not exit, SIGKILL"; kill -KILL "$pid"; fi
      echo "[trident-slurm] stopped $name ($pid) in $(echo "$(date +%s.%N) $t" | awk '{printf "%.1fs", $1-$2}')"
    else
      echo "[trident-slurm] $name ($pid) was not running"
    fi
  done
done
rm -f "$S/pids"
[ -f "$S/network" ] && remove_network && rm -f "$S/network"
[ "${1:-}" = --clean ] && rm -rf "$S" && echo "[trident-slurm] removed $S"
exit 0
