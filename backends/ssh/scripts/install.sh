#!/usr/bin/env bash
# What the SSH backend's real-server tests need on a fresh Debian 12 machine (run as root): OpenSSH
# server and client, iproute2 (network namespaces) and util-linux (unshare). Idempotent; retries while
# another apt/dpkg holds the lock; apt's output goes to $MESHRUN_INSTALL_LOG (scripts/install-lib.sh).
set -euo pipefail
SAY_AS="ssh install"
. "$(dirname "$0")/../../../scripts/install-lib.sh"  # say, fail, apt_install
apt_install openssh-server openssh-client iproute2 util-linux
