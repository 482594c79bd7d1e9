#!/usr/bin/env bash
# Run scripts/slurm-cluster.sh from nothing, in private mount and network namespaces, so the shared test
# cluster of this machine is not touched: up from scratch, a no-op up, growing, reset, up again, down.
# Usage (root): unshare --mount --net --propagation private bash isolated_cluster.sh
# Prints "STEP name seconds" lines and the checks; exits nonzero on the first failure.
set -euo pipefail
S=$(cd "$(dirname "$0")/../scripts" && pwd)/slurm-cluster.sh
# an address besides loopback: slurmdbd resolves its listening address with AI_ADDRCONFIG
ip link set lo up
ip link add mrveth0 type veth peer name mrveth1
ip addr add 10.255.254.1/24 dev mrveth0
ip link set mrveth0 up && ip link set mrveth1 up
mk() { mkdir -p "$1"; mount -t tmpfs -o "mode=${3:-755}" tmpfs "$1"; if [ -n "${2:-}" ]; then chown "$2" "$1"; fi; }
mk /etc/slurm; mk /run/slurm; mk /var/spool/slurmctld; mk /var/spool/slurmd; mk /var/log/slurm
mk /run/munge munge:munge; mk /var/log/munge munge:munge 700; mk /var/lib/munge munge:munge 700
mk /run/meshrun-slurm; mk /run/mysqld mysql:mysql; mk /var/lib/mysql mysql:mysql; mk /run/slurmrestd
hosts=$(mktemp); cp /etc/hosts "$hosts"; mount --bind "$hosts" /etc/hosts
step() { local name=$1 t0; shift; t0=$(date +%s%N); "$@"; echo "STEP $name $(( ($(date +%s%N) - t0) / 1000000 ))ms"; }
check() { if ! eval "$1"; then echo "CHECK FAILED: $1" >&2; bash "$S" down >/dev/null 2>&1 || true; exit 1; fi; echo "ok: $1"; }
trap 'bash "$S" down >/dev/null 2>&1 || true; rm -f "$hosts"' EXIT

export SLURM_INSTALL=0 SLURM_UP_TIMEOUT=60
step fresh-up bash "$S" up
check 'bash "$S" status >/dev/null'
check '[ "$(sinfo -h -N -o %N | sort -u | wc -l)" = 4 ]'
check 'grep -q "^127.0.0.1 node1 node2 node3 node4 " /etc/hosts'
check '. /run/meshrun-slurm/cluster.env && [ "$SLURM_GPUS" = 4 ] && [ -n "$SLURM_REST_URL" ]'
cd /tmp
j=$(sbatch --parsable -N2 --gres=gpu:2 --output=/dev/null --wrap 'srun true')
for _ in $(seq 1 100); do [ "$(squeue -h --states=all -j "$j" -o %T)" = COMPLETED ] && break; sleep 0.2; done
check '[ "$(squeue -h --states=all -j '"$j"' -o %T)" = COMPLETED ]'
step noop-up bash "$S" up
SLURM_NODES=2 step smaller-request-keeps-the-cluster bash "$S" up
check '[ "$(sinfo -h -N -o %N | sort -u | wc -l)" = 4 ]'
SLURM_CPUS=8 step grow bash "$S" up
check '[ "$(sinfo -h -o %c)" = 8 ]'
step reset bash "$S" reset
check '! bash "$S" status >/dev/null'
check '[ ! -e /run/meshrun-slurm/cluster.env ]'
step up-after-reset bash "$S" up
check '[ "$(sinfo -h -o %c)" = 4 ]'
check '[ -n "$(sacctmgr -n show cluster format=cluster)" ]'
step down bash "$S" down
check '! grep -q "meshrun slurm-cluster.sh" /etc/hosts'
check '! bash "$S" status >/dev/null'
echo "ALL OK"
