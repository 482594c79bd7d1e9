#!/usr/bin/env bash
# login-sshd.sh - a "login node" for the Slurm backend's login-node tests: an sshd on 127.0.0.1 (a free port),
# key-only, accepting one generated key, through which the Slurm tools of this host are used.
#
#   login-sshd.sh up       start (idempotent), print the facts as KEY=value lines
#   login-sshd.sh down     stop it
#   login-sshd.sh status   exit 0 when it answers
#
# Nothing outside $DIR changes: the accepted key is listed in $DIR/authorized_keys (AuthorizedKeysFile), not in
# any home directory. The login user is root (LOGIN_USER overrides), so the jobs can use this host's Python.
#
# Outputs in $DIR (default /run/meshrun-slurm/login): sshd_config, host_ed25519, id_ed25519 (client key),
# known_hosts, port, sshd.pid, sshd.log, login.env (HOST, PORT, USER, KEY, KNOWN_HOSTS).
set -euo pipefail
DIR=${LOGIN_SSHD_DIR:-/run/meshrun-slurm/login}
USER_=${LOGIN_USER:-root}

say() { echo "[login-sshd] $*" >&2; }
die() { echo "[login-sshd] ERROR: $*" >&2; [ -s "$DIR/sshd.log" ] && tail -n 8 "$DIR/sshd.log" >&2; exit 1; }
alive() {
  local s
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] && read -r s 2>/dev/null <"/proc/$1/stat" || return 1
  s=${s##*) }; s=${s%% *}; [ "$s" != Z ] && [ "$s" != X ]
}
pid() { if [ -s "$DIR/sshd.pid" ]; then cat "$DIR/sshd.pid"; fi; }
answers() {
  ssh -q -o BatchMode=yes -o IdentitiesOnly=yes -o ConnectTimeout=3 -o UserKnownHostsFile="$DIR/known_hosts" \
    -o StrictHostKeyChecking=yes -i "$DIR/id_ed25519" -p "$(cat "$DIR/port")" "$USER_@127.0.0.1" true
}
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
facts() {
  cat >"$DIR/login.env" <<EOF
LOGIN_HOST=127.0.0.1
LOGIN_PORT=$(cat "$DIR/port")
LOGIN_USER=$USER_
LOGIN_KEY=$DIR/id_ed25519
LOGIN_KNOWN_HOSTS=$DIR/known_hosts
EOF
  cat "$DIR/login.env"
}

up() {
  [ "$(id -u)" = 0 ] || die "run as root"
  command -v /usr/sbin/sshd >/dev/null || die "sshd is not installed (apt-get install openssh-server)"
  install -d -m 700 "$DIR"
  if alive "$(pid)" && [ -s "$DIR/port" ] && answers 2>/dev/null; then facts; return 0; fi
  [ -s "$DIR/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C meshrun-slurm-login-host -f "$DIR/host_ed25519"
  [ -s "$DIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C meshrun-slurm-login-client -f "$DIR/id_ed25519"
  install -m 600 "$DIR/id_ed25519.pub" "$DIR/authorized_keys"
  local port; port=$(free_port); echo "$port" >"$DIR/port"
  echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$DIR/host_ed25519.pub")" >"$DIR/known_hosts"
  cat >"$DIR/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $DIR/host_ed25519
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowUsers $USER_
Subsystem sftp internal-sftp
MaxStartups 100:30:200
MaxSessions 50
EOF
  install -d -m 755 /run/sshd
  if alive "$(pid)"; then kill "$(pid)" 2>/dev/null || true; sleep 0.2; fi
  setsid /usr/sbin/sshd -D -f "$DIR/sshd_config" -E "$DIR/sshd.log" </dev/null >/dev/null 2>&1 &
  local t=0
  until answers 2>/dev/null; do
    sleep 0.1; t=$((t + 1)); [ $t -lt 100 ] || die "sshd on port $port does not answer"
  done
  say "up on 127.0.0.1:$port (user $USER_)"
  facts
}

down() {
  local p; p=$(pid)
  if alive "$p"; then
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$p" || break; sleep 0.1; done
    alive "$p" && kill -9 "$p" 2>/dev/null || true
  fi
  rm -f "$DIR/sshd.pid"
  return 0
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) alive "$(pid)" && answers ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
