#!/usr/bin/env bash
# What the SkyPilot backend's real-service tests need besides the Python packages (run as root; idempotent):
# openssh-server (the Slurm login node SkyPilot reaches over SSH) and patchelf (for the Python 3.10 copy
# SkyPilot's runtime needs offline). skypilot itself comes from backends/skypilot/pyproject.toml.
# The Slurm packages are installed by backends/slurm/scripts/install.sh.
set -euo pipefail
SAY_AS="skypilot install"
. "$(dirname "$0")/../../../scripts/install-lib.sh"  # say, step, fail
PKGS=(openssh-server openssh-client patchelf rsync)
need=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
prepare() {  # the uv binary and Python 3.10 copy the SkyPilot-on-Slurm tests need offline
  # not fatal: without them only the SkyPilot-on-Slurm tests cannot run, and they fail saying why
  if [ "$(id -u)" = 0 ]; then
    say "uv and Python 3.10 for the SkyPilot-on-Slurm tests (skypilot-slurm.sh prepare)"
    bash "$(dirname "$0")/skypilot-slurm.sh" prepare >>"$MESHRUN_INSTALL_LOG" 2>&1 ||
      say "WARNING: skypilot-slurm.sh prepare failed (see $MESHRUN_INSTALL_LOG); the end-to-end tests will say why" >&2
  fi
}
if [ ${#need[@]} -eq 0 ]; then say "packages present"; prepare; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "[skypilot install] ERROR: run as root to install: ${need[*]}" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if [ ! -e /usr/sbin/policy-rc.d ]; then  # packages must not start daemons
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
fi
try() {  # apt may be busy with another install on a shared machine: wait and retry
  local i
  for i in $(seq 1 60); do
    if "$@" >/tmp/meshrun-skypilot-apt.log 2>&1; then return 0; fi
    if grep -qiE 'lock|dpkg was interrupted' /tmp/meshrun-skypilot-apt.log; then sleep 5; continue; fi
    tail -20 /tmp/meshrun-skypilot-apt.log >&2; return 1
  done
  tail -20 /tmp/meshrun-skypilot-apt.log >&2; return 1
}
say "apt-get install ${need[*]}"
try apt-get install -y -q --no-install-recommends "${need[@]}" ||
  { try apt-get update -q && try apt-get install -y -q --no-install-recommends "${need[@]}"; }
if [ "${made_policy:-0}" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
say "installed"
prepare
