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

apt_install() {  # apt_install PKG...: install those not installed yet (root), without starting their daemons
  local have need=() p rc=0 made_policy=0
  have=" $(dpkg-query -W -f='${Package}=${Status} ' "$@" 2>/dev/null || true) "
  for p in "$@"; do
    case "$have" in *" $p=install ok installed "*) ;; *) need+=("$p") ;; esac
  done
  if [ ${#need[@]} -eq 0 ]; then say "Debian packages present"; return 0; fi
  [ "$(id -u)" = 0 ] || fail "installing ${need[*]} needs root: run this script as root" 1
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # packages must not start daemons (there may be no init system)
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
  fi
  say "apt-get install ${need[*]}"
  _apt install -y -q --no-install-recommends "${need[@]}" ||
    { _apt update -q && _apt install -y -q --no-install-recommends "${need[@]}"; } || rc=$?
  [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || fail "apt-get install ${need[*]}" "$rc"
}

_apt() {  # apt-get ARGS with its output in the log, retried while another apt/dpkg holds the lock
  local i out
  for i in $(seq 1 60); do
    if out="$(apt-get -o DPkg::Lock::Timeout=60 "$@" 2>&1)"; then
      printf '%s\n' "$out" >>"$MESHRUN_INSTALL_LOG"
      return 0
    fi
    printf '%s\n' "$out" >>"$MESHRUN_INSTALL_LOG"
    grep -qiE 'lock|dpkg was interrupted|Temporary failure' <<<"$out" || return 1
    [ "$i" = 1 ] && say "apt is busy; retrying for up to 5 minutes"
    sleep 5
  done
  return 1
}
