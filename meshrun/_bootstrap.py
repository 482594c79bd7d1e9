"""Verified boot and install of meshrun's programs on another machine: a stdlib-only program (Python 3.8+) a
backend sends whole as ``python3 -c <this file's text>`` (``meshrun.backend.boot_program()``), so that nothing
unverified is ever run there. It is the remote side of the SSH backend's host agent and helper, and of the
Slurm backend's agent on a cluster reached through a login node.

``python3 -c PROGRAM [-m MODULE PATH SHA256]... PATH SHA256 ARGS...`` (boot) opens each file with
``O_NOFOLLOW``, checks it (regular, the user's, writable by nobody else, in a directory of the user's or
root's that no one else may write to), reads it, hashes the bytes it read and runs exactly those bytes:
``-m`` files become importable modules, the last one runs as ``__main__`` with ``ARGS``. Verification and
execution are one process, so nothing can swap the file between the check and the run. A failed check exits
with status 3 (``meshrun-boot: stale: ...`` on stderr: install again) or 4 (``meshrun-boot: unsafe: ...``:
the directory must be fixed first).

``python3 -c PROGRAM --install DIR`` keeps files named by their content (``agent-<sha256[:16]>.py``) in
``DIR``: a JSON manifest line ``[[name, size, sha256], ...]`` then the files' bytes on stdin; one JSON line
``{"ok", "dir", "kept", "installed"}`` (or ``"error"``, ``"unsafe"``) on stdout. It checks DIR, its parent and
every directory above (no other user may write to them unless they are sticky; DIR and its parent belong to
the user or root; no symbolic link of another user on the way) and refuses, naming the path, its owner and
mode and the fix, when one fails. A file already there is kept only when it is a regular file (opened with
``O_NOFOLLOW``) of the user's, writable by nobody else, whose full SHA-256 is the expected one; anything else
is replaced: the new content goes to a fresh name created with ``O_EXCL`` in DIR and is renamed over it.
"""
import sys

if __name__ == "__main__" and sys.path and sys.path[0] in ("", "."):
    del sys.path[0]  # run as ``-c``: nothing is imported from the current directory

import hashlib
import json
import os
import stat

STALE_EXIT = 3
UNSAFE_EXIT = 4
UID = os.getuid()


class Unsafe(Exception):
    """A directory other users may write to (or a link of theirs): fixed by hand, not by installing again."""


class Stale(Exception):
    """A file that is not the verified copy (missing, replaced, a link, someone else's): install again."""


def who(uid):
    """A user's name for messages."""
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except Exception:
        return "uid %d" % uid


def check_dir(path, own):
    """``path`` is a directory no other user may write to (unless sticky); with ``own``, the user's or root's."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise Unsafe("%s is not a directory" % path)
    m = st.st_mode
    why = fix = None
    if own and st.st_uid not in (UID, 0):
        why, fix = "it belongs to another user, not to you", "use a directory of your own"
    elif (m & 0o002 or (own and m & 0o020)) and not m & stat.S_ISVTX:
        why = "other users may write to it"
        fix = "chmod go-w %s (or chmod +t %s), or use a directory of your own" % (path, path)
    if why:
        raise Unsafe("%s (owner %s, mode %04o): %s; fix: %s" % (path, who(st.st_uid), m & 0o7777, why, fix))


def read_checked(path, cap):
    """The bytes of ``path``, opened without following a link: a regular file of the user's that nobody else
    may write to, at most ``cap`` bytes (else :class:`Stale`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        if os.path.islink(path):
            raise Stale("it is a symbolic link")
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Stale("not a regular file")
        if st.st_uid != UID:
            raise Stale("it belongs to %s" % who(st.st_uid))
        if st.st_mode & 0o022:
            raise Stale("other users may write to it (mode %04o)" % (st.st_mode & 0o7777))
        parts, n = [], 0
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            n += len(b)
            if n > cap:
                raise Stale("larger than %d bytes" % cap)
            parts.append(b)
        return b"".join(parts)
    finally:
        os.close(fd)


CAP = 1 << 24


def die(kind, msg):
    """Refuse to boot: ``stale`` (exit 3, install again) or ``unsafe`` (exit 4, fix the directory)."""
    sys.stderr.write("meshrun-boot: %s: %s\n" % (kind, msg))
    sys.stderr.flush()
    os._exit(STALE_EXIT if kind == "stale" else UNSAFE_EXIT)


def boot(argv):
    """Check every file of ``argv`` (``[-m NAME PATH SHA]... PATH SHA ARGS...``) and run the checked bytes; the
    program's own globals are cleared first (so only the local names below are used after that)."""
    todo = []
    while argv[:1] == ["-m"]:
        todo.append((argv[1], argv[2], argv[3]))
        argv = argv[4:]
    todo.append((None, argv[0], argv[1]))
    args = argv[2:]
    done = []
    for name, path, want in todo:
        path = os.path.abspath(path)
        try:
            check_dir(os.path.dirname(path), True)
            check_dir(os.path.dirname(os.path.dirname(path)), True)
        except Unsafe as e:
            die("unsafe", str(e))
        except OSError as e:
            die("stale", "%s: %s" % (path, e.strerror or e))
        try:
            data = read_checked(path, CAP)
        except Stale as e:
            die("stale", "%s: %s" % (path, e))
        except OSError as e:
            die("stale", "%s: %s" % (path, e.strerror or e))
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            die("stale", "%s: its content is not the expected one (sha256 %s, expected %s)" % (path, got, want))
        done.append((name, path, data))
    import types
    import sys as s
    s.path.insert(0, os.path.dirname(done[-1][1]))
    for name, path, data in done[:-1]:
        mod = types.ModuleType(name)
        mod.__file__ = path
        s.modules[name] = mod
        exec(compile(data, path, "exec"), mod.__dict__)
    name, path, data = done[-1]
    g = s.modules["__main__"].__dict__
    for k in [k for k in g if not k.startswith("__")]:
        del g[k]
    g["__file__"] = path
    s.argv = [path] + list(args)
    exec(compile(data, path, "exec"), g)


def check_chain(path, own_last):
    """Every directory from / down to path: nobody else may write to it unless sticky; the last own_last of
    them belong to the user or root; a symbolic link on the way belongs to the user or root."""
    for p in (path, os.path.realpath(path)):
        cur = "/"
        parts = [x for x in p.split("/") if x]
        check_dir(cur, len(parts) < own_last)
        for i, part in enumerate(parts):
            cur = os.path.join(cur, part)
            lst = os.lstat(cur)
            if stat.S_ISLNK(lst.st_mode) and lst.st_uid not in (UID, 0):
                raise Unsafe("%s is a symbolic link of %s's; fix: use a directory of your own"
                             % (cur, who(lst.st_uid)))
            check_dir(cur, i >= len(parts) - own_last)


def install(argv):
    """Keep the files of the request on stdin in ``argv[0]``, checked as the module says; prints one JSON line."""
    d = os.path.abspath(os.path.expanduser(argv[0]))
    stdin = sys.stdin.buffer
    manifest = json.loads(stdin.readline().decode())
    blob = stdin.read()
    out = {"ok": True, "dir": d, "uid": UID, "kept": [], "installed": []}
    try:
        have = d
        while not os.path.lexists(have):
            have = os.path.dirname(have)
        check_chain(have, 2 if have == d else 1 if have == os.path.dirname(d) else 0)  # before creating
        if not os.path.isdir(os.path.dirname(d)):
            os.makedirs(os.path.dirname(d), 0o700)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        check_chain(d, 2)
        pos = 0
        for name, size, want in manifest:
            data = blob[pos:pos + size]
            pos += size
            if "/" in name or name.startswith(".") or hashlib.sha256(data).hexdigest() != want:
                raise ValueError("bad file %r in the request" % name)
            path = os.path.join(d, name)
            try:
                have = read_checked(path, CAP)
                why = None if hashlib.sha256(have).hexdigest() == want else "its content was not the expected one"
            except Stale as e:
                why = str(e)
            except OSError as e:
                why = e.strerror or str(e)
            if why is None:
                out["kept"].append(name)
                continue
            tmp = os.path.join(d, ".%s.%s" % (name, os.urandom(6).hex()))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            if hashlib.sha256(read_checked(path, CAP)).hexdigest() != want:
                raise Stale("%s changed right after it was written" % path)
            out["installed"].append([name, why])
    except Unsafe as e:
        out = {"ok": False, "unsafe": True, "dir": d, "error": str(e)}
    except (OSError, ValueError, Stale) as e:
        out = {"ok": False, "dir": d, "error": "%s: %s" % (type(e).__name__, e)}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0 if out["ok"] else (UNSAFE_EXIT if out.get("unsafe") else 1)


def source():
    """This program's text, as a backend sends it (``python3 -c``): ``meshrun.backend.boot_program()``."""
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        return f.read()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--install"]:
        sys.exit(install(sys.argv[2:]))
    boot(sys.argv[1:])
