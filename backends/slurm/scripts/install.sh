#!/usr/bin/env bash
# Debian packages the Slurm backend's real-cluster tests need (run as root; idempotent).
# munge + slurmctld + slurmd + client tools, slurmdbd + MariaDB for sacct, slurmrestd with the JWT plugin,
# and openssh-server for the login-node tests (scripts/login-sshd.sh).
# apt/dpkg may be busy with another install on a shared machine: wait and retry.
set -euo pipefail
say() { echo "[slurm install] $*"; }
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server slurmrestd slurm-wlm-jwt-plugin curl
      openssh-server openssh-client)
need=()
have=" $(dpkg-query -W -f='${Package}=${Status} ' "${PKGS[@]}" 2>/dev/null || true) "
for p in "${PKGS[@]}"; do
  case "$have" in
    *" $p=install ok installed "*) ;;
    *) need+=("$p") ;;
  esac
done
if [ ${#need[@]} -eq 0 ]; then say "packages present"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "[slurm install] ERROR: run as root to install: ${need[*]}" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
# packages must not start their daemons (there may be no init system): policy-rc.d says no
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
fi
try() {  # retry while another apt/dpkg holds the lock
  local i
  for i in $(seq 1 60); do
    if "$@" >/tmp/meshrun-slurm-apt.log 2>&1; then return 0; fi
    if grep -qiE 'lock|Could not get lock|dpkg was interrupted' /tmp/meshrun-slurm-apt.log; then
      sleep 5; continue
    fi
    tail -20 /tmp/meshrun-slurm-apt.log >&2; return 1
  done
  tail -20 /tmp/meshrun-slurm-apt.log >&2; return 1
}
say "apt-get install ${need[*]}"
try apt-get install -y -q --no-install-recommends "${need[@]}" ||
  { try apt-get update -q && try apt-get install -y -q --no-install-recommends "${need[@]}"; }
[ "${made_policy:-0}" = 1 ] && rm -f /usr/sbin/policy-rc.d
say "installed"
