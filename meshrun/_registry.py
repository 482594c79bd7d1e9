"""Backend plugins, found through the entry-point group ``meshrun.backends`` and loaded lazily.

A plugin that fails to import is listed with the reason and an install hint; it never breaks meshrun.

A backend that does not answer in time (a Slurm controller that is down, an API server that does not
accept connections) is remembered as not responding, per user, in a small file under ``MESHRUN_HOME``
(:func:`unresponsive`), so the next process does not wait for it again; :class:`Probe` asks a backend
something in its own thread and records the outcome there, also after the caller stopped waiting.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ._config import on_configure
from ._errors import BackendUnavailable

GROUP = "meshrun.backends"

class _Known(dict[str, str]):
    """Backend name -> install hint. A hint left empty is worked out when it is read (``install_hint``), as
    the command that works depends on how meshrun itself is installed."""

    def __getitem__(self, name: str) -> str:
        hint: str = super().__getitem__(name)
        return hint or install_hint(name)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default


def install_hint(name: str, extras: tuple[str, ...] = ()) -> str:
    """One command that installs backend ``name`` for the way meshrun is installed (see meshrun._install)."""
    from ._install import install_hint as hint

    return hint(name, extras)


# backends meshrun knows about, with the way to install them
KNOWN: dict[str, str] = _Known({
    "local": "built in",
    "ssh": "",
    "slurm": "",
    "kubernetes": "",
    "skypilot": "",
    "dstack": "",
})


@dataclass
class BackendInfo:
    name: str
    installed: bool
    loaded: bool
    error: str | None = None
    hint: str = ""
    target: str = ""  # "module:Class" of the entry point
    distribution: str | None = None
    version: str | None = None


_lock = threading.RLock()
_classes: dict[str, Any] = {}
_instances: dict[str, Any] = {}
_manual: dict[str, Callable[..., Any]] = {}
_errors: dict[str, str] = {}
_name_locks: dict[str, threading.RLock] = {}  # one per backend name: its plugin loads and its instance is made


def reset() -> None:
    """Forget created backends and the entry-point scan (after the configuration or the installed
    distributions changed). In-process registrations stay; see unregister_backend."""
    global _eps_cache, _installed_cache
    with _lock:
        _installed_cache = None
        for b in _instances.values():
            try:
                b.close()
            except Exception:
                pass
        _instances.clear()
        _classes.clear()
        _errors.clear()
        _eps_cache = None


def register_backend(name: str, factory: Callable[..., Any]) -> None:
    """Register a backend class in-process (tests, notebooks, private backends without a distribution)."""
    with _lock:
        _manual[name] = factory
        _instances.pop(name, None)


def unregister_backend(name: str) -> None:
    """Undo register_backend (the backend's instance is closed and forgotten)."""
    with _lock:
        _manual.pop(name, None)
        inst = _instances.pop(name, None)
        if inst is not None:
            try:
                inst.close()
            except Exception:
                pass


_eps_cache: dict[str, Any] | None = None
on_configure(reset)  # a new configuration makes backends anew, with their new settings


def _entry_points() -> dict[str, Any]:
    """The installed plugins (scanning every distribution costs tens of ms: done once per process)."""
    global _eps_cache
    if _eps_cache is None:
        from importlib.metadata import entry_points

        eps: dict[str, Any] = {}
        for ep in entry_points(group=GROUP):
            eps.setdefault(ep.name, ep)
        _eps_cache = eps
    return _eps_cache


def _builtin(name: str) -> Any:
    if name == "local":
        from ._local import LocalBackend

        return LocalBackend
    return None


def _name_lock(name: str) -> threading.RLock:
    with _lock:
        return _name_locks.setdefault(name, threading.RLock())


def backend_class(name: str) -> Any:
    """The class of backend ``name``, importing its plugin once. Plugins load under a lock of their own, so
    one whose import hangs holds up nobody asking for another backend."""
    with _lock:
        if name in _manual:
            return _manual[name]
        if name in _classes:
            return _classes[name]
        if name in _errors:
            raise BackendUnavailable(_errors[name], backend=name)
    with _name_lock(name):
        with _lock:
            if name in _classes:
                return _classes[name]
            if name in _errors:
                raise BackendUnavailable(_errors[name], backend=name)
            ep = None
            cls = _builtin(name)
            if cls is None:
                ep = _entry_points().get(name)
                if ep is None:
                    hint = KNOWN.get(name)
                    if hint:
                        msg = f"the {name} backend is not installed; install it with: {hint}"
                    else:
                        msg = f"no backend named {name!r}; the known backends are: {', '.join(names())}"
                    raise BackendUnavailable(msg, backend=name)
        if cls is None:
            assert ep is not None  # no built-in class: the entry point was found above, or this raised
            try:
                cls = ep.load()
            except Exception as e:  # ImportError, or anything the plugin raises at import time
                hint = KNOWN.get(name, f"reinstall the distribution that provides {ep.value}")
                with _lock:
                    _errors[name] = (
                        f"the {name} backend failed to load ({ep.value}): {type(e).__name__}: {e}; try: {hint}"
                    )
                    raise BackendUnavailable(_errors[name], backend=name) from e
        with _lock:
            _classes[name] = cls
        return cls


def get_backend(name: str) -> Any:
    """The (per-process, shared) backend instance called ``name``."""
    with _lock:
        if name in _instances:
            return _instances[name]
    with _name_lock(name):
        with _lock:
            if name in _instances:
                return _instances[name]
        cls = backend_class(name)
        from ._config import get_config

        inst = cls(get_config().backend(name))
        with _lock:
            return _instances.setdefault(name, inst)


def names() -> list[str]:
    found = set(KNOWN) | set(_manual)
    try:
        found |= set(_entry_points())
    except Exception:
        pass
    return sorted(found, key=lambda n: (n != "local", n))


def installed_names() -> list[str]:
    """Backends that are present (built in, registered, or with an entry point), loaded or not."""
    out = ["local"] + sorted(set(_manual) - {"local"})
    try:
        out += sorted(set(_entry_points()) - set(out))
    except Exception:
        pass
    return out


_installed_cache: tuple[float, frozenset[str], list[str]] | None = None
_INSTALLED_TTL = 30.0


def installed_backends() -> list[str]:
    """:func:`installed_names`, with its entry-point scan (tens of ms with many distributions) cached for
    30 s; backends registered in-process are always current."""
    global _installed_cache
    manual = frozenset(_manual)
    now = time.monotonic()
    hit = _installed_cache
    if hit is not None and now - hit[0] < _INSTALLED_TTL and hit[1] == manual:
        return list(hit[2])
    names = installed_names()
    _installed_cache = (now, manual, list(names))
    return names


def list_backends(load: bool = True) -> list[BackendInfo]:
    """Every known or installed backend, trying to load each (unless ``load`` is False: then only what the
    entry points say, without importing anything); failures are reported, not raised."""
    infos = []
    eps = {}
    try:
        eps = _entry_points()
    except Exception:
        pass
    for name in names():
        ep = eps.get(name)
        installed = name == "local" or name in _manual or ep is not None
        info = BackendInfo(name=name, installed=installed, loaded=False, hint=KNOWN.get(name, ""))
        if ep is not None:
            info.target = ep.value
            dist = getattr(ep, "dist", None)
            if dist is not None:
                info.distribution = dist.metadata["Name"]
                info.version = dist.version
        if not installed:
            info.error = "not installed"
            infos.append(info)
            continue
        if not load:
            infos.append(info)
            continue
        try:
            backend_class(name)
            info.loaded = True
        except BackendUnavailable as e:
            info.error = str(e)
        infos.append(info)
    return infos


# ---- backends that do not answer ------------------------------------------------------------------


#: the longest a process waits to update the record (another process of the user is writing it)
LOCK_WAIT = 0.5


def unresponsive_path() -> Path:
    """This user's record of backends that did not answer in time: ``MESHRUN_HOME/unresponsive-<uid>.json``."""
    from ._config import get_config

    uid = os.getuid() if hasattr(os, "getuid") else 0
    return get_config().home / f"unresponsive-{uid}.json"


def _read_marks(path: Path) -> dict[str, dict[str, Any]]:
    """The file's entries; an unreadable, damaged, foreign-owned or linked file counts as empty."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            return {}
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = json.loads(f.read(1 << 20) or b"{}")
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    marks = data.get("backends") if isinstance(data, dict) else None
    if not isinstance(marks, dict):
        return {}
    return {k: v for k, v in marks.items() if isinstance(k, str) and isinstance(v, dict)
            and isinstance(v.get("time"), (int, float)) and isinstance(v.get("until"), (int, float))}


def unresponsive(now: float | None = None) -> dict[str, dict[str, Any]]:
    """Backends remembered as not responding, still within their skip time: ``{name: {"doing", "limit",
    "reason", "time", "until"}}`` (``time`` when it was last found not responding, ``until`` when it is
    asked again)."""
    now = time.time() if now is None else now
    return {k: v for k, v in _read_marks(unresponsive_path()).items() if v["until"] > now}


def _update_marks(change: Callable[[dict[str, dict[str, Any]]], bool]) -> bool:
    """Read, change and write the file under an exclusive lock; the write is atomic (a private temp file,
    mode 0600, renamed over the old one). ``change`` returns False when there is nothing to write. Returns
    True when the file was written."""
    import fcntl

    path = unresponsive_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError:
        return False  # a read-only or full home: not remembering only costs the next process the wait again
    try:
        if hasattr(os, "getuid") and os.fstat(lock).st_uid != os.getuid():
            return False  # someone else's file in a shared home: never ours to lock or trust
        end = time.monotonic() + LOCK_WAIT
        while True:  # bounded: a writer that holds the lock too long only costs a record, never a submit
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    return False
                time.sleep(0.01)
        _remove_stale_temps(path)
        now = time.time()
        marks = {k: v for k, v in _read_marks(path).items() if v["until"] > now}
        if not change(marks):
            return False
        tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "backends": marks}, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
            return True
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError:
        return False
    finally:
        os.close(lock)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of writers that died before their rename (``<file>.tmp.<pid>.<thread>``)."""
    for tmp in path.parent.glob(f"{path.name}.tmp.*"):
        try:
            pid = int(tmp.name.rsplit(".tmp.", 1)[1].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                tmp.unlink()
            except OSError:
                pass
        except (ValueError, IndexError, OSError):
            pass


def mark_unresponsive(name: str, *, doing: str, limit: float, skip_for: float, reason: str | None = None) -> bool:
    """Remember that ``name`` did not answer within ``limit`` seconds while ``doing`` something, so that
    nothing asks it again for ``skip_for`` seconds (0: do not remember). True when it is remembered."""
    if skip_for <= 0:
        return False
    now = time.time()

    def change(marks: dict[str, dict[str, Any]]) -> bool:
        old = marks.get(name) or {}
        marks[name] = {"doing": doing, "limit": limit, "reason": reason or old.get("reason"),
                       "since": old.get("since", now), "time": now, "until": now + skip_for}
        return True

    return _update_marks(change)


def mark_responsive(name: str) -> None:
    """``name`` answered: forget that it did not (nothing is written when it was not remembered)."""
    if name not in _read_marks(unresponsive_path()):
        return
    _update_marks(lambda marks: marks.pop(name, None) is not None)


def unresponsive_text(mark: dict[str, Any], now: float | None = None) -> str:
    """``not responding (checking availability, >1s; 12s ago; asked again in 48s): <last answer>``."""
    from ._units import format_duration

    now = time.time() if now is None else now
    ago = format_duration(max(0.0, now - mark["time"]))
    left = format_duration(max(1.0, mark["until"] - now))
    text = f"not responding ({mark.get('doing') or 'asked'}, >{float(mark.get('limit') or 0):g}s; {ago} ago; " \
           f"asked again in {left})"
    if mark.get("reason"):
        text += f": {mark['reason']}"
    return text


class Probe:
    """One backend asked something in a daemon thread (named ``thread_name``): ``fn(probe)`` sets
    ``probe.doing`` as it goes ("loading the plugin", "checking availability", "making offers") and returns
    ``(result, failure)``, ``failure`` being None or what went wrong in a few words.

    The outcome is recorded in the unresponsive-backends file (``record=True``): a backend that answered
    within ``limit`` seconds, or answered at all without failing, is forgotten there; one that failed after
    more than ``limit`` seconds is remembered with that failure. A caller that stops waiting calls
    :meth:`give_up`, which remembers it as not responding; the thread may still finish later and refresh
    the record with what it found."""

    def __init__(self, name: str, fn: Callable[["Probe"], tuple[Any, str | None]], *, limit: float,
                 skip_for: float = 0.0, record: bool = True, thread_name: str | None = None,
                 wake: threading.Event | None = None):
        self.name = name
        self.fn = fn
        self.limit = limit
        self.skip_for = skip_for
        self.record = record and skip_for > 0
        self.doing = "starting"
        self.result: Any = None
        self.failure: str | None = None
        self.error: BaseException | None = None
        self.started = 0.0
        self.elapsed: float | None = None
        self.abandoned = False
        self.remembered = False  # give_up recorded it as not responding
        self.done = threading.Event()
        self._wake = wake
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=thread_name or f"meshrun-probe-{name}", daemon=True)

    def start(self) -> "Probe":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def run_here(self) -> "Probe":
        """Ask in the calling thread instead (nothing else to wait for, and nothing to give up on)."""
        self.started = time.monotonic()
        self._run()
        return self

    def running_for(self) -> float:
        return (self.elapsed if self.elapsed is not None else time.monotonic() - self.started)

    def _run(self) -> None:
        try:
            self.result, self.failure = self.fn(self)
        except BaseException as e:  # the caller decides what an exception means; the thread must not die loudly
            self.error = e
            self.failure = f"{type(e).__name__}: {e}"
        with self._lock:
            self.elapsed = time.monotonic() - self.started
            late = self.abandoned or self.elapsed > self.limit
            self.done.set()
        if self._wake is not None:
            self._wake.set()
        if not self.record:
            return
        try:
            if late and self.failure:
                mark_unresponsive(self.name, doing=self.doing, limit=self.limit, skip_for=self.skip_for,
                                  reason=f"{self.failure} (after {self.elapsed:.1f}s)")
            else:
                mark_responsive(self.name)
        except Exception:
            pass

    def give_up(self) -> bool:
        """Stop waiting: True (and the backend is remembered as not responding, when it has run past
        ``limit``) if it had not finished; False if it had."""
        with self._lock:  # held while writing, so a thread that ends now records its outcome after this
            if self.done.is_set():
                return False
            self.abandoned = True
            if self.record and time.monotonic() - self.started >= self.limit:
                self.remembered = mark_unresponsive(self.name, doing=self.doing, limit=self.limit,
                                                    skip_for=self.skip_for)
        return True


def validate_backend_options(spec: Any) -> None:
    """Check each ``backend_options[name]`` of ``spec`` against that backend's declared ``options_model``,
    before placement. Backends that are not installed, or declare no model, are left to themselves."""
    for name, opts in (getattr(spec, "backend_options", None) or {}).items():
        try:
            cls = backend_class(name)
        except Exception:  # not installed here: placement says so if it matters
            continue
        model = getattr(cls, "options_model", None)
        if model is not None:
            model.load(name, opts)
