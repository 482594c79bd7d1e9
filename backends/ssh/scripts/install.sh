#!/usr/bin/env bash
# What the SSH backend's real-server tests need on a fresh Debian 12 machine (run as root): OpenSSH
# server and client, iproute2 (network namespaces) and util-linux (unshare). Idempotent; retries while
# another apt/dpkg holds the lock.
set -euo pipefail
say() { echo "[ssh install] $*"; }

need=()
for p in openssh-server openssh-client iproute2 util-linux; do
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"install ok installed"* ]] || need+=("$p")
done
if [ ${#need[@]} -eq 0 ]; then
  say "system packages present"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  say "missing ${need[*]}; run this script as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/meshrun-ssh-apt.XXXXXX)
for attempt in $(seq 1 30); do
  # another engineer's apt or dpkg may hold the lock: wait and retry rather than fail
  if apt-get -o DPkg::Lock::Timeout=60 update -q >"$log" 2>&1 &&
     apt-get -o DPkg::Lock::Timeout=60 install -y -q --no-install-recommends "${need[@]}" >>"$log" 2>&1; then
    say "installed ${need[*]}"
    rm -f "$log"
    exit 0
  fi
  if grep -qiE 'lock|Could not get|Temporary failure' "$log"; then
    say "apt busy (attempt $attempt), retrying in 5 s"
    sleep 5
    continue
  fi
  tail -20 "$log" >&2
  say "apt-get install ${need[*]} failed" >&2
  exit 1
done
tail -20 "$log" >&2
say "apt stayed locked; giving up" >&2
exit 1
