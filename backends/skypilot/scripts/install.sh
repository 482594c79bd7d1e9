#!/usr/bin/env bash
# What the SkyPilot backend's real-service tests need besides the Python packages (run as root; idempotent):
# openssh-server (the Slurm login node SkyPilot reaches over SSH) and patchelf (for the Python 3.10 copy
# SkyPilot's runtime needs offline). skypilot itself comes from backends/skypilot/pyproject.toml.
# The Slurm packages are installed by backends/slurm/scripts/install.sh.
set -euo pipefail
SAY_AS="skypilot install"
. "$(dirname "$0")/../../../scripts/install-lib.sh"  # say, fail, apt_install
prepare() {  # the uv binary and Python 3.10 copy the SkyPilot-on-Slurm tests need offline
  # not fatal: without them only the SkyPilot-on-Slurm tests cannot run, and they fail saying why
  if [ "$(id -u)" = 0 ]; then
    say "uv and Python 3.10 for the SkyPilot-on-Slurm tests (skypilot-slurm.sh prepare)"
    bash "$(dirname "$0")/skypilot-slurm.sh" prepare >>"$MESHRUN_INSTALL_LOG" 2>&1 ||
      say "WARNING: skypilot-slurm.sh prepare failed (see $MESHRUN_INSTALL_LOG); the end-to-end tests will say why" >&2
  fi
}
apt_install openssh-server openssh-client patchelf rsync
prepare
