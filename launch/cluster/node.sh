#!/usr/bin/env bash
# One node of a cluster that start-cluster.sh --nodes N (N >= 2) made:
#   node.sh start nodeI   start its slurmd (in the node's network namespace, under its hostname and hosts file)
#   node.sh lose nodeI    the machine is gone: every process in its namespace killed at once (slurmd, job steps,
#                         ranks), as a power cut would; SLURM notices after SlurmdTimeout and marks it DOWN
#   node.sh revive nodeI  start its slurmd again and wait until SLURM has it back in service (idle)
# Same SLURM_BASE and SLURM_PORT_BASE as start-cluster.sh.
set -euo pipefail
S=${SLURM_BASE:-${TMPDIR:-/tmp}/trident-slurm}
PB=${SLURM_PORT_BASE:-6817}
what=${1:-}; node=${2:-}
case "$node" in node[0-9]*) ;; *) echo "node.sh: name a node, node1..nodeN, not '$node'" >&2; exit 2 ;; esac
ns=trident$PB-$node
ip netns list | grep -q "^$ns\b" || { echo "node.sh: no namespace $ns (start-cluster.sh --nodes N first)" >&2; exit 1; }
export SLURM_CONF=$S/etc/slurm.conf

start() {
  # Not `ip netns exec`, whose fresh /sys hides the cgroup mounts slurmd reads; each step execs the next,
  # so the recorded pid is slurmd's.
  setsid unshare --uts --mount --propagation private sh -c \
    "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $node &&
     exec nsenter --net=/run/netns/$ns slurmd -D -N $node -f '$SLURM_CONF'" \
    >>"$S/log/slurmd-$node.out" 2>&1 </dev/null &
  echo "slurmd $!" >> "$S/pids"
}

case "$what" in
  start) start ;;
  lose)
    pids=$(ip netns pids "$ns")
    # shellcheck disable=SC2086 # one pid per word
    [ -n "$pids" ] && kill -KILL $pids
    echo "[trident-slurm] $node lost: killed $(echo $pids | wc -w) process(es) in $ns"
    ;;
  revive)
    [ -z "$(ip netns pids "$ns")" ] || { echo "node.sh: $node still has processes; lose it first" >&2; exit 1; }
    start
    for _ in $(seq 1 240); do
      st=$(sinfo -h -N -n "$node" -o %t 2>/dev/null || true)
      [ "$st" = idle ] && break
      # A node marked DOWN for not responding comes back by itself once it registers (ReturnToService=2);
      # ask again in case the controller still holds it down.
      [ "${st#down}" != "$st" ] && scontrol update nodename="$node" state=resume 2>/dev/null || true
      sleep 0.5
    done
    [ "$st" = idle ] || { echo "node.sh: $node is '$st' after its slurmd started, not idle" >&2; exit 1; }
    echo "[trident-slurm] $node back: idle"
    ;;
  *) echo "node.sh: start|lose|revive nodeI, not '$what'" >&2; exit 2 ;;
esac
