#!/usr/bin/env bash
# What the dstack backend's real-server tests need: a dstack server (dstack[server], pinned) in its own
# virtual environment, backends/dstack/.server-venv, so its many dependencies stay out of the project's
# .venv (the client side, `dstack` for its configuration models, comes with meshrun-dstack[test]); and a
# database template migrated to dstack's schema, so that test servers start fast.
# Idempotent: a second run only checks. Run as root on a fresh Debian 12 machine by scripts/install.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.server-venv"
version="${DSTACK_SERVER_VERSION:-0.22.5}"
PY="${PYTHON:-python3}"
SAY_AS="install dstack"
. "$here/../../scripts/install-lib.sh"  # say, step, fail

have="$("$venv/bin/python" -c 'import dstack.version as v; print(v.__version__)' 2>/dev/null || true)"
if [ "$have" = "$version" ] && [ -x "$venv/bin/dstack" ]; then
  say "dstack server $version already in $venv"
else
  if [ ! -x "$venv/bin/python" ]; then
    step "creating $venv with $($PY --version)" "$PY" -m venv "$venv"
  fi
  pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
  step "upgrading pip in $venv" "${pip[@]}" install -U pip
  step "installing dstack[server]==$version into $venv" "${pip[@]}" install "dstack[server]==$version"
  step "checking that the dstack server imports" "$venv/bin/python" -c 'import dstack._internal.server.main'
fi
step "database template for dstack $version (made once per version)" bash "$here/scripts/dstack-server.sh" template
