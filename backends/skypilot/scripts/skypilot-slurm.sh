#!/usr/bin/env bash
# skypilot-slurm.sh - let SkyPilot launch onto the repo's test Slurm cluster, on this one host, offline.
#
#   skypilot-slurm.sh up       Slurm (backends/slurm/scripts/slurm-cluster.sh up), a login node (an sshd on
#                              127.0.0.1 for a dedicated user), the offline fixes below, the SkyPilot client
#                              config ($STATE/slurm_config); idempotent, a fast no-op when all is in place
#   skypilot-slurm.sh down     stop what `up` started and what SkyPilot left behind for our user: the sshd,
#                              every process of the user (slurm steps, subprocess_daemon.py, skylet), ssh
#                              clients that use our key, the user's Slurm jobs (scancel -u)
#   skypilot-slurm.sh clean    down, then wipe the user's SkyPilot runtime (~/.sky*, ~/skypilot-runtime, ...)
#   skypilot-slurm.sh prepare  only the downloads and copies of F1/F2 (scripts/install.sh runs it)
#   skypilot-slurm.sh status   exit 0 when the login node answers
#   skypilot-slurm.sh env      print the facts for tests (shell syntax)
#
# SkyPilot reads ~/.slurm/config (SSH-config syntax; the Host alias is the SkyPilot "region", here
# "testcluster") and always reaches the login node over SSH. The test fixtures copy $STATE/slurm_config
# to $HOME/.slurm/config of their own SkyPilot home. The Slurm cluster itself is used read-only.
#
# The offline fixes (each one a real, blocking error without it):
#   F1 uv        SkyPilot's setup runs `~/.local/bin/uv -V || curl -LsSf https://astral.sh/uv/install.sh | sh`:
#                a `curl` stand-in on the user's PATH answers that one URL with a script that copies the uv
#                binary of PyPI's `uv` wheel (installed into $STATE/uvvenv); other URLs go to the real curl.
#   F2 python    `uv venv --python 3.10` would download a Python build: a python3.10 on the user's PATH
#                (a copy of the machine's pyenv 3.10, its RUNPATH patched so the user can run it).
#   F3 TLS       uv's bundled roots do not include the machine's CA: SSL_CERT_FILE + UV_SYSTEM_CERTS=1.
#   F4 hosts     the Slurm node names must resolve (slurm-cluster.sh adds them to /etc/hosts by default).
#
# Knobs: SKY_SLURM_USER=meshsky  SKY_SLURM_STATE=/var/lib/meshrun-skypilot  SKY_SLURM_PORT (default: a free
# port, kept in $STATE/port)  SKY_SLURM_NODES=2 (the least number of Slurm nodes asked of slurm-cluster.sh)
#   PY310_HOME (default: the newest /root/.pyenv/versions/3.10.*)
#   SLURM_CLUSTER_SCRIPT (default: backends/slurm/scripts/slurm-cluster.sh)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
U=${SKY_SLURM_USER:-meshsky}
STATE=${SKY_SLURM_STATE:-/var/lib/meshrun-skypilot}
SSHD_DIR=$STATE/sshd
FIX=$STATE/fix
CLUSTER=testcluster
SLURM_SCRIPT=${SLURM_CLUSTER_SCRIPT:-$REPO/backends/slurm/scripts/slurm-cluster.sh}

say() { echo "[skypilot-slurm] $*" >&2; }
die() { echo "[skypilot-slurm] ERROR: $*" >&2; [ -s "$SSHD_DIR/sshd.log" ] && tail -n 5 "$SSHD_DIR/sshd.log" >&2; exit 1; }
alive() { local s; [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] && s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ "$s" != Z ]; }
pid_of() { if [ -s "$1" ]; then cat "$1"; fi; }
home_of() { getent passwd "$U" | cut -d: -f6; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port() {
  if [ -n "${SKY_SLURM_PORT:-}" ]; then echo "$SKY_SLURM_PORT"; return; fi
  if [ ! -s "$STATE/port" ]; then install -d -m 755 "$STATE"; free_port >"$STATE/port"; fi
  cat "$STATE/port"
}

ssh_ok() {
  ssh -p "$(port)" -i "$STATE/id_ed25519" -o BatchMode=yes -o ConnectTimeout=3 -o LogLevel=ERROR \
      -o IdentitiesOnly=yes -o UserKnownHostsFile="$STATE/known_hosts" -o StrictHostKeyChecking=yes \
      "$U@127.0.0.1" true >/dev/null 2>&1
}

setup_user() {
  if ! id "$U" >/dev/null 2>&1; then
    say "creating user $U"
    useradd -m -s /bin/bash "$U"
  fi
  usermod -p '*' "$U"  # no password but not locked: sshd (UsePAM no) refuses key logins to locked accounts
  local h; h=$(home_of)
  install -d -m 700 "$STATE"
  [ -s "$STATE/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C meshrun-skypilot-client -f "$STATE/id_ed25519"
  install -d -m 700 -o "$U" -g "$U" "$h/.ssh"
  # SkyPilot appends its own key to authorized_keys: keep ours first, keep its lines
  if ! grep -qF "$(cut -d' ' -f2 "$STATE/id_ed25519.pub")" "$h/.ssh/authorized_keys" 2>/dev/null; then
    cat "$STATE/id_ed25519.pub" >>"$h/.ssh/authorized_keys"
  fi
  chown "$U:$U" "$h/.ssh/authorized_keys"; chmod 600 "$h/.ssh/authorized_keys"
}

start_sshd() {
  install -d -m 755 /run/sshd
  install -d -m 700 "$SSHD_DIR"
  [ -s "$SSHD_DIR/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C meshrun-skypilot-login -f "$SSHD_DIR/host_ed25519"
  local p; p=$(port)
  cat >"$SSHD_DIR/sshd_config" <<EOF
# written by skypilot-slurm.sh: the Slurm login node SkyPilot reaches over SSH
Port $p
ListenAddress 127.0.0.1
HostKey $SSHD_DIR/host_ed25519
PidFile $SSHD_DIR/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
AllowUsers $U
AllowTcpForwarding yes
Subsystem sftp internal-sftp
MaxStartups 100:30:200
MaxSessions 100
EOF
  echo "[127.0.0.1]:$p $(cut -d' ' -f1,2 "$SSHD_DIR/host_ed25519.pub")" >"$STATE/known_hosts"
  if ! alive "$(pid_of "$SSHD_DIR/sshd.pid")"; then
    if ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then
      [ -n "${SKY_SLURM_PORT:-}" ] && die "port $p is taken by another process: set SKY_SLURM_PORT"
      p=$(free_port); echo "$p" >"$STATE/port"; start_sshd; return
    fi
    say "starting the login node's sshd on 127.0.0.1:$p"
    /usr/sbin/sshd -t -f "$SSHD_DIR/sshd_config" || die "bad sshd_config"
    setsid /usr/sbin/sshd -D -f "$SSHD_DIR/sshd_config" -E "$SSHD_DIR/sshd.log" </dev/null >/dev/null 2>&1 &
  fi
  local t=0
  until ssh_ok; do
    sleep 0.2; t=$((t + 1)); [ $t -lt 100 ] || die "the login node does not answer on 127.0.0.1:$p"
  done
}

prepare_uv() {
  if [ ! -x "$FIX/uvvenv/bin/uv" ]; then
    say "installing uv from PyPI into $FIX/uvvenv"
    install -d -m 755 "$STATE" "$FIX"
    rm -rf "$FIX/uvvenv"
    python3 -m venv "$FIX/uvvenv"
    "$FIX/uvvenv/bin/pip" -q --disable-pip-version-check install uv
  fi
}

fix_uv() {  # F1
  prepare_uv
  local h; h=$(home_of)
  install -d -o "$U" -g "$U" "$h/bin"
  cat >"$h/bin/curl" <<EOF
#!/bin/bash
# written by skypilot-slurm.sh: answers SkyPilot's uv installer URL offline, passes anything else to curl
for a in "\$@"; do
  if [ "\$a" = https://astral.sh/uv/install.sh ]; then
    printf '%s\n' 'set -e' 'd="\${UV_INSTALL_DIR:-\$HOME/.local/bin}"' 'mkdir -p "\$d"' \\
      'cp $FIX/uvvenv/bin/uv $FIX/uvvenv/bin/uvx "\$d"/' 'echo "uv installed to \$d (offline stand-in)"'
    exit 0
  fi
done
exec /usr/bin/curl "\$@"
EOF
  chmod 755 "$h/bin/curl"; chown "$U:$U" "$h/bin/curl"
}

prepare_python() {
  if [ ! -x "$FIX/py310/bin/python3.10" ]; then
    local src=${PY310_HOME:-$(ls -d /root/.pyenv/versions/3.10.* 2>/dev/null | sort -V | tail -1)}
    [ -n "$src" ] && [ -x "$src/bin/python3.10" ] ||
      die "no Python 3.10 found (set PY310_HOME): SkyPilot's runtime needs one and cannot download it offline"
    command -v patchelf >/dev/null || die "patchelf is missing: run backends/skypilot/scripts/install.sh"
    say "copying Python 3.10 from $src"
    rm -rf "$FIX/py310.tmp"; mkdir -p "$FIX/py310.tmp"
    tar -C "$src" --exclude='./lib/python3.10/test' --exclude='./lib/python3.10/site-packages/*' \
        --exclude='__pycache__' -cf - . | tar -C "$FIX/py310.tmp" -xf -
    patchelf --set-rpath '$ORIGIN/../lib' "$FIX/py310.tmp/bin/python3.10"
    mv -T "$FIX/py310.tmp" "$FIX/py310"
  fi
}

fix_python() {  # F2
  prepare_python
  chmod 755 "$STATE" "$FIX"
  local h; h=$(home_of)
  ln -sfn "$FIX/py310/bin/python3.10" "$h/bin/python3.10"
  chown -h "$U:$U" "$h/bin/python3.10"
  runuser -u "$U" -- "$h/bin/python3.10" -c 'import ssl, sqlite3' || die "the Python 3.10 copy does not run as $U"
}

fix_profile() {  # F3, and ~/bin on PATH for login shells and for `bash -c` alike
  local h; h=$(home_of)
  if ! grep -q 'skypilot-slurm.sh' "$h/.profile" 2>/dev/null; then
    printf '\n# skypilot-slurm.sh\nexport PATH="$HOME/bin:$PATH" SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt UV_SYSTEM_CERTS=1\n' >>"$h/.profile"
    chown "$U:$U" "$h/.profile"
  fi
  if ! grep -q 'skypilot-slurm.sh' "$h/.bashrc" 2>/dev/null; then
    printf '\n# skypilot-slurm.sh\nexport SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt UV_SYSTEM_CERTS=1\ncase ":$PATH:" in *":%s/bin:"*) ;; *) export PATH="%s/bin:$PATH" ;; esac\n' "$h" "$h" >>"$h/.bashrc"
    chown "$U:$U" "$h/.bashrc"
  fi
}

check_hosts() {  # F4
  local n
  for n in $(sinfo -h -N -o '%N' | sort -u); do
    getent hosts "$n" >/dev/null || die "the Slurm node name $n does not resolve (slurm-cluster.sh adds it to /etc/hosts unless SLURM_NODE_HOSTS=0)"
  done
}

client_config() {
  cat >"$STATE/slurm_config" <<EOF
# written by skypilot-slurm.sh: copy to \$HOME/.slurm/config of the SkyPilot client
Host $CLUSTER
  HostName 127.0.0.1
  Port $(port)
  User $U
  IdentityFile $STATE/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $STATE/known_hosts
  StrictHostKeyChecking yes
EOF
}

do_env() {
  printf 'SKY_SLURM_USER=%q\nSKY_SLURM_STATE=%q\nSKY_SLURM_PORT=%q\nSKY_SLURM_CONFIG=%q\nSKY_SLURM_INFRA=%q\nSKY_SLURM_KEY=%q\n' \
    "$U" "$STATE" "$(port)" "$STATE/slurm_config" "slurm/$CLUSTER" "$STATE/id_ed25519"
}

do_up() {
  [ "$(id -u)" = 0 ] || die "run as root"
  local t0; t0=$(date +%s%N)
  local want=${SKY_SLURM_NODES:-2}
  SLURM_NODES=$(( want > ${SLURM_NODES:-0} ? want : ${SLURM_NODES:-0} )) bash "$SLURM_SCRIPT" up >&2
  install -d -m 755 "$STATE" "$FIX"
  setup_user
  start_sshd
  fix_uv
  fix_python
  fix_profile
  check_hosts
  client_config
  say "ready in $(( ($(date +%s%N) - t0) / 1000000 )) ms: login node $U@127.0.0.1:$(port), infra slurm/$CLUSTER"
}

stop_user_procs() {
  id "$U" >/dev/null 2>&1 || return 0
  local uid pids pid i
  uid=$(id -u "$U")
  if command -v scancel >/dev/null && scontrol ping >/dev/null 2>&1; then scancel -u "$U" 2>/dev/null || true; fi
  for i in 1 2 3 4 5 6 7 8 9 10; do
    pids=$(ps -o pid= -u "$uid" 2>/dev/null | tr -d ' ' || true)
    [ -n "$pids" ] || return 0
    if [ "$i" -lt 6 ]; then kill $pids 2>/dev/null || true; else kill -9 $pids 2>/dev/null || true; fi
    sleep 0.3
  done
}

stop_ssh_clients() {  # ssh clients (ControlMaster) that SkyPilot started with our key survive `sky api stop`
  local pid cmd
  for pid in $(pgrep -x ssh 2>/dev/null || true); do
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
    case "$cmd" in *"$STATE/id_ed25519"*|*"$STATE/"*) kill "$pid" 2>/dev/null || true ;; esac
  done
}

do_down() {
  local pid; pid=$(pid_of "$SSHD_DIR/sshd.pid")
  if alive "$pid"; then
    say "stopping the login node's sshd (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 25); do alive "$pid" || break; sleep 0.2; done
    alive "$pid" && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$SSHD_DIR/sshd.pid"
  stop_ssh_clients
  stop_user_procs
  return 0
}

do_clean() {
  do_down
  if id "$U" >/dev/null 2>&1; then
    local h; h=$(home_of)
    rm -rf "$h"/.sky "$h"/.sky_clusters "$h"/.sky_provision "$h"/.sky_ssh_rc "$h"/.local "$h"/sky-user-env \
           "$h"/skypilot-runtime "$h"/sky_workdir "$h"/sky_logs "$h"/sky_templates "$h"/.meshrun "$h"/.cache \
           "/tmp/uv_cache_$(id -u "$U")"
  fi
  say "cleaned"
}

case "${1:-up}" in
  up) do_up ;;
  prepare) [ "$(id -u)" = 0 ] || die "run as root"; install -d -m 755 "$STATE" "$FIX"; prepare_uv; prepare_python ;;
  down) do_down ;;
  clean) do_clean ;;
  status) if [ -s "$STATE/port" ] && ssh_ok; then echo "login node up on 127.0.0.1:$(port)"; else echo "login node down"; exit 1; fi ;;
  env) do_env ;;
  *) echo "usage: $0 up|down|clean|prepare|status|env" >&2; exit 2 ;;
esac
