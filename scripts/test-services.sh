#!/usr/bin/env bash
# test-services.sh - the services and OS users the test suite (`bash scripts/test.sh`) may leave on this machine.
#
#   bash scripts/test-services.sh status   what runs and which test users exist (exit 0 when nothing is left)
#   bash scripts/test-services.sh down     stop all of it and remove the test users, whoever started them (root)
#
# A test run stops what it started itself when it ends (conftest.py, SessionServices): this script is for what
# an interrupted run left, or for what a run kept (MESHRUN_KEEP_SERVICES=1). `down` also stops services
# that another test run on this machine is using right now: run it when no test run is going.
# What it covers (docs/testing.md): the Slurm cluster (munged, MariaDB, slurmdbd, slurmctld, slurmd x N,
# slurmrestd), the Slurm login node's sshd, the SkyPilot-on-Slurm login node's sshd, the SSH backend's sshd pool,
# dstack test servers, and the test users mrlease, mrssh-alice, mrssh-bob, meshsky, slurmrest and the hostile
# tests' mra<N>/mrb<N>.
set -uo pipefail
cd "$(dirname "$0")/.."
STATE="${MESHRUN_TEST_SERVICES_DIR:-/run/meshrun-test-services}"
USERS=(mrlease mrssh-alice mrssh-bob "${SKY_SLURM_USER:-meshsky}" slurmrest)
say() { echo "[test-services] $*"; }

test_users() {  # the fixed names, and the hostile tests' per-run pairs
  local u
  for u in "${USERS[@]}"; do id "$u" >/dev/null 2>&1 && echo "$u"; done
  getent passwd | cut -d: -f1 | grep -E '^mr[ab][0-9]+$' || true
}
dstack_dirs() { ls -d /tmp/meshrun-dstack-test-* 2>/dev/null || true; }

status() {
  local left=0 d
  bash backends/slurm/scripts/slurm-cluster.sh status >/dev/null 2>&1 && { say "Slurm test cluster: up"; left=1; }
  bash backends/slurm/scripts/login-sshd.sh status >/dev/null 2>&1 && { say "Slurm login node sshd: up"; left=1; }
  bash backends/skypilot/scripts/skypilot-slurm.sh status >/dev/null 2>&1 && { say "SkyPilot login node sshd: up"; left=1; }
  bash backends/ssh/scripts/sshd-pool.sh status >/dev/null 2>&1 && { say "SSH backend sshd pool: up"; left=1; }
  for d in $(dstack_dirs); do
    DSTACK_TEST_DIR="$d" bash backends/dstack/scripts/dstack-server.sh status >/dev/null 2>&1 &&
      { say "dstack test server in $d: up"; left=1; }
  done
  local users; users=$(test_users | tr '\n' ' ')
  [ -n "$users" ] && { say "test users: $users"; left=1; }
  [ "$left" = 0 ] && say "nothing left"
  return "$left"
}

down() {
  [ "$(id -u)" = 0 ] || { say "run as root"; exit 1; }
  local rc=0 d u
  run() { local what=$1; shift; "$@" >/dev/null 2>&1 && say "$what: stopped" || { say "$what: FAILED ($*)"; rc=1; }; }
  run "SkyPilot login node" bash backends/skypilot/scripts/skypilot-slurm.sh down
  run "Slurm login node" bash backends/slurm/scripts/login-sshd.sh down
  run "SSH sshd pool" bash backends/ssh/scripts/sshd-pool.sh down
  for d in $(dstack_dirs); do
    run "dstack server in $d" env DSTACK_TEST_DIR="$d" bash backends/dstack/scripts/dstack-server.sh down
    rm -rf "$d"
  done
  run "Slurm test cluster" bash backends/slurm/scripts/slurm-cluster.sh down
  for u in $(test_users); do
    pkill -KILL -u "$u" 2>/dev/null; sleep 0.2
    userdel -r -f "$u" >/dev/null 2>&1; id "$u" >/dev/null 2>&1 && { say "user $u: NOT removed"; rc=1; } || say "user $u: removed"
  done
  rm -rf "$STATE"
  return "$rc"
}

case "${1:-}" in
  status) status ;;
  down) down ;;
  *) echo "usage: $0 status|down" >&2; exit 2 ;;
esac
