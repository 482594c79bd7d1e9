#!/usr/bin/env bash
# sshd-pool.sh - a pool of throwaway OpenSSH "hosts" for the SSH backend's tests (Debian 12, root).
#
#   bash sshd-pool.sh up        start (idempotent: restarts only what is not running), wait until ready
#   bash sshd-pool.sh down      stop our sshd's and the test users' processes, delete our netns/bridge
#   bash sshd-pool.sh status    what runs, exit 0 when every host answers
#
# Each host is its own network namespace (mrsshN) with its own address, sshd on port 22 and hostname
# (hostN, through a UTS namespace). The hosts share the filesystem, users and homes; they differ in
# network and hostname only. If network namespaces are refused (or MRSSH_LOOPBACK=1), every host gets a
# loopback address 127.79.0.(10+N) and a free port instead.
#
# Knobs: MRSSH_HOSTS=3  MRSSH_USERS="mrssh-alice mrssh-bob"  MRSSH_POOL_DIR=/var/lib/meshrun-sshpool
#        MRSSH_NET=10.200.N (auto: a /24 no interface or route uses)  MRSSH_LOOPBACK=0
#
# Outputs in $MRSSH_POOL_DIR:
#   pool.json                 {"mode", "net", "hosts": [{name, address, port, hostname}], "users": {...},
#                              "known_hosts", "scratch"}
#   known_hosts               host keys of every host
#   users/USER/id_ed25519     that user's client key (owned by USER, mode 600)
#   users/USER/ssh_config     Host host1 ... for that user (ssh -F FILE host1 true)
#   hostN/{sshd_config,host_ed25519,sshd.pid,sshd.log}
set -euo pipefail

DIR=${MRSSH_POOL_DIR:-/var/lib/meshrun-sshpool}
NHOSTS=${MRSSH_HOSTS:-3}
USERS=${MRSSH_USERS:-"mrssh-alice mrssh-bob"}
LOOPBACK=${MRSSH_LOOPBACK:-0}
SCRATCH=${MRSSH_SCRATCH:-/var/tmp/meshrun-sshpool}
BR=mrsshbr0
TIMEOUT=${MRSSH_UP_TIMEOUT:-30}

say() { echo "[sshd-pool] $*"; }
die() {
  echo "[sshd-pool] ERROR: $*" >&2
  local f
  for f in "$DIR"/host*/sshd.log; do [ -s "$f" ] && { echo "----- tail $f" >&2; tail -n 8 "$f" >&2; }; done
  exit 1
}
# alive PID: a live process that is not a zombie (PID 1 here reaps orphans late; kill -0 says yes to zombies)
alive() { local s; [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] && s=$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1) && [ "$s" != Z ] && [ "$s" != X ]; }
pid_of() { if [ -s "$1" ]; then cat "$1"; fi; }
# ours PIDFILE: the pid in it is alive and really our sshd for that config (not a recycled pid)
ours() {
  local pid; pid=$(pid_of "$1")
  alive "$pid" || return 1
  [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *"$(dirname "$1")/sshd_config"* ]]
}

descendants() {  # PID -> every live process below it (by parent pid)
  local p kids
  kids=$(awk -v pp="$1" '{ sub(/.*\) /, ""); if ($2 == pp) print FILENAME }' /proc/[0-9]*/stat 2>/dev/null |
         sed 's|/proc/\([0-9]*\)/stat|\1|' || true)
  for p in $kids; do echo "$p"; descendants "$p"; done
}

stop_pidfile() {
  local f=$1 pid kids
  pid=$(pid_of "$f")
  if ours "$f"; then
    say "stopping sshd pid $pid ($f)"
    kids=$(descendants "$pid")  # the connections it serves, logged in or not
    # shellcheck disable=SC2086
    [ -n "$kids" ] && kill -9 $kids 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 25); do alive "$pid" || break; sleep 0.2; done
    alive "$pid" && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

install_pkgs() {
  local need=() p
  for p in openssh-server openssh-client iproute2; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"install ok installed"* ]] || need+=("$p")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  say "missing ${need[*]}: running install.sh"
  bash "$(dirname "$0")/install.sh"
}

setup_users() {
  local u home
  install -d -m 755 "$DIR" "$DIR/users"
  install -d -m 1777 "$SCRATCH"
  for u in $USERS; do
    if ! id "$u" >/dev/null 2>&1; then useradd -m -s /bin/bash "$u"; fi
    # useradd leaves the password "!" (locked); with UsePAM no, sshd then refuses even key logins
    usermod -p '*' "$u"
    home=$(getent passwd "$u" | cut -d: -f6)
    install -d -m 700 -o "$u" -g "$u" "$DIR/users/$u"
    [ -s "$DIR/users/$u/id_ed25519" ] ||
      ssh-keygen -q -t ed25519 -N '' -C "meshrun-sshpool-$u" -f "$DIR/users/$u/id_ed25519"
    chown "$u:$u" "$DIR/users/$u/id_ed25519" "$DIR/users/$u/id_ed25519.pub"
    chmod 600 "$DIR/users/$u/id_ed25519"
    install -d -m 700 -o "$u" -g "$u" "$home/.ssh"
    install -m 600 -o "$u" -g "$u" "$DIR/users/$u/id_ed25519.pub" "$home/.ssh/authorized_keys"
  done
  install -d -m 755 /run/sshd   # privilege separation dir; sshd exits without it
}

pick_net() {
  if [ -n "${MRSSH_NET:-}" ]; then echo "$MRSSH_NET"; return 0; fi
  if [ -s "$DIR/net" ]; then cat "$DIR/net"; return 0; fi
  local used n
  used=$( (ip -4 -o addr show; ip -4 route show) 2>/dev/null || true)
  for n in $(seq 77 120); do
    if ! grep -q "10\.200\.$n\." <<<"$used"; then echo "10.200.$n"; return 0; fi
  done
  return 1
}

free_port() {  # a TCP port nobody listens on
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    [ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ] && { echo "$p"; return 0; }
  done
  return 1
}

netns_setup() {  # NET; returns 1 if the kernel or sandbox refuses
  local net=$1 i ns
  ip link show "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge 2>/dev/null || return 1
  # (no `cmd | grep -q` under pipefail: grep's early exit can fail the pipeline with SIGPIPE)
  [[ $(ip addr show dev "$BR") == *"inet $net.1/24"* ]] || ip addr add "$net.1/24" dev "$BR" 2>/dev/null || return 1
  ip link set "$BR" up 2>/dev/null || return 1
  for i in $(seq 1 "$NHOSTS"); do
    ns=mrssh$i
    if ! [[ " $(ip netns list | awk '{print $1}' | tr '\n' ' ') " == *" $ns "* ]]; then
      ip netns add "$ns" 2>/dev/null || return 1
      if ip link show "$ns-h" >/dev/null 2>&1; then ip link del "$ns-h" || true; fi  # stale peer
    fi
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
      ip link add "$ns-h" type veth peer name eth0 netns "$ns" 2>/dev/null || return 1
    fi
    { ip link set "$ns-h" master "$BR" && ip link set "$ns-h" up; } 2>/dev/null || return 1
    [[ $(ip -n "$ns" addr show dev eth0) == *"inet $net.$((10 + i))/24"* ]] ||
      ip -n "$ns" addr add "$net.$((10 + i))/24" dev eth0 2>/dev/null || return 1
    { ip -n "$ns" link set lo up && ip -n "$ns" link set eth0 up; } 2>/dev/null || return 1
    # no default route on purpose: a host reaches only the pool's /24
  done
  return 0
}

# write_host NAME ADDR PORT -> $DIR/NAME/{sshd_config,host_ed25519}; lines for known_hosts, pool.json
write_host() {
  local name=$1 addr=$2 port=$3 d="$DIR/$1"
  install -d -m 700 "$d"
  [ -s "$d/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "meshrun-sshpool-$name" -f "$d/host_ed25519"
  cat >"$d/sshd_config.new" <<EOF
# generated by sshd-pool.sh ($name)
Port $port
ListenAddress $addr
HostKey $d/host_ed25519
PidFile $d/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
AllowUsers $USERS
StrictModes yes
LogLevel VERBOSE
PrintMotd no
PrintLastLog no
AllowTcpForwarding yes
MaxSessions 100
MaxStartups 100:30:200
Subsystem sftp internal-sftp
EOF
  /usr/sbin/sshd -t -f "$d/sshd_config.new" || die "bad sshd_config for $name"
  mv "$d/sshd_config.new" "$d/sshd_config"
  local kh=$addr; [ "$port" = 22 ] || kh="[$addr]:$port"
  echo "$kh $(cut -d' ' -f1,2 "$d/host_ed25519.pub")" >>"$DIR/known_hosts.new"
}

start_host() {  # i mode addr port
  local i=$1 mode=$2 addr=$3 port=$4 name="host$1" d="$DIR/host$1"
  ours "$d/sshd.pid" && return 0
  rm -f "$d/sshd.pid"
  say "starting sshd $name on $addr:$port ($mode)"
  if [ "$mode" = netns ]; then
    # ip netns exec -> unshare -> sh -> exec sshd: the pidfile holds sshd's own PID
    setsid ip netns exec "mrssh$i" unshare --uts sh -c "hostname $name && exec /usr/sbin/sshd -D -f $d/sshd_config -E $d/sshd.log" \
      </dev/null >>"$d/start.log" 2>&1 &
  elif unshare --uts true 2>/dev/null; then
    setsid unshare --uts sh -c "hostname $name && exec /usr/sbin/sshd -D -f $d/sshd_config -E $d/sshd.log" \
      </dev/null >>"$d/start.log" 2>&1 &
  else
    setsid /usr/sbin/sshd -D -f "$d/sshd_config" -E "$d/sshd.log" </dev/null >>"$d/start.log" 2>&1 &
  fi
}

wait_ready() {  # name -> waits until the first user can log in
  local u t=0
  u=${USERS%% *}
  until ssh -F "$DIR/users/$u/ssh_config" -o BatchMode=yes -o ConnectTimeout=3 -o LogLevel=ERROR "$1" true \
      >/dev/null 2>&1; do
    sleep 0.1; t=$((t + 1))
    if [ $t -ge $((TIMEOUT * 10)) ]; then
      ssh -F "$DIR/users/$u/ssh_config" -o BatchMode=yes -o ConnectTimeout=3 "$1" true || true
      die "sshd $1 not reachable after ${TIMEOUT}s"
    fi
  done
}

do_up() {
  [ "$(id -u)" = 0 ] || die "run as root"
  local t0 i mode net addr port u hosts_json="" users_json="" sep=""
  t0=$(date +%s%N)
  install_pkgs
  setup_users
  exec 9>"$DIR/.lock"; flock 9
  mode=loopback
  net=""
  if [ "$LOOPBACK" != 1 ] && net=$(pick_net) && netns_setup "$net"; then
    mode=netns
    echo "$net" >"$DIR/net"
  else
    [ "$LOOPBACK" = 1 ] || say "network namespaces refused here: using loopback addresses"
  fi
  rm -f "$DIR/known_hosts.new"
  for u in $USERS; do : >"$DIR/users/$u/ssh_config.new"; done
  for i in $(seq 1 "$NHOSTS"); do
    if [ $mode = netns ]; then addr="$net.$((10 + i))"; port=22
    else
      addr="127.79.0.$((10 + i))"
      port=$(pid_of "$DIR/host$i/port")
      if [ -z "$port" ] || { ! ours "$DIR/host$i/sshd.pid" && [ -n "$(ss -Hltn "src $addr and sport = :$port")" ]; }; then
        port=$(free_port) || die "no free port"
      fi
    fi
    install -d -m 700 "$DIR/host$i"
    echo "$port" >"$DIR/host$i/port"; echo "$addr" >"$DIR/host$i/address"
    # an address or port change (mode switch) needs a restart with the new config
    if ours "$DIR/host$i/sshd.pid" && ! grep -qx "ListenAddress $addr" "$DIR/host$i/sshd_config"; then
      stop_pidfile "$DIR/host$i/sshd.pid"
    fi
    write_host "host$i" "$addr" "$port"
    for u in $USERS; do
      cat >>"$DIR/users/$u/ssh_config.new" <<EOF
Host host$i
  HostName $addr
  Port $port
  User $u
  IdentityFile $DIR/users/$u/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $DIR/known_hosts
  StrictHostKeyChecking yes
EOF
    done
    hosts_json+="$sep{\"name\": \"host$i\", \"address\": \"$addr\", \"port\": $port, \"hostname\": \"host$i\", \"pidfile\": \"$DIR/host$i/sshd.pid\"}"
    sep=", "
  done
  mv "$DIR/known_hosts.new" "$DIR/known_hosts"; chmod 644 "$DIR/known_hosts"
  sep=""
  for u in $USERS; do
    mv "$DIR/users/$u/ssh_config.new" "$DIR/users/$u/ssh_config"
    chown "$u:$u" "$DIR/users/$u/ssh_config"; chmod 600 "$DIR/users/$u/ssh_config"
    users_json+="$sep\"$u\": {\"key\": \"$DIR/users/$u/id_ed25519\", \"ssh_config\": \"$DIR/users/$u/ssh_config\", \"uid\": $(id -u "$u"), \"home\": \"$(getent passwd "$u" | cut -d: -f6)\"}"
    sep=", "
  done
  for i in $(seq 1 "$NHOSTS"); do start_host "$i" "$mode" "$(cat "$DIR/host$i/address")" "$(cat "$DIR/host$i/port")"; done
  for i in $(seq 1 "$NHOSTS"); do wait_ready "host$i"; done
  cat >"$DIR/pool.json.new" <<EOF
{"mode": "$mode", "net": "$net", "dir": "$DIR", "scratch": "$SCRATCH", "known_hosts": "$DIR/known_hosts",
 "hosts": [$hosts_json],
 "users": {$users_json}}
EOF
  mv "$DIR/pool.json.new" "$DIR/pool.json"; chmod 644 "$DIR/pool.json"
  local ns=$(( $(date +%s%N) - t0 ))
  say "ready ($mode, $NHOSTS hosts) in $((ns / 1000000)) ms: $DIR/pool.json"
}

kill_user_processes() {  # every process of our test users (jobs left behind by a failed test)
  local u uid p pids
  for u in $USERS; do
    uid=$(id -u "$u" 2>/dev/null) || continue
    pids=""
    for p in /proc/[0-9]*; do
      [ "$(stat -c %u "$p" 2>/dev/null)" = "$uid" ] && pids+=" ${p#/proc/}"
    done
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  done
}

do_down() {
  local f i
  for f in "$DIR"/host*/sshd.pid; do [ -e "$f" ] || continue; stop_pidfile "$f"; done
  kill_user_processes
  for i in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^mrssh[0-9]+$' || true); do
    # delete the veth first: netns removal frees its devices asynchronously
    if ip link show "$i-h" >/dev/null 2>&1; then ip link del "$i-h" || true; fi
    ip netns del "$i" && say "deleted netns $i"
  done
  if ip link show "$BR" >/dev/null 2>&1; then ip link del "$BR" && say "deleted bridge $BR"; fi
  rm -f "$DIR/pool.json"
  return 0
}

do_status() {
  local f rc=0
  for f in "$DIR"/host*/sshd.pid; do
    [ -e "$f" ] || continue
    if ours "$f"; then echo "running $(cat "$f") $f"; else echo "dead $f"; rc=1; fi
  done
  [ -f "$DIR/pool.json" ] && cat "$DIR/pool.json" || rc=1
  ip netns list 2>/dev/null | grep -E '^mrssh[0-9]+' || true
  return $rc
}

case "${1:-up}" in
  up) do_up ;;
  down) do_down ;;
  status) do_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
