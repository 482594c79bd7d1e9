#!/usr/bin/env bash
# Install everything meshrun and its whole test suite need, on a fresh Debian 12 machine (run as root):
# the Debian packages each backend's real-service tests use (openssh-server, Slurm, ...), chromium for the
# dashboard's browser tests, and a virtual environment .venv with meshrun, every backend under backends/,
# PyTorch (CPU) and the test tools.
#
# One line per step. What pip and apt print goes to a log file (.venv/install.log, or $MESHRUN_INSTALL_LOG);
# a step that fails prints its last lines and the log's path, and the script exits non-zero.
# Fast when nothing changed: the editable installs are redone only when a pyproject.toml or meshrun's version
# (or the Python, or the checkout's location) changed since the last successful run, or an installed
# distribution no longer points at this checkout; the backends' scripts only check what they would install.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
PY=${PYTHON:-python3}
t0=$(date +%s)

if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PY --version)"
  $PY -m venv .venv
  new_venv=1
fi
export MESHRUN_INSTALL_LOG="${MESHRUN_INSTALL_LOG:-$root/.venv/install.log}"
: >"$MESHRUN_INSTALL_LOG"
. scripts/install-lib.sh  # say, step, fail
PIP=(.venv/bin/python -m pip --disable-pip-version-check --no-input)

if [ "${new_venv:-0}" = 1 ]; then
  step "upgrading pip in the new .venv" "${PIP[@]}" install -U pip
fi

# Debian's chromium, then per-backend system packages and extras (apt, service binaries, separate venvs for
# servers), one script after the other, beside the pip installs below (they share nothing with .venv): the
# install takes about the time of the longer of the two instead of their sum.
backend_installs() {
  local s rc
  # Debian's chromium: the dashboard's browser tests drive it through Playwright (tests/test_dashboard.py);
  # Playwright's own browser download is never used
  apt_install chromium
  for s in backends/*/scripts/install.sh; do
    [ -f "$s" ] || continue
    rc=0
    bash "$s" || rc=$?
    [ "$rc" = 0 ] || { echo "[install] FAILED (exit $rc): $s (full log: $MESHRUN_INSTALL_LOG)" >&2; return "$rc"; }
  done
}
backend_installs &
backends_pid=$!
trap 'kill "$backends_pid" 2>/dev/null || true' EXIT  # a failed step below stops them too

# PyTorch: the CPU build (the bandwidth harness's gloo tests and the multi-node tests use it).
# Pinned so pip takes the local CPU wheel rather than a multi-GB CUDA build.
torch_version="${MESHRUN_TORCH_VERSION:-2.13.0}"
have_torch="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
if [ -n "$have_torch" ]; then
  say "torch $have_torch present"
else
  step "installing torch $torch_version (CPU)" "${PIP[@]}" install "torch==$torch_version"
fi

# meshrun and every backend, editable, with their test extras
args=(-e '.[test,bench]')
dists=(meshrun=.)
for b in backends/*/; do
  b="${b%/}"
  [ -f "$b/pyproject.toml" ] || continue
  args+=(-e "$b[test]")
  dists+=("meshrun-$(basename "$b")=$b")
done
from_here() {  # every distribution is installed in editable mode from its folder of this checkout
  .venv/bin/python -I - "${dists[@]}" <<'PY'  # -I: not the build folders' *.egg-info
import importlib.metadata as m, json, os, sys
for item in sys.argv[1:]:
    name, _, folder = item.partition("=")
    want = "file://" + os.path.abspath(folder)
    try:
        url = json.loads(m.distribution(name).read_text("direct_url.json") or "{}")
    except m.PackageNotFoundError:
        sys.exit(f"{name} is not installed")
    if url.get("url") != want or not url.get("dir_info", {}).get("editable"):
        sys.exit(f"{name} is installed from {url.get('url')}, not editable from {want}")
PY
}
stamp=.venv/.meshrun-install.stamp
want="$( { echo "$root"; .venv/bin/python --version; printf '%s\n' "${args[@]}"; cat pyproject.toml backends/*/pyproject.toml meshrun/_version.py; } \
         | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && from_here >/dev/null 2>&1; then
  say "meshrun and its $(( ${#dists[@]} - 1 )) backends already installed from this checkout (pyproject files unchanged)"
else
  rm -f "$stamp"
  step "installing meshrun and its backends (editable: ${dists[*]%%=*})" "${PIP[@]}" install "${args[@]}"
  from_here >>"$MESHRUN_INSTALL_LOG" 2>&1 || fail "the editable installs do not point at $root" 1
  echo "$want" >"$stamp"
fi

rc=0
wait "$backends_pid" || rc=$?
trap - EXIT
[ "$rc" = 0 ] || exit "$rc"
say "done in $(( $(date +%s) - t0 ))s (details in $MESHRUN_INSTALL_LOG)"
