#!/usr/bin/env bash
# A single-machine SLURM cluster for trident's tests and for trying launcher=slurm without a cluster.
# Adapted from the reference in the shared notes (known to work on these Debian 12 machines).
# Start a single-machine SLURM cluster (munge + [mariadb + slurmdbd] + slurmctld + slurmd)
# on loopback, with all state under $SLURM_BASE. Needs root (slurmd must run as root).
# Tested on Debian 12 (bookworm), slurm-wlm 22.05.8, munge 0.5.15, MariaDB 10.11, in a gVisor sandbox.
#
# Usage:  sudo ./start-cluster.sh [--nodes N]  # install (if needed) + configure + start + health check
#         source $SLURM_BASE/env.sh        # exports SLURM_CONF for sinfo/sbatch/srun/sacct/submitit
#         ./stop-cluster.sh [--clean]
#
# --nodes 1 (the default): one node, this machine's own name, on loopback.
# --nodes N >= 2: N nodes node1..nodeN, each a network namespace of its own (iproute2's `ip netns`) with
#   its own address on a private bridge, its own hostname (a UTS namespace) and its own slurmd; slurmctld,
#   slurmdbd and munged stay on the host, which is the bridge's first address. The file system is shared:
#   every node sees the same /tmp, as cluster nodes see a shared file system. Names resolve through
#   /etc/netns/<namespace>/hosts, bound over /etc/hosts inside each node (as `ip netns exec` does).
#   Whatever an earlier run of the same SLURM_PORT_BASE left (namespaces, bridge, processes) is removed first.
#
# Env knobs:
#   SLURM_BASE=${TMPDIR:-/tmp}/trident-slurm   state/config/log dir (wiped on start)
#   SLURM_ACCOUNTING=1                 1: run mariadb+slurmdbd so `sacct` works (submitit polls sacct);
#                                      0: no accounting (submitit still works but logs a warning every
#                                         poll and job.state stays UNKNOWN)
#   SLURM_NCPUS=16/N                   CPUs advertised by each node (overcommit is fine): the 16 shared out
#   SLURM_SUBNET=10.<a>.<b>            the nodes' /24 (N >= 2), from the port base: host .1, node i at .(10+i)
#   SLURM_SLURMD_TIMEOUT=300           seconds without an answer from a slurmd before its node is DOWN
#   SLURM_SKIP_INSTALL=0               1: don't call apt-get
#   SLURM_PORT_BASE=6817               slurmctld=+0, slurmd=+1, slurmdbd=+2 ; MariaDB uses SLURM_DB_PORT
#   SLURM_DB_PORT=13306
#   SLURM_CRED_EXPIRE=10               seconds a requeued job is held before it may run again (default 120)
#   SLURM_EXTRA_CONF="..."             extra slurm.conf lines (e.g. SchedulerParameters=sched_interval=2,bf_interval=2)
#   SLURM_FIRST_JOB_ID=1               job ids restart here on every start (state is wiped); a submitit
#                                      folder like logs/%j reused across restarts would return STALE results
set -euo pipefail

NODES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=${2:-}; shift; shift || true ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    *) echo "start-cluster.sh: unknown argument '$1' (valid: --nodes N)" >&2; exit 2 ;;
  esac
done
case "$NODES" in ''|*[!0-9]*|0) echo "start-cluster.sh: --nodes must be a whole number >= 1, not '$NODES'" >&2; exit 2 ;; esac

S=${SLURM_BASE:-${TMPDIR:-/tmp}/trident-slurm}
ACCT=${SLURM_ACCOUNTING:-1}
NCPUS=${SLURM_NCPUS:-$(( 16 / NODES > 0 ? 16 / NODES : 1 ))}
PB=${SLURM_PORT_BASE:-6817}
SUBNET=${SLURM_SUBNET:-10.$(( PB / 256 % 256 )).$(( PB % 256 ))}
NS=trident$PB-      # the nodes' namespaces: trident<port base>-node<i>
SLURMD_TIMEOUT=${SLURM_SLURMD_TIMEOUT:-300}
DBPORT=${SLURM_DB_PORT:-13306}
FIRSTJOB=${SLURM_FIRST_JOB_ID:-1}
HOST=$(hostname -s)
HERE=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $T0" | awk '{printf "%.1f", $1-$2}'; }
log() { echo "[trident-slurm +$(elapsed)s] $*"; }
die() { echo "[trident-slurm] ERROR: $*" >&2; for f in "$S"/log/*; do echo "== $f"; tail -n 20 "$f"; done >&2; exit 1; }

# What it needs, each missing thing in one line.
[ "$(id -u)" = 0 ] || { echo "start-cluster.sh: must run as root (slurmd runs as root; --nodes >= 2 makes network namespaces)" >&2; exit 1; }
if [ "$NODES" -gt 1 ]; then
  command -v ip >/dev/null || { echo "start-cluster.sh: --nodes $NODES needs iproute2's 'ip' (apt-get install iproute2)" >&2; exit 1; }
  command -v unshare >/dev/null || { echo "start-cluster.sh: --nodes $NODES needs util-linux's 'unshare'" >&2; exit 1; }
  ip netns list >/dev/null 2>&1 || { echo "start-cluster.sh: --nodes $NODES needs network namespaces ('ip netns list' fails here)" >&2; exit 1; }
  CTLD_ADDR=$SUBNET.1
  NODE_NAMES=$(seq -f "node%g" 1 "$NODES" | paste -sd, -)
  NODE_SET="node[1-$NODES]"
else
  CTLD_ADDR=127.0.0.1
  NODE_NAMES=$HOST
  NODE_SET=$HOST
fi
node_addr() { echo "$SUBNET.$((10 + $1))"; }

# ---------------------------------------------------------------- 1. install
if [ "${SLURM_SKIP_INSTALL:-0}" != 1 ]; then
  PKGS="slurmctld slurmd slurm-client munge"
  [ "$ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
  missing=""
  for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    log "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # On hosts with systemd, postinst will try to start munge/mariadb/slurm with the *system*
    # config; harmless here because we use our own sockets/ports/dirs.
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    log "install done"
  fi
fi

need="munged slurmctld slurmd sinfo sbatch srun"
[ "$ACCT" = 1 ] && need="$need slurmdbd mariadbd"
for cmd in $need; do
  command -v "$cmd" >/dev/null || { echo "start-cluster.sh: $cmd is not installed (Debian: apt-get install slurmctld slurmd slurm-client munge$([ "$ACCT" = 1 ] && echo ' slurmdbd mariadb-server'); or unset SLURM_SKIP_INSTALL)" >&2; exit 1; }
done

# ---------------------------------------------------------------- 2. fresh state
if [ -f "$S/pids" ]; then log "previous cluster found, stopping it"; "$HERE/stop-cluster.sh" || true; fi
# What a killed run of this port base left behind: its nodes' namespaces (and their processes), its bridge.
SLURM_PORT_BASE=$PB "$HERE/stop-cluster.sh" --network-only || true
rm -rf "$S"
mkdir -p "$S"/{etc,ctld,spool,log,munge,munge-key}
chmod 755 "$S" "$S/munge"          # munged: socket dir must be o+x
chmod 700 "$S/munge-key"
: > "$S/pids"

start_bg() {  # name logfile cmd...   (detached from this shell; pid recorded)
  local name=$1 logf=$2; shift 2
  setsid "$@" >"$logf" 2>&1 </dev/null &
  echo "$name $!" >> "$S/pids"
}

# ---------------------------------------------------------------- 3. munge
MSOCK=$S/munge/munge.socket.2
mungekey -c -k "$S/munge-key/munge.key" 2>/dev/null || dd if=/dev/urandom of="$S/munge-key/munge.key" bs=1024 count=1 2>/dev/null
chmod 400 "$S/munge-key/munge.key"
start_bg munged "$S/log/munged.log" munged -F --force --key-file="$S/munge-key/munge.key" --socket="$MSOCK" \
  --pid-file="$S/munge/munged.pid" --seed-file="$S/munge/munged.seed" --num-threads=4
for i in $(seq 1 80); do munge -n -S "$MSOCK" 2>/dev/null | unmunge -S "$MSOCK" >/dev/null 2>&1 && break; sleep 0.25; done
munge -n -S "$MSOCK" | unmunge -S "$MSOCK" >/dev/null || die "munge not working"
log "munged up"

# ---------------------------------------------------------------- 4. mariadb + slurmdbd (optional)
if [ "$ACCT" = 1 ]; then
  mariadb-install-db --no-defaults --user=root --datadir="$S/mysql" --auth-root-authentication-method=socket \
    --skip-test-db >"$S/log/mysql-install.log" 2>&1 || die "mariadb-install-db failed"
  start_bg mariadbd "$S/log/mysql.log" mariadbd --no-defaults --user=root --datadir="$S/mysql" \
    --socket="$S/mysql.sock" --port="$DBPORT" --bind-address=127.0.0.1 --pid-file="$S/mysql.pid" \
    --skip-log-bin --innodb-buffer-pool-size=64M
  for i in $(seq 1 120); do mariadb --no-defaults -S "$S/mysql.sock" -e 'select 1' >/dev/null 2>&1 && break; sleep 0.25; done
  mariadb --no-defaults -S "$S/mysql.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;" || die "mariadb not reachable"
  log "mariadb up"
fi

# ---------------------------------------------------------------- 5. config
cat > "$S/etc/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MSOCK${SLURM_CRED_EXPIRE:+,cred_expire=$SLURM_CRED_EXPIRE}
SlurmctldPort=$PB
SlurmdPort=$((PB+1))
StateSaveLocation=$S/ctld
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups in containers/gVisor:
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# let the node advertise more CPUs than the hardware has:
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=$SLURMD_TIMEOUT
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
FirstJobId=$FIRSTJOB
JobCompType=jobcomp/none
EOF
if [ "$ACCT" = 1 ]; then
  cat >> "$S/etc/slurm.conf" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTLD_ADDR
AccountingStoragePort=$((PB+2))
# client->slurmdbd connections use the munge socket named here, NOT AuthInfo:
AccountingStoragePass=$MSOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
EOF
  cat > "$S/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MSOCK
DbdHost=localhost
DbdAddr=$CTLD_ADDR
DbdPort=$((PB+2))
SlurmUser=root
DebugLevel=info
LogFile=$S/log/slurmdbd.log
PidFile=$S/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$S/etc/slurmdbd.conf"   # slurmdbd refuses a world-readable conf
else
  cat >> "$S/etc/slurm.conf" <<EOF
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
EOF
fi
cat >> "$S/etc/slurm.conf" <<EOF
PartitionName=debug Nodes=$NODE_SET Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
${SLURM_EXTRA_CONF:-}
EOF
i=0
for node in ${NODE_NAMES//,/ }; do
  i=$((i + 1))
  addr=127.0.0.1; [ "$NODES" -gt 1 ] && addr=$(node_addr $i)
  echo "NodeName=$node NodeAddr=$addr CPUs=$NCPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=4096 State=UNKNOWN" \
    >> "$S/etc/slurm.conf"
done
echo "export SLURM_CONF=$S/etc/slurm.conf" > "$S/env.sh"
export SLURM_CONF=$S/etc/slurm.conf   # slurmdbd finds slurmdbd.conf in the same dir as SLURM_CONF

# ---------------------------------------------------------------- 6. the nodes' network (--nodes >= 2)
if [ "$NODES" -gt 1 ]; then
  BRIDGE=trbr$PB
  ip link add "$BRIDGE" type bridge
  echo "bridge $BRIDGE" >> "$S/network"
  ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq 1 "$NODES"); do
    ns=${NS}node$i
    ip netns add "$ns"
    echo "netns $ns" >> "$S/network"
    ip link add "tr$PB-h$i" type veth peer name "tr$PB-n$i"
    ip link set "tr$PB-h$i" master "$BRIDGE" up
    ip link set "tr$PB-n$i" netns "$ns"
    ip -n "$ns" link set "tr$PB-n$i" name eth0
    ip -n "$ns" addr add "$(node_addr $i)/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    # /etc/netns/<ns>/hosts becomes the node's /etc/hosts (where `ip netns exec` also looks for it)
    mkdir -p "/etc/netns/$ns"
    echo "etc /etc/netns/$ns" >> "$S/network"
    { echo "127.0.0.1 localhost"; echo "$CTLD_ADDR $HOST"
      for j in $(seq 1 "$NODES"); do echo "$(node_addr $j) node$j"; done; } > "/etc/netns/$ns/hosts"
  done
  log "network: bridge $BRIDGE $CTLD_ADDR/24, node1..node$NODES at $(node_addr 1)..$(node_addr "$NODES")"
fi

# ---------------------------------------------------------------- 7. daemons
if [ "$ACCT" = 1 ]; then
  start_bg slurmdbd "$S/log/slurmdbd.out" slurmdbd -D
  for i in $(seq 1 120); do timeout 5 sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.25; done
  timeout 5 sacctmgr -n show cluster >/dev/null || die "slurmdbd not answering"
  log "slurmdbd up"
fi
start_bg slurmctld "$S/log/slurmctld.out" slurmctld -D -c -f "$SLURM_CONF"
if [ "$NODES" -gt 1 ]; then
  for i in $(seq 1 "$NODES"); do
    # slurmd in the node's network namespace, under the node's own hostname and hosts file (node.sh)
    SLURM_BASE=$S SLURM_PORT_BASE=$PB bash "$HERE/node.sh" start "node$i"
  done
else
  start_bg slurmd "$S/log/slurmd.out" slurmd -D -N "$HOST" -f "$SLURM_CONF"
fi

# ---------------------------------------------------------------- 8. health check
st=""
want=$(for n in ${NODE_NAMES//,/ }; do echo idle; done | paste -sd' ' -)
for i in $(seq 1 240); do
  st=$(sinfo -h -N -o "%N %t" 2>/dev/null | sort -u | awk '{print $2}' | paste -sd' ' - || true)
  [ "$st" = "$want" ] && break; sleep 0.25
done
[ "$st" = "$want" ] || die "node states are '$st', not '$want'$([ "$NODES" -gt 1 ] && echo " (a node's slurmd reaches slurmctld at $CTLD_ADDR:$PB over the bridge trbr$PB)")"
log "node(s) $NODE_NAMES idle"
# A command the controller refuses in its first seconds on a busy machine is tried again (a precaution: the
# refusals once seen here came from a second cluster started over this one).
again() {  # again CMD...: up to 5 tries 2 s apart; its stdout; its last stderr goes to $S/log/again.err
  local i
  for i in 1 2 3 4 5; do
    "$@" 2>"$S/log/again.err" && return 0
    echo "[trident-slurm] try $i: $* failed: $(tail -n 1 "$S/log/again.err")" >&2; sleep 2
  done
  return 1
}
out=$(again timeout 60 srun -N"$NODES" --ntasks-per-node=1 hostname) || die "srun failed: $(cat "$S/log/again.err")"
[ "$(echo "$out" | sort | paste -sd, -)" = "$NODE_NAMES" ] || die "srun on every node printed '$out', not $NODE_NAMES"
mkdir -p "$S/healthcheck"
jid=$(cd "$S/healthcheck" && again timeout 60 sbatch --parsable -N"$NODES" -n2 -o hc-%j.out --wrap 'srun echo ok-$SLURM_PROCID') \
  || die "sbatch failed: $(cat "$S/log/again.err")"
js=""   # (sbatch --wait polls every 2-10 s, so poll scontrol ourselves)
for i in $(seq 1 720); do   # up to 3 minutes: a machine busy with other work starts a job late
  js=$(scontrol show job "$jid" -o 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true)
  case "$js" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break;; esac; sleep 0.25
done
[ "$js" = COMPLETED ] || die "batch job $jid state '$js'"
[ "$(grep -c '^ok-' "$S/healthcheck/hc-$jid.out")" = 2 ] || die "batch job output wrong"
if [ "$ACCT" = 1 ]; then
  for i in $(seq 1 240); do sacct -n -X -j "$jid" -o State 2>/dev/null | grep -q COMPLETED && break; sleep 0.25; done
  sacct -n -X -j "$jid" -o State | grep -q COMPLETED || die "sacct does not report job $jid"
fi
log "healthy: $NODES node(s), srun + sbatch$([ "$ACCT" = 1 ] && echo ' + sacct') OK.  Now:  source $S/env.sh"
