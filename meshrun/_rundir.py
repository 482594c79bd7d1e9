"""This user's private directory for meshrun's sockets (the warm fork server's, the command server's).

A socket is only trusted where no one else can have put it: a directory this user owns and no one else can
enter, checked with ``lstat`` (a symlink never is one) and never chmodded unless meshrun made it a moment ago.
Standard library only: the command-line client imports it before anything else.
"""

from __future__ import annotations

import os
import sys

_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        sys.stderr.write(f"meshrun: warning: {msg}\n")
        sys.stderr.flush()


_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to ~107 bytes


def socket_dir(*, warn: bool = True) -> str | None:
    """This user's private directory for fork-server sockets (created 0700 if missing), or None if the one
    to use is not private (owned by someone else, a symlink, or open to others), with a one-line warning."""
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and _private_problem(xdg, uid) is None:
        d = os.path.join(xdg, "meshrun")
        if len(d.encode()) + 20 <= _SOCKET_PATH_MAX:
            return _private_dir(d, uid, warn)
    return _private_dir(os.path.join("/tmp", f"meshrun-{uid}"), uid, warn)


def _private_problem(path: str, uid: int) -> str | None:
    """Why ``path`` is not a private directory of ``uid`` (checked with lstat: a symlink never is), or None."""
    import stat

    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"is owned by {_user_of(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}"
    if st.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):04o} (others may enter it)"
    return None


def _private_dir(path: str, uid: int, warn: bool) -> str | None:
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        if warn:
            _warn_once(f"cannot create the fork server directory {path} ({e.strerror}); jobs start as "
                              "fresh processes")
        return None
    if created:  # ours, made a moment ago: exactly 0700 whatever the umask (never chmod one we did not make)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_uid == uid:
                    os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
        except OSError:
            pass
    why = _private_problem(path, uid)
    if why is None:
        return path
    if warn:
        fix = (f"chmod 700 {path}" if why.startswith("has mode")
               else f"remove {path}, or set XDG_RUNTIME_DIR to a private directory of yours")
        _warn_once(f"not using the fork server: its socket directory {path} {why}, not a private directory "
                          f"of uid {uid}; jobs start as fresh processes (fix: {fix})")
    return None


def _user_of(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


WARM_FILE_DAYS = 14  # a fork server's import list unused this long belongs to a home or agent long gone


def prune_warm_files(d: str, *, days: float = WARM_FILE_DAYS) -> int:
    """Remove the fork servers' import lists (``agent-*.sock.warm.json``) in the private socket directory ``d``
    that no server has written for ``days``: each MESHRUN_HOME and agent version leaves one. Only regular
    files of this user's are removed (checked with lstat: never through a link). Returns how many."""
    import stat
    import time

    cutoff = time.time() - days * 86400
    gone = 0
    try:
        names = os.listdir(d)
    except OSError:
        return 0
    for name in names:
        if not (name.startswith("agent-") and name.endswith(".sock.warm.json")):
            continue
        p = os.path.join(d, name)
        try:
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mtime < cutoff:
                os.unlink(p)
                gone += 1
        except OSError:
            pass
    return gone
