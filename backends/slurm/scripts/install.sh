#!/usr/bin/env bash
# Debian packages the Slurm backend's real-cluster tests need (run as root; idempotent).
# munge + slurmctld + slurmd + client tools, slurmdbd + MariaDB for sacct, slurmrestd with the JWT plugin,
# and openssh-server for the login-node tests (scripts/login-sshd.sh).
# apt/dpkg may be busy with another install on a shared machine: apt_install (scripts/install-lib.sh) waits
# and retries; apt's output goes to $MESHRUN_INSTALL_LOG.
set -euo pipefail
SAY_AS="slurm install"
. "$(dirname "$0")/../../../scripts/install-lib.sh"  # say, fail, apt_install
apt_install munge slurmctld slurmd slurm-client slurmdbd mariadb-server slurmrestd slurm-wlm-jwt-plugin curl \
            openssh-server openssh-client
