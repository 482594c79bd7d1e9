#!/usr/bin/env bash
# Install everything, type-check meshrun and the backends (mypy, configured in pyproject.toml), then run the
# whole test suite (core and every backend, real services included).
# This is the README's test command and what CI runs (.ci/run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PYTHONUNBUFFERED=1
t0=$(date +%s)
.venv/bin/python -m mypy  # a type error fails the run here, before the tests
echo "[test] mypy took $(( $(date +%s) - t0 ))s"
exec .venv/bin/python -m pytest -ra --durations=25 "$@"
