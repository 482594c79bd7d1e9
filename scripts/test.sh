#!/usr/bin/env bash
# Install everything, then run the whole test suite (core and every backend, real services included).
# This is the README's test command and what CI runs (.ci/run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -ra --durations=25 "$@"
