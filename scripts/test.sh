#!/usr/bin/env bash
# Install everything, type-check meshrun and the backends (mypy, configured in pyproject.toml), then run the
# whole test suite (core and every backend, real services included).
# This is the README's test command and what CI runs (.ci/run). Extra arguments go to pytest (one run).
#
# Without arguments the suite runs as two pytest processes side by side, with mypy beside them: the tests of the
# shared Slurm cluster (marker slurm_cluster: backends/slurm, backends/skypilot, and the core's few Slurm tests)
# in one, in order, and everything else in the other. Most of a service test's time is waiting for a daemon, so
# this takes about two thirds of one sequential run on 2 cores. The Slurm process's output follows the other's.
# MESHRUN_TEST_SERIAL=1 runs the suite as one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PYTHONUNBUFFERED=1
PYTEST=(.venv/bin/python -m pytest -ra)
t0=$(date +%s)

if [ $# -gt 0 ] || [ "${MESHRUN_TEST_SERIAL:-0}" = 1 ]; then
  .venv/bin/python -m mypy  # a type error fails the run here, before the tests
  echo "[test] mypy took $(( $(date +%s) - t0 ))s"
  exec "${PYTEST[@]}" --durations=25 "$@"
fi

logs=$(mktemp -d /tmp/meshrun-test.XXXXXX)
.venv/bin/python -m mypy >"$logs/mypy.log" 2>&1 &
mypy_pid=$!
"${PYTEST[@]}" --durations=15 -m slurm_cluster >"$logs/slurm.log" 2>&1 &
slurm_pid=$!
echo "[test] mypy and the Slurm cluster's tests (-m slurm_cluster) run beside this (their output follows)"
rc=0
"${PYTEST[@]}" --durations=25 -m "not slurm_cluster" || rc=$?
echo "[test] the rest: exit $rc after $(( $(date +%s) - t0 ))s"

src=0
wait "$slurm_pid" || src=$?
echo
echo "================ the Slurm cluster's tests (-m slurm_cluster): exit $src ================"
cat "$logs/slurm.log"
mrc=0
wait "$mypy_pid" || mrc=$?
echo "================ mypy: exit $mrc ================"
cat "$logs/mypy.log"
echo "[test] done in $(( $(date +%s) - t0 ))s: the rest exit $rc, Slurm cluster's tests exit $src, mypy exit $mrc"
rm -rf "$logs"
[ "$rc" = 0 ] && [ "$src" = 0 ] && [ "$mrc" = 0 ]
