#!/usr/bin/env bash
# A dstack server for tests: dstack-server.sh up|down|status|restart|clean|template
#
# It listens on 127.0.0.1 on a free port, keeps everything under its own state folder
# (DSTACK_TEST_DIR, default backends/dstack/.server): HOME, DSTACK_SERVER_DIR (SQLite database, logs),
# so it never reads or writes a user's ~/.dstack. It runs offline: no backends are configured, so runs
# get no offers. The admin token is DSTACK_SERVER_ADMIN_TOKEN when set at `up`, else a random one.
#
# A fresh server starts from a copy of a database already migrated to dstack's schema (`template`, made
# once per dstack version in backends/dstack/.server-template): migrating an empty SQLite database is
# most of a first start.
#
# `up` is idempotent (a running server is reused) and, after a `down`, starts again on the same port
# with the same token and database, so runs survive a restart. It prints, and writes to STATE/env
# (mode 600), shell-sourceable lines:
#   DSTACK_TEST_URL=http://127.0.0.1:PORT  DSTACK_TEST_TOKEN=...  DSTACK_TEST_PID=...  DSTACK_TEST_LOG=...
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
state="${DSTACK_TEST_DIR:-$here/.server}"
venv="${DSTACK_SERVER_VENV:-$here/.server-venv}"
PY="$venv/bin/python"
say() { echo "[dstack-server] $*" >&2; }
die() { say "$*"; exit 1; }

alive() {  # a live process (not a zombie) with this pid
  local pid="$1" st
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  st="$(sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)"
  [ -n "$st" ] && [ "$st" != "Z" ] && [ "$st" != "X" ]
}

answers() {  # the server at $1 answers /api/server/get_info
  "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/api/server/get_info", data=b"{}", method="POST",
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

port_free() {
  # SO_REUSEADDR as the server itself binds: a port left in TIME_WAIT by our last run is still ours
  "$PY" -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1]))); s.close()' "$1" 2>/dev/null
}

pid_of() { cat "$state/pid" 2>/dev/null || true; }

template_dir="${DSTACK_SERVER_TEMPLATE:-$here/.server-template}"
version_of() { "$PY" -c 'import dstack.version as v; print(v.__version__)'; }

template() {  # a database migrated to dstack's schema and nothing else: a fresh server starts much faster
  [ -x "$venv/bin/dstack" ] || die "no dstack server in $venv; run backends/dstack/scripts/install.sh"
  local v tmp
  v="$(version_of)"
  if [ -s "$template_dir/sqlite.db" ] && [ "$(cat "$template_dir/version" 2>/dev/null)" = "$v" ]; then
    return 0
  fi
  mkdir -p "$template_dir"
  tmp="$(mktemp -d "$template_dir/tmp.XXXXXX")"
  [ -n "$tmp" ] && [ -d "$tmp" ] || die "cannot make a temporary folder in $template_dir"
  HOME="$tmp" DSTACK_SERVER_DIR="$tmp/server" "$PY" -c '
import asyncio, sqlite3, sys
from dstack._internal.server import settings
settings.init_server_data_dir()
from dstack._internal.server.db import migrate
asyncio.run(migrate())
db = sqlite3.connect(str(settings.get_server_data_dir_path() / "sqlite.db"))
db.execute("VACUUM INTO ?", (sys.argv[1],))
db.close()
' "$tmp/sqlite.db"
  echo "$v" > "$tmp/version"
  mv -f "$tmp/sqlite.db" "$template_dir/sqlite.db"
  mv -f "$tmp/version" "$template_dir/version"
  rm -rf "$tmp"
  say "database template migrated for dstack $v in $template_dir"
}

print_env() {
  umask 077
  {
    echo "DSTACK_TEST_URL=http://127.0.0.1:$(cat "$state/port")"
    echo "DSTACK_TEST_TOKEN=$(cat "$state/token")"
    echo "DSTACK_TEST_PID=$(pid_of)"
    echo "DSTACK_TEST_DIR=$state"
    echo "DSTACK_TEST_SERVER_DIR=$state/server"
    echo "DSTACK_TEST_LOG=$state/server.log"
  } > "$state/env"
  cat "$state/env"
}

up() {
  [ -x "$venv/bin/dstack" ] || die "no dstack server in $venv; run backends/dstack/scripts/install.sh"
  mkdir -p "$state/home" "$state/server"
  chmod 700 "$state"
  local pid; pid="$(pid_of)"
  if alive "$pid" && [ -f "$state/port" ] && answers "http://127.0.0.1:$(cat "$state/port")"; then
    print_env
    return 0
  fi
  if [ -n "${DSTACK_SERVER_ADMIN_TOKEN:-}" ]; then
    (umask 077; printf '%s' "$DSTACK_SERVER_ADMIN_TOKEN" > "$state/token")
  elif [ ! -s "$state/token" ]; then
    (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(16), end="")' > "$state/token")
  fi
  local port=""
  if [ -f "$state/port" ] && port_free "$(cat "$state/port")"; then
    port="$(cat "$state/port")"
  else
    port="$(free_port)"
    echo "$port" > "$state/port"
  fi
  local t0; t0=$(date +%s)
  if [ ! -e "$state/server/data/sqlite.db" ] && [ "${DSTACK_SERVER_NO_TEMPLATE:-0}" != 1 ]; then
    template
    mkdir -p "$state/server/data"
    cp "$template_dir/sqlite.db" "$state/server/data/sqlite.db"
  fi
  (
    cd "$state"
    umask 077
    export HOME="$state/home" DSTACK_SERVER_DIR="$state/server" DSTACK_DO_NOT_UPDATE_DEFAULT_PROJECT=1
    export DSTACK_SERVER_ADMIN_TOKEN; DSTACK_SERVER_ADMIN_TOKEN="$(cat "$state/token")"
    # offline: the instance catalogs cannot be fetched; fail at once instead of waiting on DNS
    export GPUHUNT_CATALOG_URL="${GPUHUNT_CATALOG_URL:-http://127.0.0.1:9}"
    export DSTACK_SERVER_LOG_FORMAT=standard
    setsid "$venv/bin/dstack" server --host 127.0.0.1 -p "$port" -y </dev/null >>"$state/server.log" 2>&1 &
    echo $! > "$state/pid"
  )
  pid="$(pid_of)"
  local deadline=$(( $(date +%s) + ${DSTACK_SERVER_START_TIMEOUT:-180} ))
  until answers "http://127.0.0.1:$port"; do
    if ! alive "$pid"; then
      tail -n 30 "$state/server.log" >&2 || true
      die "the dstack server exited while starting (log: $state/server.log)"
    fi
    if [ "$(date +%s)" -gt "$deadline" ]; then
      die "the dstack server did not answer on 127.0.0.1:$port in time (log: $state/server.log)"
    fi
    sleep 0.3
  done
  say "dstack server $("$venv/bin/dstack" --version 2>/dev/null) up on 127.0.0.1:$port in $(( $(date +%s) - t0 ))s (pid $pid)"
  print_env
}

down() {
  local pid; pid="$(pid_of)"
  if ! alive "$pid"; then
    rm -f "$state/pid"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    alive "$pid" || break
    sleep 0.2
  done
  if alive "$pid"; then
    say "the server did not stop in 20s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
  fi
  rm -f "$state/pid"
  say "stopped (pid $pid)"
}

status() {
  local pid; pid="$(pid_of)"
  if alive "$pid" && [ -f "$state/port" ] && answers "http://127.0.0.1:$(cat "$state/port")"; then
    echo "running on http://127.0.0.1:$(cat "$state/port") (pid $pid)"
  elif alive "$pid"; then
    echo "starting or not answering (pid $pid)"
    return 1
  else
    echo "stopped"
    return 3
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  restart) down; up ;;
  status) status ;;
  clean) down; rm -rf "$state" ;;
  template) template ;;
  *) echo "usage: $0 up|down|restart|status|clean|template" >&2; exit 2 ;;
esac
