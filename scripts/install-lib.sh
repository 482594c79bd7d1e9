# Shared by scripts/install.sh and backends/*/scripts/install.sh (sourced): one progress line per step, the
# step's own output (pip, apt) in one log file, and a failure that says what failed, shows the end of the log
# and exits with the step's status. The log is $MESHRUN_INSTALL_LOG (scripts/install.sh sets .venv/install.log;
# a backend script run alone gets a fresh file under /tmp). Set SAY_AS for the prefix of the lines.
if [ -z "${MESHRUN_INSTALL_LOG:-}" ]; then
  MESHRUN_INSTALL_LOG="$(mktemp /tmp/meshrun-install.XXXXXX)"
fi
export MESHRUN_INSTALL_LOG

say() { echo "[${SAY_AS:-install}] $*"; }

fail() {  # fail WHAT STATUS: say what failed, show the end of the log, exit with STATUS
  local what=$1 rc=${2:-1}
  [ "$rc" != 0 ] || rc=1
  echo "[${SAY_AS:-install}] FAILED (exit $rc): $what" >&2
  tail -n 15 "$MESHRUN_INSTALL_LOG" | sed 's/^/  | /' >&2
  echo "[${SAY_AS:-install}] full log: $MESHRUN_INSTALL_LOG" >&2
  exit "$rc"
}

step() {  # step DESCRIPTION COMMAND [ARGS...]: run the command with its output in the log
  local what=$1 rc=0
  shift
  say "$what"
  printf '=== %s %s\n$ %s\n' "$(date -u +%FT%TZ)" "$what" "$*" >>"$MESHRUN_INSTALL_LOG"
  "$@" >>"$MESHRUN_INSTALL_LOG" 2>&1 || rc=$?
  [ "$rc" = 0 ] || fail "$what: $*" "$rc"
}
