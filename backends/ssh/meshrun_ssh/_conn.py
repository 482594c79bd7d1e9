"""SSH connections: one paramiko transport per host per process, many channels on it, strict host keys,
transparent reconnection with bounded retries and back-off.

Public through ``meshrun_ssh.connect(target, config=...)``; the Slurm backend's login-node mode uses it.
"""

from __future__ import annotations

import errno
import os
import select
import shlex
import socket
import subprocess
import threading
import time
from typing import Any, Callable, Mapping, Optional, TypeVar, Union

from ._errors import AuthFailed, ConnectionLost, HostKeyRefused, Unreachable
from ._settings import HostParams, SSHSettings, load_settings, resolve

T = TypeVar("T")
BACKEND = "ssh"


def _fingerprint(key: Any) -> str:
    import base64
    import hashlib

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _kh_name(params: HostParams) -> str:
    host = params.host_key_alias or params.hostname
    return host if params.port == 22 else f"[{host}]:{params.port}"


class _RefuseUnknown:
    """Missing-host-key policy: refuse, saying how to trust the host (never accept silently)."""

    def __init__(self, params: HostParams):
        self.params = params

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        p = self.params
        files = ", ".join(p.known_hosts) or "(none configured)"
        port = f" -p {p.port}" if p.port != 22 else ""
        target = p.known_hosts[0] if p.known_hosts else "~/.ssh/known_hosts"
        raise HostKeyRefused(
            f"host {p.name} ({_kh_name(p)}) is not in known_hosts ({files}); its {key.get_name()} key has "
            f"fingerprint {_fingerprint(key)}. meshrun never trusts an unknown host silently. If that fingerprint "
            f"is right, trust the host with: ssh-keyscan{port} -t {key.get_name()} {p.host_key_alias or p.hostname} "
            f">> {target}   (or connect once with ssh and answer yes), or set backends.ssh.known_hosts",
            backend=BACKEND,
        )


def _retrying(settings: SSHSettings, deadline: Optional[float] = None) -> Any:
    import tenacity
    from tenacity.stop import stop_base

    stop: stop_base = tenacity.stop_after_attempt(settings.retries)
    if deadline is not None:
        stop = stop | tenacity.stop_after_delay(deadline)
    return tenacity.Retrying(
        stop=stop,
        wait=tenacity.wait_exponential(multiplier=0.25, max=settings.retry_max_wait) + tenacity.wait_random(0, 0.25),
        retry=tenacity.retry_if_exception_type(Unreachable),
        reraise=True,
    )


def with_retries(settings: SSHSettings, fn: Callable[[], T], *, deadline: Optional[float] = None) -> T:
    """``fn()``, retried on connection errors (Unreachable) with exponential back-off and jitter, at most
    ``settings.retries`` attempts; other errors and the last connection error are raised as they are."""
    for attempt in _retrying(settings, deadline):
        with attempt:
            return fn()
    raise AssertionError("unreachable")  # pragma: no cover


def shell_command(argv: list[str], env: Optional[Mapping[str, str]] = None, *, exec_: bool = False) -> str:
    """The command line sshd gives the login shell: every word quoted, so any byte sequence gets through.

    A path starting with ``~/`` is made relative to the home directory (where sshd starts the shell)."""
    words = []
    if env:
        words.append("env")
        for k, v in env.items():
            if not k.isidentifier() or "\x00" in v:
                raise ValueError(f"bad environment variable {k!r}")
            words.append(f"{k}={v}")
    words.extend(argv)
    for w in words:
        if "\x00" in w:
            raise ValueError("a command word contains a NUL character")
    line = shlex.join(words)
    return ("exec " + line) if exec_ else line


def rel_home(path: str) -> str:
    """``~/x`` -> ``x`` (relative to the login directory, the home); absolute paths stay as they are."""
    if path == "~":
        return "."
    if path.startswith("~/"):
        return path[2:] or "."
    return path


class Connection:
    """An SSH connection to one host: exec channels, SFTP, reconnecting by itself when the transport dies.

    Thread-safe; channels are multiplexed over one transport. Get one with :func:`meshrun_ssh.connect`.
    """

    def __init__(self, params: HostParams, settings: SSHSettings):
        self.params = params
        self.settings = settings
        self._client: Any = None
        self._jump: Optional[Connection] = None
        self._lock = threading.RLock()
        self._sftp: Any = None
        self._sftp_lock = threading.RLock()
        self.generation = 0  # bumped on every new transport
        self.connected_at: Optional[float] = None
        self._closed = False

    def __repr__(self) -> str:
        p = self.params
        state = "up" if self.is_active() else "down"
        return f"<meshrun_ssh.Connection {p.user}@{p.hostname}:{p.port} ({p.name}) {state}>"

    # ---- the transport
    def is_active(self) -> bool:
        c = self._client
        t = c.get_transport() if c is not None else None
        return bool(t is not None and t.is_active())

    def transport(self, *, retry: bool = True) -> Any:
        """The live transport, connecting (with retries and back-off when ``retry``) if need be."""
        if self._closed:
            raise Unreachable(f"connection to {self.params.name} was closed", backend=BACKEND)
        with self._lock:
            if self.is_active():
                return self._client.get_transport()
            if not retry:
                self._connect_once()
                return self._client.get_transport()
            for attempt in _retrying(self.settings):
                with attempt:
                    self._connect_once()
            return self._client.get_transport()

    def _connect_once(self) -> None:
        import paramiko

        p = self.params
        self._drop()
        sock: Any = None
        where = f"{p.name} ({p.user}@{p.hostname}:{p.port})"
        try:
            if p.proxy_jump:
                sock = self._jump_channel()
            elif p.proxy_command:
                sock = paramiko.ProxyCommand(p.proxy_command)
            client = paramiko.SSHClient()
            for f in p.known_hosts:
                if os.path.exists(f):
                    try:
                        client.load_system_host_keys(f)
                    except Exception as e:
                        raise HostKeyRefused(f"cannot read known_hosts file {f}: {type(e).__name__}: {e}",
                                             backend=BACKEND) from None
            if p.host_key_alias:
                # look the key up under the alias, as OpenSSH does
                hk = paramiko.HostKeys()
                for f in p.known_hosts:
                    if os.path.exists(f):
                        hk.load(f)
                alias = p.host_key_alias if p.port == 22 else f"[{p.host_key_alias}]:{p.port}"
                real = p.hostname if p.port == 22 else f"[{p.hostname}]:{p.port}"
                for ktype, key in (hk.lookup(alias) or {}).items():
                    client.get_host_keys().add(real, ktype, key)
            # paramiko calls any object's missing_host_key(); its policy base class is not imported at module level
            client.set_missing_host_key_policy(_RefuseUnknown(p))  # type: ignore[arg-type]
            for k in p.keys:
                if not os.path.exists(k):
                    raise AuthFailed(f"{p.field_prefix}.key: the key file {k} does not exist (host {p.name})",
                                     backend=BACKEND)
            client.connect(
                p.hostname,
                port=p.port,
                username=p.user,
                key_filename=list(p.keys) or None,  # type: ignore[arg-type]  # paramiko takes a list; stubs say str
                look_for_keys=not p.keys,
                allow_agent=not p.keys and bool(os.environ.get("SSH_AUTH_SOCK")),
                timeout=p.connect_timeout,
                banner_timeout=p.connect_timeout,
                auth_timeout=p.connect_timeout,
                channel_timeout=p.connect_timeout,
                sock=sock,
            )
        except (HostKeyRefused, AuthFailed, Unreachable):
            self._close_sock(sock)
            raise
        except paramiko.BadHostKeyException as e:
            self._close_sock(sock)
            raise HostKeyRefused(
                f"host {where} presented a {e.key.get_name()} key with fingerprint {_fingerprint(e.key)}, but "
                f"known_hosts ({', '.join(p.known_hosts)}) holds a different key for it. The host may have been "
                f"reinstalled, or someone may be intercepting the connection. If the change is expected, remove the "
                f"old entry (ssh-keygen -R {_kh_name(p)}) and trust the new key; meshrun will not connect until then",
                backend=BACKEND,
            ) from None
        except paramiko.PasswordRequiredException:
            self._close_sock(sock)
            raise AuthFailed(
                f"{p.field_prefix}.key: the key for {where} is protected by a passphrase; load it into ssh-agent "
                "(and leave `key` unset) or use a key without one", backend=BACKEND) from None
        except paramiko.AuthenticationException as e:
            self._close_sock(sock)
            keys = ", ".join(p.keys) or "ssh-agent / default keys"
            raise AuthFailed(f"{where} refused authentication with {keys}: {e}", backend=BACKEND) from None
        except (paramiko.SSHException, OSError, EOFError, socket.timeout) as e:
            self._close_sock(sock)
            reason = str(e) or type(e).__name__
            errors = list(getattr(e, "errors", {}).values())  # NoValidConnectionsError: one per address
            if isinstance(e, ConnectionRefusedError) or (
                    errors and all(getattr(x, "errno", None) == errno.ECONNREFUSED for x in errors)):
                reason = "connection refused"
            elif errors:
                reason = "; ".join(sorted({os.strerror(x.errno) if getattr(x, "errno", None) else str(x)
                                           for x in errors}))
            elif isinstance(e, socket.timeout):
                reason = f"timed out after {p.connect_timeout:g}s"
            raise Unreachable(f"cannot connect to {where}: {reason}", backend=BACKEND) from None
        t = client.get_transport()
        assert t is not None  # connect() succeeded, so the client has its transport
        t.set_keepalive(15)
        self._client = client
        self.generation += 1
        self.connected_at = time.time()

    def _jump_channel(self) -> Any:
        p = self.params
        hops = [h.strip() for h in (p.proxy_jump or "").split(",") if h.strip()]
        last = hops[-1]
        user, _, rest = last.rpartition("@")
        host, _, port = rest.partition(":")
        table: dict[str, Any] = {"name": _safe_name(host), "host": host}
        if user:
            table["user"] = user
        if port:
            table["port"] = int(port)
        if len(hops) > 1:
            table["proxy_jump"] = ",".join(hops[:-1])
        jump_params = resolve(table, self.settings)
        self._jump = _get(jump_params, self.settings)
        t = self._jump.transport(retry=False)
        try:
            return t.open_channel("direct-tcpip", (p.hostname, p.port), ("127.0.0.1", 0),
                                  timeout=p.connect_timeout)
        except Exception as e:
            raise Unreachable(f"cannot reach {p.hostname}:{p.port} through the jump host {last}: {e}",
                              backend=BACKEND) from None

    @staticmethod
    def _close_sock(sock: Any) -> None:
        if sock is not None:
            try:
                sock.close()
            except Exception:
                pass

    def _drop(self) -> None:
        with self._sftp_lock:
            self._sftp = None
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    # ---- channels
    def open_session(self, *, retry: bool = True) -> Any:
        """A new session channel on the shared transport (reconnecting if the transport is gone)."""

        def once() -> Any:
            t = self.transport(retry=False)
            try:
                return t.open_session(timeout=self.params.connect_timeout)
            except Exception as e:
                if not t.is_active():
                    raise ConnectionLost(f"connection to {self.params.name} dropped: {e}", backend=BACKEND) from None
                raise Unreachable(f"{self.params.name}: cannot open a channel: {e}", backend=BACKEND) from None

        if not retry:
            return once()
        return self.retry(once)

    def retry(self, fn: Callable[[], T], *, deadline: Optional[float] = None) -> T:
        """Call ``fn`` until it does not raise a retryable (connection) error, with bounded back-off."""
        return with_retries(self.settings, fn, deadline=deadline)

    def run(self, argv: list[str], *, input: Optional[bytes] = None, timeout: Optional[float] = None,
            env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
        """Run ``argv`` on the host (each word quoted for the login shell); text stdout/stderr and the exit
        code in a CompletedProcess. A nonzero exit is not an error; a timeout raises
        ``subprocess.TimeoutExpired``; an unreachable host raises ``meshrun.BackendUnavailable``."""
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of words, not a string")
        line = shell_command([os.fspath(a) for a in argv], env)
        rc, out, err = self.exec_line(line, input=input, timeout=timeout)
        return subprocess.CompletedProcess(list(argv), rc, out.decode("utf-8", "replace"),
                                           err.decode("utf-8", "replace"))

    def exec_line(self, line: str, *, input: Optional[bytes] = None, timeout: Optional[float] = None,
                  retry: bool = True) -> tuple[int, bytes, bytes]:
        """Run a ready command line; (exit code, stdout bytes, stderr bytes)."""
        chan = self.open_session(retry=retry)
        return _communicate(chan, line, input, timeout, self.params.name)

    # ---- files (SFTP; paths starting with ~/ are relative to the home directory)
    def sftp(self) -> Any:
        with self._sftp_lock:
            t = self.transport(retry=False)
            if self._sftp is None or self._sftp.get_channel().get_transport() is not t or \
                    self._sftp.get_channel().closed:
                import paramiko

                try:
                    self._sftp = paramiko.SFTPClient.from_transport(t)
                except Exception as e:
                    raise ConnectionLost(f"{self.params.name}: cannot start SFTP: {e}", backend=BACKEND) from None
            return self._sftp

    def _sftp_call(self, fn: Callable[[Any], T]) -> T:
        def once() -> T:
            with self._sftp_lock:
                s = self.sftp()
                try:
                    return fn(s)
                except (EOFError, OSError) as e:
                    if isinstance(e, (FileNotFoundError, PermissionError)) or getattr(e, "errno", None):
                        raise
                    if not self.is_active():
                        self._sftp = None
                        raise ConnectionLost(f"{self.params.name}: connection dropped during SFTP: {e}",
                                             backend=BACKEND) from None
                    raise

        return self.retry(once)

    def makedirs(self, remote_dir: str, mode: int = 0o700) -> None:
        path = rel_home(remote_dir)

        def mk(s: Any) -> None:
            parts = path.split("/")
            cur = "/" if path.startswith("/") else ""
            for part in parts:
                if not part:
                    continue
                cur = (cur.rstrip("/") + "/" + part) if cur else part
                try:
                    s.stat(cur)
                except FileNotFoundError:
                    try:
                        s.mkdir(cur, mode)
                    except OSError:
                        s.stat(cur)  # created meanwhile by someone else: fine

        self._sftp_call(mk)

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o600) -> None:
        """Write ``data`` to a remote file atomically (parent directories are created)."""
        path = rel_home(remote_path)
        parent = os.path.dirname(path)
        if parent:
            self.makedirs(parent)
        tmp = f"{path}.mrtmp.{os.getpid()}.{threading.get_ident()}"

        def put(s: Any) -> None:
            with s.open(tmp, "wb") as f:
                f.set_pipelined(True)
                f.write(data)
            s.chmod(tmp, mode)
            try:
                s.posix_rename(tmp, path)  # atomic replace (an OpenSSH extension)
            except OSError as e:
                if getattr(e, "errno", None) is not None or "unsupported" not in str(e).lower():
                    raise
                try:  # servers without it: plain SFTP rename refuses to overwrite
                    s.remove(path)
                except OSError:
                    pass
                s.rename(tmp, path)

        self._sftp_call(put)

    def put_file(self, local_path: Union[str, os.PathLike], remote_path: str) -> None:
        """Copy a local file to the host, keeping its permission bits."""
        with open(local_path, "rb") as f:
            data = f.read()
        self.put_bytes(data, remote_path, os.stat(local_path).st_mode & 0o777)

    def get_bytes(self, remote_path: str) -> bytes:
        """The content of a remote file (``FileNotFoundError`` if there is none)."""
        path = rel_home(remote_path)

        def get(s: Any) -> bytes:
            with s.open(path, "rb") as f:
                f.prefetch()
                return f.read()

        return self._sftp_call(get)

    def exists(self, remote_path: str) -> bool:
        path = rel_home(remote_path)

        def st(s: Any) -> bool:
            try:
                s.stat(path)
                return True
            except FileNotFoundError:
                return False

        return self._sftp_call(st)

    def close(self) -> None:
        """Close the transport and forget this connection (a later ``connect`` makes a new one)."""
        with _cache_lock:
            for k, v in list(_cache.items()):
                if v is self:
                    del _cache[k]
        self._closed = True
        with self._lock:
            self._drop()


def _communicate(chan: Any, line: str, input: Optional[bytes], timeout: Optional[float],
                 name: str) -> tuple[int, bytes, bytes]:
    """exec ``line`` on ``chan``; feed ``input`` (from a thread: no deadlock on big outputs); collect both
    streams until the command exits."""
    out, err = bytearray(), bytearray()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        chan.exec_command(line)
    except Exception as e:
        chan.close()
        raise ConnectionLost(f"{name}: cannot start the command: {e}", backend=BACKEND) from None
    feeder = None
    if input:
        def feed() -> None:
            try:
                chan.sendall(input)
                chan.shutdown_write()
            except Exception:
                pass

        feeder = threading.Thread(target=feed, daemon=True, name="meshrun-ssh-stdin")
        feeder.start()
    else:
        try:
            chan.shutdown_write()
        except Exception:
            pass
    fd = chan.fileno()
    try:
        while True:
            while chan.recv_ready():
                out += chan.recv(65536)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            wait = 1.0
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise subprocess.TimeoutExpired(line, timeout or 0.0, bytes(out), bytes(err))
                wait = min(wait, 1.0)
            select.select([fd], [], [], wait)
        # drain what arrived with the exit status
        while chan.recv_ready():
            out += chan.recv(65536)
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        if not chan.exit_status_ready():
            t = chan.get_transport()
            if t is None or not t.is_active():
                raise ConnectionLost(f"{name}: connection dropped while a command ran", backend=BACKEND)
            rc = -1
        else:
            rc = chan.recv_exit_status()
    finally:
        chan.close()
    return rc, bytes(out), bytes(err)


def _safe_name(host: str) -> str:
    import re

    s = re.sub(r"[^A-Za-z0-9._-]", "-", host).strip("-.") or "jump"
    return s[:64]


# ---- the per-process cache: one connection per (host, port, user) and trust settings

_cache: dict[tuple[Any, ...], Connection] = {}
_cache_lock = threading.Lock()


def _get(params: HostParams, settings: SSHSettings) -> Connection:
    with _cache_lock:
        c = _cache.get(params.key_tuple)
        if c is None or c._closed:
            c = Connection(params, settings)
            _cache[params.key_tuple] = c
        return c


def get_connection(params: HostParams, settings: SSHSettings) -> Connection:
    return _get(params, settings)


def connect(target: Union[str, Mapping[str, Any]], *, config: Optional[Mapping[str, Any]] = None) -> Connection:
    """A (cached) connection to ``target``: a host alias (from ``~/.ssh/config`` or the ``[backends.ssh]``
    hosts) or a host table ``{"host", "port", "user", "key", ...}``. ``config`` is a ``[backends.ssh]``-style
    table (``known_hosts``, ``ssh_config``, ``connect_timeout``, ``retries`` ...); default: meshrun's config.

    The connection is opened now (so an unknown host key or a refused login raises here) and re-opened
    by itself, with bounded retries, when it drops."""
    if config is None:
        config = meshrun_config_table()
    settings = load_settings(config)
    entry: Any = target
    if isinstance(target, str):
        for i, h in enumerate(settings.hosts):
            name = h if isinstance(h, str) else h.label
            if name == target:
                entry = h
                break
    elif not isinstance(target, Mapping):
        raise TypeError(f"target must be a host alias or a host table, got {type(target).__name__}")
    params = resolve(entry, settings)
    conn = _get(params, settings)
    conn.transport()
    return conn


def meshrun_config_table() -> dict[str, Any]:
    import meshrun

    return meshrun.get_config().backend("ssh")


def close_all() -> None:
    """Close every cached connection (tests; a process exit closes them anyway)."""
    with _cache_lock:
        conns = list(_cache.values())
        _cache.clear()
    for c in conns:
        c._closed = True
        c._drop()
