#!/usr/bin/env bash
# slurm-cluster.sh - a real Slurm cluster on this one host, for tests and benchmarks.
#
#   slurm-cluster.sh up            install (if needed), configure, start, wait until every node is idle;
#                                  a running cluster that already satisfies the request: fast no-op
#   slurm-cluster.sh down          stop every daemon this script started (by pidfile)
#   slurm-cluster.sh status        print the daemons and nodes; exit 0 when the cluster is up, 1 when not
#   slurm-cluster.sh reset         down, then wipe Slurm state, logs and the accounting database
#   slurm-cluster.sh restart-ctld  restart slurmctld only (jobs keep running; state is saved)
#   slurm-cluster.sh env           print the cluster facts (the content of $FACTS) when it is up
#
# munge, slurmctld, one slurmd per node (node1..nodeN, all on this host, each on its own port), fake GPUs
# as gres (so Slurm itself sets CUDA_VISIBLE_DEVICES), slurmdbd + MariaDB for real sacct, and slurmrestd
# (unix socket with rest_auth/local, TCP with JWT). Everything runs as root except munged and slurmrestd.
#
# Knobs (environment). Several suites share this cluster, so by default `up` only ever grows it: each
# number is the larger of the running cluster's and the request, REST stays on once on. SLURM_EXACT=1
# configures exactly the values asked for (a change restarts the Slurm daemons and ends running jobs).
#   SLURM_NODES=4          number of nodes (slurmd processes)
#   SLURM_CPUS=4           CPUs declared per node (may exceed the real cores)
#   SLURM_GPUS=4           fake GPUs per node (gres/gpu); 0 = none
#   SLURM_MEM=8000         RealMemory per node, MB
#   SLURM_REST=1           also start slurmrestd (unix:/run/slurmrestd/local.sock and 127.0.0.1:$SLURMREST_PORT)
#   SLURM_NODE_HOSTS=1     add "127.0.0.1 node1 node2 ..." to /etc/hosts so node names resolve
#   SLURM_INSTALL=1        install missing packages (scripts/install.sh); 0 = fail if missing
#   SLURMCTLD_PORT=6817 SLURMDBD_PORT=6819 SLURMD_PORT_BASE=17000 (node i listens on BASE+i) SLURMREST_PORT=6820
#   SLURM_UP_TIMEOUT=60    seconds to wait for each daemon
#
# Facts for other suites: $FACTS (/run/meshrun-slurm/cluster.env), shell syntax (KEY=value, quoted):
#   SLURM_CLUSTER_NAME SLURM_NODES SLURM_NODE_NAMES SLURM_CPUS SLURM_GPUS SLURM_MEM SLURM_PARTITION
#   SLURM_ACCT SLURM_REST SLURM_REST_URL SLURM_REST_SOCKET SLURM_REST_API SLURM_CONF SLURMCTLD_PORT
#   SLURMDBD_PORT SLURMD_PORT_BASE SLURM_HOST SLURM_VERSION
set -euo pipefail

STATE_DIR=/run/meshrun-slurm
FACTS=$STATE_DIR/cluster.env
LOCK=$STATE_DIR/lock
HERE=$(cd "$(dirname "$0")" && pwd)

CONF=/etc/slurm
RUN=/run/slurm
LOG=/var/log/slurm
SPOOL_CTLD=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
GPUDIR=$RUN/fakegpu
RESTDIR=/run/slurmrestd
REST_SOCK=$RESTDIR/local.sock
JWT_KEY=$SPOOL_CTLD/jwt_hs256.key
DB_PASS=slurmdbpass
CLUSTER=testcluster
PARTITION=debug
HOSTS_TAG="# meshrun slurm-cluster.sh"
HOST=$(hostname -s)
TIMEOUT=${SLURM_UP_TIMEOUT:-60}

say() { echo "[slurm-cluster] $*" >&2; }
die() {
  echo "[slurm-cluster] ERROR: $*" >&2
  local f
  for f in $(find "$LOG" /var/log/munge -maxdepth 1 -name '*.log' -mmin -2 2>/dev/null); do
    echo "----- tail $f" >&2; tail -n 8 "$f" >&2
  done
  exit 1
}
# a live process: exists and is not a zombie (PID 1 here reaps orphans late)
alive() {
  local s
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] && read -r s 2>/dev/null <"/proc/$1/stat" || return 1
  s=${s##*) }; s=${s%% *}   # the state follows the command name, which may hold spaces and parentheses
  [ "$s" != Z ] && [ "$s" != X ]
}
pid_of() { local p=""; if [ -s "$1" ]; then read -r p <"$1" || true; fi; echo "$p"; }
running() { alive "$(pid_of "$1")"; }
wait_for() {  # wait_for "what" cmd...   (by the clock: one try of cmd may itself take seconds)
  local what=$1; shift; local end=$((SECONDS + TIMEOUT)) run=(timeout "$TIMEOUT")
  if declare -F "$1" >/dev/null; then run=(); fi  # our own functions bound their commands themselves
  until "${run[@]}" "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$end" ]; then die "timeout (${TIMEOUT}s) waiting for $what"; fi
    sleep 0.1
  done
  return 0
}
stop_pidfile() {  # stop_pidfile file name
  local f=$1 pid; pid=$(pid_of "$f")
  if alive "$pid"; then
    say "stopping $2 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    local i; for i in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then say "SIGKILL $2 ($pid)"; kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}
num() { [[ ${2:-} =~ ^[0-9]+$ ]] || die "$1 must be a whole number (got '${2:-}')"; }
max() { if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# ---- the wanted configuration -------------------------------------------------------------------------
settle_config() {
  local cur_nodes=0 cur_cpus=0 cur_gpus=0 cur_mem=0 cur_rest=0
  if [ "${SLURM_EXACT:-0}" != 1 ] && [ -r "$FACTS" ]; then
    cur_nodes=$(sed -n 's/^SLURM_NODES=//p' "$FACTS"); cur_cpus=$(sed -n 's/^SLURM_CPUS=//p' "$FACTS")
    cur_gpus=$(sed -n 's/^SLURM_GPUS=//p' "$FACTS"); cur_mem=$(sed -n 's/^SLURM_MEM=//p' "$FACTS")
    cur_rest=$(sed -n 's/^SLURM_REST=//p' "$FACTS")
  fi
  NODES=${SLURM_NODES:-4}; CPUS=${SLURM_CPUS:-4}; GPUS=${SLURM_GPUS:-4}; MEM=${SLURM_MEM:-8000}; REST=${SLURM_REST:-1}
  CTLD_PORT=${SLURMCTLD_PORT:-6817}; DBD_PORT=${SLURMDBD_PORT:-6819}
  D_PORT_BASE=${SLURMD_PORT_BASE:-17000}; REST_PORT=${SLURMREST_PORT:-6820}
  for v in NODES CPUS GPUS MEM REST CTLD_PORT DBD_PORT D_PORT_BASE REST_PORT; do num "$v" "${!v}"; done
  [ "$NODES" -ge 1 ] || die "SLURM_NODES must be at least 1"
  [ "$CPUS" -ge 1 ] || die "SLURM_CPUS must be at least 1"
  if [ "${SLURM_EXACT:-0}" != 1 ]; then
    NODES=$(max "$NODES" "${cur_nodes:-0}"); CPUS=$(max "$CPUS" "${cur_cpus:-0}")
    GPUS=$(max "$GPUS" "${cur_gpus:-0}"); MEM=$(max "$MEM" "${cur_mem:-0}"); REST=$(max "$REST" "${cur_rest:-0}")
  fi
  NODE_NAMES=$(for i in $(seq 1 "$NODES"); do printf 'node%d ' "$i"; done); NODE_NAMES=${NODE_NAMES% }
}

install_pkgs() {
  local pkgs=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server slurmrestd slurm-wlm-jwt-plugin curl) ok
  ok=$(dpkg-query -W -f='${Status}\n' "${pkgs[@]}" 2>/dev/null | grep -c 'install ok installed' || true)
  [ "$ok" -eq ${#pkgs[@]} ] && return 0
  [ "${SLURM_INSTALL:-1}" = 1 ] || die "missing packages among: ${pkgs[*]} (run $HERE/install.sh as root)"
  bash "$HERE/install.sh"
}

write_if_changed() {  # write_if_changed path mode  (content on stdin); returns 0 when it changed
  local dst=$1 mode=$2 tmp; tmp=$(mktemp)
  cat >"$tmp"
  if [ -f "$dst" ] && cmp -s "$tmp" "$dst"; then rm -f "$tmp"; return 1; fi
  install -m "$mode" "$tmp" "$dst"; rm -f "$tmp"; return 0
}

write_configs() {
  CHANGED=0
  mkdir -p "$CONF" "$RUN" "$LOG" "$SPOOL_CTLD" "$SPOOL_D"
  local nodes_lines="" gres_lines="" auth_lines="" n i=0
  if [ "$REST" = 1 ]; then
    auth_lines="AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$JWT_KEY"
    if [ ! -s "$JWT_KEY" ]; then (umask 077; dd if=/dev/urandom of="$JWT_KEY" bs=32 count=1 2>/dev/null); fi
    chmod 600 "$JWT_KEY"
  fi
  for n in $NODE_NAMES; do
    i=$((i + 1))
    if [ "$GPUS" -gt 0 ]; then
      nodes_lines+="NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((D_PORT_BASE + i)) CPUs=$CPUS RealMemory=$MEM Gres=gpu:$GPUS State=UNKNOWN"$'\n'
      mkdir -p "$GPUDIR"
      local g; for g in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$GPUDIR/$n-gpu$g"; done
      gres_lines+="NodeName=$n Name=gpu File=$GPUDIR/$n-gpu[0-$((GPUS - 1))]"$'\n'
    else
      nodes_lines+="NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((D_PORT_BASE + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"$'\n'
    fi
  done
  write_if_changed "$CONF/slurm.conf" 644 <<EOF && CHANGED=1 || true
# generated by meshrun backends/slurm/scripts/slurm-cluster.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a job step credential lives 30 s (default 120): also how long a requeued job waits before it may start
# again on a node (starting it sooner is refused with "Job credential revoked")
AuthInfo=cred_expire=30
$auth_lines
SlurmctldPort=$CTLD_PORT
StateSaveLocation=$SPOOL_CTLD
SlurmdSpoolDir=$SPOOL_D/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
InactiveLimit=0
KillWait=30
MinJobAge=300
MaxArraySize=10001
MaxJobCount=100000
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
${nodes_lines}PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  write_if_changed "$CONF/gres.conf" 644 <<EOF && CHANGED=1 || true
AutoDetect=off
$gres_lines
EOF
  write_if_changed "$CONF/slurmdbd.conf" 600 <<EOF && CHANGED=1 || true
AuthType=auth/munge
$auth_lines
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  return 0
}

port_free_or_ours() {  # port_free_or_ours port pidfile what
  local line; line=$(ss -Hltnp "sport = :$1" 2>/dev/null | head -n1) || true
  [ -z "$line" ] && return 0
  local pid; pid=$(pid_of "$2")
  if [ -n "$pid" ] && [[ $line == *"pid=$pid,"* ]]; then return 0; fi
  die "port $1 (for $3) is taken by another process: $line (set the matching SLURM*_PORT knob)"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating munge key"; mungekey -c -k /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  if ! running /run/munge/munged.pid; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged 9>&- || die "munged failed to start (see /var/log/munge/munged.log)"
  fi
  wait_for "munge" bash -c 'munge -n | unmunge'
}

start_mariadb() {
  install -d -o mysql -g mysql -m 755 /run/mysqld
  [ -d /var/lib/mysql/mysql ] || { say "initialising the MariaDB datadir"; mariadb-install-db --user=mysql >/dev/null; }
  if ! mariadb-admin ping >/dev/null 2>&1; then
    say "starting mariadbd"
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --innodb-buffer-pool-size=64M \
      --innodb-lock-wait-timeout=900 >"$LOG/mariadbd.log" 2>&1 </dev/null 9>&- &
  fi
  wait_for "mariadb" mariadb-admin ping
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" || die "mariadb user setup failed"
}

nodes_ready() {  # every node idle/mixed/allocated (a trailing * means not responding)
  local out; out=$(timeout 20 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [ "$(echo "$out" | sort -u | awk '$2 ~ /^(idle|mix|alloc|comp)$/' | wc -l)" -eq "$NODES" ]
}

ctld_up() { local out; out=$(timeout 20 scontrol ping 2>/dev/null) || return 1; [[ $out == *UP* ]]; }

start_slurm() {
  local n
  if [ "$CHANGED" = 1 ]; then
    for n in $(ls "$RUN" 2>/dev/null | sed -n 's/^slurmd-\(.*\)\.pid$/\1/p'); do stop_pidfile "$RUN/slurmd-$n.pid" "slurmd $n"; done
    stop_pidfile "$RUN/slurmctld.pid" slurmctld
    stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
  fi
  start_mariadb
  if ! running "$RUN/slurmdbd.pid"; then
    port_free_or_ours "$DBD_PORT" "$RUN/slurmdbd.pid" slurmdbd
    say "starting slurmdbd"; slurmdbd 9>&- || die "slurmdbd failed to start"
  fi
  wait_for "slurmdbd" sacctmgr -n show cluster
  if ! running "$RUN/slurmctld.pid"; then
    port_free_or_ours "$CTLD_PORT" "$RUN/slurmctld.pid" slurmctld
    say "starting slurmctld"; slurmctld 9>&- || die "slurmctld failed to start"
  fi
  wait_for "slurmctld" ctld_up
  local i=0
  for n in $NODE_NAMES; do
    i=$((i + 1))
    if ! running "$RUN/slurmd-$n.pid"; then
      port_free_or_ours "$((D_PORT_BASE + i))" "$RUN/slurmd-$n.pid" "slurmd $n"
      say "starting slurmd $n"; slurmd -N "$n" 9>&- || die "slurmd $n failed to start"
    fi
  done
  # nodes this config no longer has
  for n in $(ls "$RUN" 2>/dev/null | sed -n 's/^slurmd-\(.*\)\.pid$/\1/p'); do
    [[ " $NODE_NAMES " == *" $n "* ]] || stop_pidfile "$RUN/slurmd-$n.pid" "slurmd $n"
  done
  wait_for "all $NODES nodes idle" nodes_ready
}

rest_ping() {  # rest_ping local|jwt
  if [ "$1" = local ]; then
    curl -sf --max-time 2 --unix-socket "$REST_SOCK" http://localhost/slurm/v0.0.38/ping | grep -q '"UP"'
  else
    local tok; tok=$(timeout 20 scontrol token username=root lifespan=60 | cut -d= -f2)
    curl -sf --max-time 2 -H "X-SLURM-USER-NAME: root" -H "X-SLURM-USER-TOKEN: $tok" \
      "http://127.0.0.1:$REST_PORT/slurm/v0.0.38/ping" | grep -q '"UP"'
  fi
}

start_rest() {
  id slurmrest >/dev/null 2>&1 || useradd -r -M -d /nonexistent -s /usr/sbin/nologin slurmrest
  install -d -o slurmrest -g slurmrest -m 755 "$RESTDIR"
  local opts=(-s openapi/v0.0.38,openapi/dbv0.0.38)
  if [ "$CHANGED" = 1 ]; then stop_pidfile "$RESTDIR/jwt.pid" "slurmrestd (jwt)"; stop_pidfile "$RESTDIR/local.pid" "slurmrestd (local)"; fi
  if ! running "$RESTDIR/local.pid"; then
    rm -f "$REST_SOCK"
    say "starting slurmrestd (rest_auth/local) on unix:$REST_SOCK"
    setsid setpriv --reuid=slurmrest --regid=slurmrest --init-groups \
      /usr/sbin/slurmrestd -a rest_auth/local "${opts[@]}" "unix:$REST_SOCK" \
      >"$LOG/slurmrestd-local.log" 2>&1 </dev/null 9>&- &
    echo $! >"$RESTDIR/local.pid"
  fi
  if ! running "$RESTDIR/jwt.pid"; then
    port_free_or_ours "$REST_PORT" "$RESTDIR/jwt.pid" slurmrestd
    say "starting slurmrestd (rest_auth/jwt) on 127.0.0.1:$REST_PORT"
    # SLURM_JWT=daemon: slurmrestd's own client auth becomes auth/jwt (else every JWT request is rejected)
    SLURM_JWT=daemon setsid setpriv --reuid=slurmrest --regid=slurmrest --init-groups \
      /usr/sbin/slurmrestd -a rest_auth/jwt "${opts[@]}" "127.0.0.1:$REST_PORT" \
      >"$LOG/slurmrestd-jwt.log" 2>&1 </dev/null 9>&- &
    echo $! >"$RESTDIR/jwt.pid"
  fi
  wait_for "slurmrestd (local)" rest_ping local
  wait_for "slurmrestd (jwt)" rest_ping jwt
}

stop_rest() {
  stop_pidfile "$RESTDIR/jwt.pid" "slurmrestd (jwt)"
  stop_pidfile "$RESTDIR/local.pid" "slurmrestd (local)"
}

node_hosts() {
  [ "${SLURM_NODE_HOSTS:-1}" = 1 ] || return 0
  local want="127.0.0.1 $NODE_NAMES $HOSTS_TAG"
  grep -qxF "$want" /etc/hosts 2>/dev/null && return 0
  if ! grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
    echo "$want" >>/etc/hosts   # appending leaves no moment in which localhost does not resolve
    return 0
  fi
  local tmp; tmp=$(mktemp)
  grep -vF "$HOSTS_TAG" /etc/hosts >"$tmp" || true
  echo "$want" >>"$tmp"
  cat "$tmp" >/etc/hosts; rm -f "$tmp"   # rewrite in place: /etc/hosts may be a bind mount
}

unhost() {
  grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
  local tmp; tmp=$(mktemp); grep -vF "$HOSTS_TAG" /etc/hosts >"$tmp" || true
  cat "$tmp" >/etc/hosts; rm -f "$tmp"
}

q() { printf '%q' "$1"; }
write_facts() {
  local version; version=$(sinfo --version 2>/dev/null | awk '{print $2}')
  local tmp; tmp=$(mktemp "$STATE_DIR/cluster.env.XXXXXX")
  {
    echo "# written by backends/slurm/scripts/slurm-cluster.sh; source it"
    echo "SLURM_CLUSTER_NAME=$CLUSTER"
    echo "SLURM_NODES=$NODES"
    echo "SLURM_NODE_NAMES=$(q "$NODE_NAMES")"
    echo "SLURM_CPUS=$CPUS"
    echo "SLURM_GPUS=$GPUS"
    echo "SLURM_MEM=$MEM"
    echo "SLURM_PARTITION=$PARTITION"
    echo "SLURM_ACCT=slurmdbd"
    echo "SLURM_REST=$REST"
    if [ "$REST" = 1 ]; then
      echo "SLURM_REST_URL=http://127.0.0.1:$REST_PORT"
      echo "SLURM_REST_SOCKET=$REST_SOCK"
      echo "SLURM_REST_API=v0.0.38"
    else
      echo "SLURM_REST_URL="; echo "SLURM_REST_SOCKET="; echo "SLURM_REST_API="
    fi
    echo "SLURM_CONF=$CONF/slurm.conf"
    echo "SLURMCTLD_PORT=$CTLD_PORT"
    echo "SLURMDBD_PORT=$DBD_PORT"
    echo "SLURMD_PORT_BASE=$D_PORT_BASE"
    echo "SLURM_HOST=$HOST"
    echo "SLURM_VERSION=$version"
  } >"$tmp"
  chmod 644 "$tmp"; mv -f "$tmp" "$FACTS"
}

all_running() {
  running /run/munge/munged.pid && running "$RUN/slurmdbd.pid" && running "$RUN/slurmctld.pid" || return 1
  local n; for n in $NODE_NAMES; do running "$RUN/slurmd-$n.pid" || return 1; done
  if [ "$REST" = 1 ]; then running "$RESTDIR/local.pid" && running "$RESTDIR/jwt.pid" || return 1; fi
  return 0
}

do_up() {
  [ "$(id -u)" = 0 ] || die "run as root"
  local t0; t0=$(date +%s%N)
  settle_config
  install_pkgs
  write_configs
  if [ "$CHANGED" = 0 ] && all_running && ctld_up && nodes_ready; then
    write_facts; node_hosts
    say "already up: $NODES node(s) x $CPUS CPU(s), $GPUS fake GPU(s) each, rest=$REST ($(( ($(date +%s%N) - t0) / 1000000 )) ms)"
    return 0
  fi
  start_munge
  start_slurm
  if [ "$REST" = 1 ]; then start_rest; else stop_rest; fi
  node_hosts
  write_facts
  say "ready: $NODES node(s) x $CPUS CPU(s), $GPUS fake GPU(s) each, slurmdbd, rest=$REST ($(( ($(date +%s%N) - t0) / 1000000 )) ms); facts in $FACTS"
}

do_down() {
  local f
  stop_rest
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f" "slurmd $(basename "$f" .pid | sed 's/^slurmd-//')"; done
  stop_pidfile "$RUN/slurmctld.pid" slurmctld
  stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
  stop_pidfile /run/mysqld/mysqld.pid mariadbd
  stop_pidfile /run/munge/munged.pid munged
  rm -f "$FACTS"
  unhost
  return 0
}

do_status() {
  local f up=0
  for f in /run/munge/munged.pid /run/mysqld/mysqld.pid "$RUN"/*.pid "$RESTDIR"/*.pid; do
    [ -e "$f" ] || continue
    if running "$f"; then echo "running  $(cat "$f")  $f"; else echo "dead     $f"; fi
  done
  if [ -r "$FACTS" ] && command -v sinfo >/dev/null && ctld_up; then
    sinfo -N -o '%N %t %c %m %G' 2>/dev/null || true
    # shellcheck disable=SC1090
    NODES=$(sed -n 's/^SLURM_NODES=//p' "$FACTS")
    nodes_ready && up=1
  fi
  if [ "$up" = 1 ]; then echo "cluster: up"; return 0; fi
  echo "cluster: down"; return 1
}

do_restart_ctld() {
  [ -r "$FACTS" ] || die "the cluster is not up"
  NODES=$(sed -n 's/^SLURM_NODES=//p' "$FACTS")
  stop_pidfile "$RUN/slurmctld.pid" slurmctld
  say "starting slurmctld"; slurmctld 9>&- || die "slurmctld failed to start"
  wait_for "slurmctld" ctld_up
  wait_for "all $NODES nodes responding" nodes_ready
}

mkdir -p "$STATE_DIR"
cmd=${1:-up}
case "$cmd" in
  up|down|reset|restart-ctld)
    exec 9>"$LOCK"
    flock -w 300 9 || die "another slurm-cluster.sh holds $LOCK"
    ;;
esac
case "$cmd" in
  up) do_up ;;
  down) do_down ;;
  reset)
    if [ -x /usr/sbin/mariadbd ] && [ -d /var/lib/mysql/slurm_acct_db ]; then
      stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
      start_mariadb
      mariadb -e 'DROP DATABASE IF EXISTS slurm_acct_db' || die "could not drop slurm_acct_db"
    fi
    do_down
    for d in "$SPOOL_CTLD" "$SPOOL_D" "$GPUDIR"; do [ -d "$d" ] && find "$d" -mindepth 1 -delete; done
    rm -f "$LOG"/*.log
    say "state wiped"
    ;;
  status) do_status ;;
  restart-ctld) do_restart_ctld ;;
  env) if [ -r "$FACTS" ]; then cat "$FACTS"; else echo "[slurm-cluster] not up" >&2; exit 1; fi ;;
  *) echo "usage: $0 up|down|status|reset|restart-ctld|env" >&2; exit 2 ;;
esac
