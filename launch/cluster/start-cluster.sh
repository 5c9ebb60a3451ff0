#!/usr/bin/env bash
# A single-machine SLURM cluster for trident's tests and for trying launcher=slurm without a cluster.
# Adapted from the reference in the shared notes (known to work on these Debian 12 machines).
# Start a single-machine SLURM cluster (munge + [mariadb + slurmdbd] + slurmctld + slurmd)
# on loopback, with all state under $SLURM_BASE. Needs root (slurmd must run as root).
# Tested on Debian 12 (bookworm), slurm-wlm 22.05.8, munge 0.5.15, MariaDB 10.11, in a gVisor sandbox.
#
# Usage:  sudo ./start-cluster.sh            # install (if needed) + configure + start + health check
#         source $SLURM_BASE/env.sh        # exports SLURM_CONF for sinfo/sbatch/srun/sacct/submitit
#         ./stop-cluster.sh [--clean]
#
# Env knobs:
#   SLURM_BASE=${TMPDIR:-/tmp}/trident-slurm   state/config/log dir (wiped on start)
#   SLURM_ACCOUNTING=1                 1: run mariadb+slurmdbd so `sacct` works (submitit polls sacct);
#                                      0: no accounting (submitit still works but logs a warning every
#                                         poll and job.state stays UNKNOWN)
#   SLURM_NCPUS=16                     CPUs advertised for the node (overcommit is fine)
#   SLURM_SKIP_INSTALL=0               1: don't call apt-get
#   SLURM_PORT_BASE=6817               slurmctld=+0, slurmd=+1, slurmdbd=+2 ; MariaDB uses SLURM_DB_PORT
#   SLURM_DB_PORT=13306
#   SLURM_CRED_EXPIRE=10               seconds a requeued job is held before it may run again (default 120)
#   SLURM_EXTRA_CONF="..."             extra slurm.conf lines (e.g. SchedulerParameters=sched_interval=2,bf_interval=2)
#   SLURM_FIRST_JOB_ID=1               job ids restart here on every start (state is wiped); a submitit
#                                      folder like logs/%j reused across restarts would return STALE results
set -euo pipefail

S=${SLURM_BASE:-${TMPDIR:-/tmp}/trident-slurm}
ACCT=${SLURM_ACCOUNTING:-1}
NCPUS=${SLURM_NCPUS:-16}
PB=${SLURM_PORT_BASE:-6817}
DBPORT=${SLURM_DB_PORT:-13306}
FIRSTJOB=${SLURM_FIRST_JOB_ID:-1}
NODE=$(hostname -s)
HERE=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $T0" | awk '{printf "%.1f", $1-$2}'; }
log() { echo "[trident-slurm +$(elapsed)s] $*"; }
die() { echo "[trident-slurm] ERROR: $*" >&2; for f in "$S"/log/*; do echo "== $f"; tail -n 20 "$f"; done >&2; exit 1; }

[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }

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

# ---------------------------------------------------------------- 2. fresh state
if [ -f "$S/pids" ]; then log "previous cluster found, stopping it"; "$HERE/stop-cluster.sh" || true; fi
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
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MSOCK${SLURM_CRED_EXPIRE:+,cred_expire=$SLURM_CRED_EXPIRE}
SlurmctldPort=$PB
SlurmdPort=$((PB+1))
StateSaveLocation=$S/ctld
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
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
SlurmdTimeout=300
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
AccountingStorageHost=127.0.0.1
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
DbdAddr=127.0.0.1
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
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
${SLURM_EXTRA_CONF:-}
EOF
echo "export SLURM_CONF=$S/etc/slurm.conf" > "$S/env.sh"
export SLURM_CONF=$S/etc/slurm.conf   # slurmdbd finds slurmdbd.conf in the same dir as SLURM_CONF

# ---------------------------------------------------------------- 6. daemons
if [ "$ACCT" = 1 ]; then
  start_bg slurmdbd "$S/log/slurmdbd.out" slurmdbd -D
  for i in $(seq 1 120); do timeout 5 sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.25; done
  timeout 5 sacctmgr -n show cluster >/dev/null || die "slurmdbd not answering"
  log "slurmdbd up"
fi
start_bg slurmctld "$S/log/slurmctld.out" slurmctld -D -c -f "$SLURM_CONF"
start_bg slurmd "$S/log/slurmd.out" slurmd -D -N "$NODE" -f "$SLURM_CONF"

# ---------------------------------------------------------------- 7. health check
st=""
for i in $(seq 1 240); do st=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true); [ "$st" = idle ] && break; sleep 0.25; done
[ "$st" = idle ] || die "node state is '$st', not idle"
log "node $NODE idle"
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
out=$(again timeout 60 srun -N1 -n2 hostname) || die "srun failed: $(cat "$S/log/again.err")"
[ "$(echo "$out" | wc -l)" = 2 ] || die "srun output unexpected: $out"
mkdir -p "$S/healthcheck"
jid=$(cd "$S/healthcheck" && again timeout 60 sbatch --parsable -n2 -o hc-%j.out --wrap 'srun echo ok-$SLURM_PROCID') \
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
log "healthy: srun + sbatch$([ "$ACCT" = 1 ] && echo ' + sacct') OK.  Now:  source $S/env.sh"
