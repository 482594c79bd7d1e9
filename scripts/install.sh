#!/usr/bin/env bash
# Install everything meshrun and its whole test suite need, on a fresh Debian 12 machine (run as root):
# the Debian packages each backend's real-service tests use (openssh-server, Slurm, ...), and a virtual
# environment .venv with meshrun, every backend under backends/, PyTorch (CPU) and the test tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "[install] $*"; }
t0=$(date +%s)

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
"${PIP[@]}" install -U pip 2>&1 | grep -v '^WARNING: Location' || true

# PyTorch: the CPU build (the bandwidth harness's gloo tests and the multi-node tests use it).
# Pinned so pip takes the local CPU wheel rather than a multi-GB CUDA build.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  say "installing torch (CPU)"
  "${PIP[@]}" install "torch==${MESHRUN_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
fi

say "installing meshrun and its backends"
args=(-e '.[test,bench]')
for b in backends/*/; do
  [ -f "$b/pyproject.toml" ] && args+=(-e "${b}[test]")
done
"${PIP[@]}" install "${args[@]}" 2>&1 | grep -v '^WARNING: Location' || true

# Per-backend system packages and extras (apt, service binaries, separate venvs for servers).
for s in backends/*/scripts/install.sh; do
  [ -f "$s" ] || continue
  say "running $s"
  bash "$s"
done
say "done in $(( $(date +%s) - t0 ))s"
