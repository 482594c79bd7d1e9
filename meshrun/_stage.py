"""Data staging on the node a job runs on: object-store inputs down before the job, outputs up after it.

One self-contained file that needs the standard library and boto3 only (never the rest of meshrun), because
it runs where the job runs, with the Python that has boto3 there. The core copies it into the job folder as
``stage.py`` (it travels with ``launch.json`` and ``payload.pkl``), and the host agent runs it as::

    PYTHON JOB_DIR/stage.py in   JOB_DIR            # inputs, before the job starts
    PYTHON JOB_DIR/stage.py sync JOB_DIR            # periodic uploads of outputs with an ``every``, while it runs
    PYTHON JOB_DIR/stage.py out  JOB_DIR --state S  # outputs whose policy covers the job's end state S

``PYTHON`` is ``MESHRUN_DATA_PYTHON`` from the node's environment, else the agent's own interpreter. What to
move is ``launch.json``'s ``data`` (URLs and paths only). The endpoint and the credentials come from this
process's environment and profile, exactly as boto3 finds them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws/credentials``, ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``AWS_REGION``); nothing here writes them anywhere, and messages name the endpoint as
"the S3 endpoint", never by its URL.

Integrity: every download is checked against the object's ETag: the MD5 of a single-part object, and for a
multi-part one (``<md5>-<N>``) the MD5 of its parts' MD5s, downloaded part by part on the object's own part
boundaries (``HeadObject`` with ``PartNumber=1`` gives the part size) so each part is hashed as it arrives,
in parallel. Every ranged read carries ``If-Match`` with the ETag, so an object replaced mid-download fails
instead of mixing versions. Uploads go through s3transfer (boto3's transfer manager: parallel multi-part),
with botocore's request checksums (CRC32) that the server verifies for every part.

Resume and cache: an object is downloaded into ``CACHE/partial/<id>`` with a journal of the parts already
complete (and their MD5s), so a download cut short goes on where it stopped (the complete parts are hashed
again before they count); a complete, verified object moves to ``CACHE/objects/<id>``, ``<id>`` being the
SHA-256 of (endpoint, bucket, key, ETag, version), and the job's path gets a hard link to it (a copy across
file systems). ``CACHE`` is ``MESHRUN_DATA_CACHE``, else ``$XDG_CACHE_HOME/meshrun/data``, else
``~/.cache/meshrun/data``: per user, created 0700, refused when it is a link, belongs to someone else or
others may write to it.

Eviction (``evict``): before downloading and after the inputs are in place, the least recently used objects
(by their lock file's modification time, touched at every use) that no job's input links and no other stager
holds are removed while the cache is over ``MESHRUN_DATA_CACHE_MAX`` or its file system has less than
``MESHRUN_DATA_CACHE_FREE`` (default 10%) free; partial downloads untouched for a day go too.
"""

import argparse
import base64
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

PART = 64 << 20  # the upload part size, and the part size of a download without part boundaries
SUB = 8 << 20  # the largest ranged GET of a download whose parts are fetched side by side
WORKERS = int(os.environ.get("MESHRUN_DATA_WORKERS") or 10)
RECORD = ".outputs.json"  # in the job folder: what was uploaded (key, size, mtime), so nothing goes up twice
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_MULTI = re.compile(r"^([0-9a-f]{32})-([0-9]+)$")


class StageError(Exception):
    """A transfer that cannot be done, with a message fit for the job's log and its failure reason."""


class IntegrityError(StageError):
    pass


def say(msg):
    sys.stderr.write("meshrun data: %s\n" % msg)
    sys.stderr.flush()


def fmt_size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return "%d" % n


def split_url(url):
    """``s3://bucket/key`` -> (bucket, key); the spec validated the form already."""
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


# ---- the client ----------------------------------------------------------------------------------


def make_client(workers=WORKERS):
    import boto3
    from botocore.config import Config

    # downloads are checked against the ETag here (MD5): botocore's own CRC of whole-object reads would hash
    # every byte a second time; uploads keep its request checksums (the server checks every part)
    cfg = Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=max(10, workers * 2),
                 connect_timeout=20, read_timeout=120, response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", config=cfg)


def endpoint_of(client):
    return getattr(getattr(client, "meta", None), "endpoint_url", None) or ""


def clean(msg, client=None):
    """A message with the endpoint's URL replaced (it is the environment's, and never written)."""
    msg = str(msg)
    ep = endpoint_of(client) if client is not None else ""
    for e in {ep, os.environ.get("AWS_ENDPOINT_URL_S3") or "", os.environ.get("AWS_ENDPOINT_URL") or ""}:
        if e:
            msg = msg.replace(e.rstrip("/"), "the S3 endpoint")
    return msg


def _client_error(e, what, client):
    code = ""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = (resp.get("Error") or {}).get("Code") or ""
    if code in ("NoSuchKey", "404", "NotFound"):
        return StageError("%s: no such object" % what)
    if code == "NoSuchBucket":
        return StageError("%s: no such bucket" % what)
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StageError("%s: access denied (%s); check the credentials in this node's environment or profile"
                          % (what, code))
    if code in ("PreconditionFailed", "412"):
        return StageError("%s: the object changed while it was being downloaded; run the job again" % what)
    return StageError("%s: %s" % (what, clean(e, client)))


# ---- the cache -----------------------------------------------------------------------------------


def cache_root(env=None):
    env = os.environ if env is None else env
    root = env.get("MESHRUN_DATA_CACHE")
    if not root:
        base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "meshrun", "data")
    return os.path.abspath(root)


def own_dir(path):
    """``path`` as a folder of this user's alone (created 0700): refused when it is a link, another user's, or
    writable by others. Returns the path."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise StageError("cannot create the data cache %s: %s" % (path, e.strerror or e))
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StageError("the data cache %s is not a plain folder (a link?); remove it or set MESHRUN_DATA_CACHE"
                         % path)
    if st.st_uid != os.getuid():
        raise StageError("the data cache %s belongs to uid %d, not to this user (%d); set MESHRUN_DATA_CACHE to "
                         "a folder of your own" % (path, st.st_uid, os.getuid()))
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


class Cache:
    def __init__(self, root=None, endpoint=""):
        self.root = own_dir(root or cache_root())
        self.objects = own_dir(os.path.join(self.root, "objects"))
        self.partial = own_dir(os.path.join(self.root, "partial"))
        self.endpoint = endpoint

    def ident(self, bucket, key, etag, version=None):
        h = hashlib.sha256("\0".join([self.endpoint, bucket, key, etag, version or ""]).encode("utf-8"))
        return h.hexdigest()

    def path(self, ident):
        return os.path.join(self.objects, ident)

    def hit(self, ident, size):
        try:
            st = os.lstat(self.path(ident))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_size == size

    def lock(self, ident, exclusive=True, wait=True):
        """The object's lock, ``partial/<id>.lock``, held (shared by a stager placing a cached object, exclusive
        by one downloading or evicting it): an fd to close, or None when ``wait`` is off and it is held. A lock
        file removed while this waited for it (an eviction) is not the lock any more: the new one is taken."""
        import fcntl

        path = os.path.join(self.partial, ident + ".lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
                try:
                    same = os.path.samestat(os.fstat(fd), os.lstat(path))
                except OSError:
                    same = False
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)


# ---- eviction ------------------------------------------------------------------------------------

PARTIAL_AGE = 24 * 3600  # a partial download untouched this long is removed by the next eviction
_ID = re.compile(r"^[0-9a-f]{64}$")
# meshrun's units (meshrun/_units.py): k, M, G, T are powers of 1000, Ki, Mi, Gi, Ti of 1024; a B may follow
_UNITS = {"": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "t": 1000 ** 4,
          "ki": 1024, "mi": 1024 ** 2, "gi": 1024 ** 3, "ti": 1024 ** 4}
_LIMIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(%|[kmgt]i?)?b?\s*$", re.I)
DEFAULT_MAX, DEFAULT_FREE = "none", "10%"


def parse_limit(value, total, what, none=True):
    """Bytes from a size (``200G``, ``1.5TiB``, a number of bytes) or a share of the cache's file system of
    ``total`` bytes (``50%``); None for ``none`` (where ``none`` is allowed). A bad value raises StageError
    naming ``what``."""
    v = str(value).strip()
    if none and v.lower() in ("none", "off", "unlimited"):
        return None
    m = _LIMIT.match(v)
    if not m or (m.group(2) == "%" and float(m.group(1)) > 100):
        raise StageError("%s: expected a size such as 200G, 1.5TiB or 1000000 (bytes)%s a share of the cache's "
                         "file system such as 50%%%s; got %r" % (what, "," if none else " or",
                                                                 ", or none" if none else "", value))
    n = float(m.group(1))
    if m.group(2) == "%":
        return int(total * n / 100)
    return int(n * _UNITS[(m.group(2) or "").lower()])


def limits(cache, env=None):
    """The cache's limits on this node: {"max": bytes or None, "free": bytes to keep free, "total": the file
    system's size, "available": its free bytes now}, from MESHRUN_DATA_CACHE_MAX (default none) and
    MESHRUN_DATA_CACHE_FREE (default 10%)."""
    env = os.environ if env is None else env
    st = os.statvfs(cache.objects)
    total = st.f_blocks * st.f_frsize
    return {"max": parse_limit(env.get("MESHRUN_DATA_CACHE_MAX") or DEFAULT_MAX, total, "MESHRUN_DATA_CACHE_MAX"),
            "free": parse_limit(env.get("MESHRUN_DATA_CACHE_FREE") or DEFAULT_FREE, total,
                                "MESHRUN_DATA_CACHE_FREE") or 0,
            "total": total, "available": st.f_bavail * st.f_frsize}


def _scan(folder):
    """The plain files of ``folder`` (links and anything else are left alone): [(name, lstat)]."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out.append((e.name, st))
    return out


def entries(cache):
    """The cache's objects, least recently used first: [{"id", "size", "used", "links"}]; ``used`` is the
    modification time of the object's lock file (touched at every use), else the object's own."""
    locks = {n[:-5]: st.st_mtime for n, st in _scan(cache.partial) if n.endswith(".lock")}
    out = [{"id": n, "size": st.st_size, "used": locks.get(n, st.st_mtime), "links": st.st_nlink}
           for n, st in _scan(cache.objects) if _ID.match(n)]
    return sorted(out, key=lambda e: (e["used"], e["id"]))


def partials(cache):
    """Partial downloads and their journals: [(name, lstat)] (lock files not included)."""
    return [(n, st) for n, st in _scan(cache.partial) if not n.endswith(".lock")]


def report(cache, env=None):
    """What ``meshrun data cache`` shows: the cache's objects, what is in use, partial downloads, limits."""
    objs, parts = entries(cache), partials(cache)
    linked = [e for e in objs if e["links"] > 1]
    return {"root": cache.root, "objects": len(objs), "bytes": sum(e["size"] for e in objs),
            "linked_objects": len(linked), "linked_bytes": sum(e["size"] for e in linked),
            "partial_files": len(parts), "partial_bytes": sum(st.st_size for _, st in parts),
            "oldest_use": objs[0]["used"] if objs else None, "newest_use": objs[-1]["used"] if objs else None,
            "limits": limits(cache, env)}


def _drop_partials(cache, now):
    """Partial downloads untouched for PARTIAL_AGE whose object nobody holds: removed, and so are lock files
    that old with neither an object nor a partial download (an object that failed its check). Returns bytes
    freed."""
    freed = 0
    groups = {}
    for n, st in _scan(cache.partial):
        groups.setdefault(n.split(".", 1)[0], []).append((n, st))
    for ident, files in groups.items():
        if not _ID.match(ident) or any(now - st.st_mtime < PARTIAL_AGE for _, st in files):
            continue
        if all(n.endswith(".lock") for n, _ in files) and os.path.lexists(cache.path(ident)):
            continue  # a cached object not used for a day: nothing to remove here
        lock = cache.lock(ident, wait=False)
        if lock is None:
            continue  # a download of it goes on
        try:
            for n, st in files:
                if n.endswith(".lock"):
                    continue
                _remove(os.path.join(cache.partial, n))
                freed += st.st_size
            if not os.path.lexists(cache.path(ident)):
                _remove(os.path.join(cache.partial, ident + ".lock"))  # held: a waiter takes the next one
        finally:
            os.close(lock)
    return freed


def evict(cache, need=0, keep=(), target=None, env=None, scan=False):
    """Room in the cache: when it is over a limit (or given a ``target``, or ``scan``), removes partial downloads older than
    PARTIAL_AGE (and lock files that old of objects it does not hold), then the least recently used
    objects until the cache (objects and partial downloads) holds at most its limit with ``need`` bytes more
    (``target`` bytes, else MESHRUN_DATA_CACHE_MAX) and, unless a ``target`` is given, the file system keeps
    MESHRUN_DATA_CACHE_FREE free with them. Never removed: an object of ``keep`` (the ids of the job being
    staged), one with more than one link (a job's input links it: removing the cache's name would free
    nothing, and the next job would download it again beside it), one whose lock another stager holds. One
    eviction at a time per cache (``evict.lock``). Returns {"objects", "bytes", "short"}: what was removed, and
    how much could not be freed."""
    import fcntl

    out = {"objects": 0, "bytes": 0, "short": 0}
    fd = os.open(os.path.join(cache.root, "evict.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        lim = limits(cache, env)
        if not scan and target is None and lim["max"] is None and lim["available"] >= lim["free"] + need:
            return out  # within its limits, without reading the cache's folders (it may hold many objects)
        out["bytes"] += _drop_partials(cache, time.time())
        objs = entries(cache)
        held = sum(e["size"] for e in objs) + sum(st.st_size for _, st in partials(cache))
        if target is not None:
            todo = held + need - target
        else:
            available = os.statvfs(cache.objects)
            available = available.f_bavail * available.f_frsize
            todo = max(held + need - lim["max"] if lim["max"] is not None else 0,
                       lim["free"] + need - available)
        keep = set(keep)
        for e in objs:
            if todo <= 0:
                break
            if e["id"] in keep or e["links"] > 1:
                continue
            lock = cache.lock(e["id"], wait=False)
            if lock is None:
                continue  # a stager places or downloads it now
            try:
                path = cache.path(e["id"])
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                    continue
                os.unlink(path)
                _remove(os.path.join(cache.partial, e["id"] + ".lock"))  # held: a waiter takes the next one
            finally:
                os.close(lock)
            todo -= st.st_size
            out["objects"] += 1
            out["bytes"] += st.st_size
        out["short"] = max(todo, 0)
    finally:
        os.close(fd)
    return out


def evict_said(cache, need=0, keep=()):
    """``evict`` for a stager, what it did said in the job's log; a failure to evict is said, not raised (the
    job's inputs are what matters)."""
    try:
        r = evict(cache, need=need, keep=keep)
    except OSError as e:
        say("data cache: eviction failed: %s" % clean(e))
        return None
    if r["objects"] or r["bytes"]:
        say("data cache: removed %d least recently used object(s) (and partial downloads older than %dh), %s"
            % (r["objects"], PARTIAL_AGE // 3600, fmt_size(r["bytes"])))
    if r["short"]:
        say("data cache: %s short of its limits (MESHRUN_DATA_CACHE_MAX, MESHRUN_DATA_CACHE_FREE): nothing more "
            "may be removed (what is left is linked from jobs' inputs or held by another stager)"
            % fmt_size(r["short"]))
    return r


# ---- progress ------------------------------------------------------------------------------------


class Progress:
    """Bytes moved out of a total, said every few seconds while a transfer runs."""

    def __init__(self, verb, total, count):
        self.verb, self.total, self.count = verb, total, count
        self.done = 0
        self.lock = threading.Lock()
        self.start = time.time()
        self._stop = threading.Event()
        self._t = None
        self.every = float(os.environ.get("MESHRUN_DATA_PROGRESS_EVERY") or 5.0)
        if total > 0 and self.every > 0:
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()

    def add(self, n):
        with self.lock:
            self.done += n

    def _loop(self):
        while not self._stop.wait(self.every):
            dt = max(time.time() - self.start, 1e-6)
            say("%s %s of %s (%d objects), %.1f MiB/s" % (self.verb, fmt_size(self.done), fmt_size(self.total),
                                                          self.count, self.done / dt / (1 << 20)))

    def close(self):
        self._stop.set()


# ---- downloads -----------------------------------------------------------------------------------


class _Crc32:
    """zlib's CRC-32 behind hashlib's face (update, hexdigest): ten times MD5's speed."""

    def __init__(self):
        self.v = 0

    def update(self, b):
        self.v = zlib.crc32(b, self.v)

    def hexdigest(self):
        return "%08x" % self.v


def _hasher(algo):
    return hashlib.md5() if algo == "md5" else _Crc32() if algo == "crc32" else None


def _b64(crc):
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _plan(client, bucket, key, size, etag, version):
    """How to fetch and check one object: (parts [(start, end inclusive)], check, expected), ``check`` being
    "crc32-composite" (the server's CRC-32 of each part's CRC-32, a multi-part upload's default today),
    "crc32" (a whole-object CRC-32), "md5-multipart" (the ETag of a multi-part upload), "md5" (a single
    part's ETag) or "size" (nothing else to check against: e.g. SSE-KMS, parts of unequal sizes). A CRC-32
    the server keeps is preferred: hashing it costs a tenth of MD5's time."""
    kw = {"VersionId": version} if version else {}
    try:
        head = client.head_object(Bucket=bucket, Key=key, IfMatch='"%s"' % etag, ChecksumMode="ENABLED", **kw)
    except Exception as e:
        raise _client_error(e, "s3://%s/%s" % (bucket, key), client)
    crc = head.get("ChecksumCRC32") or ""
    chunks = [(s, min(size, s + PART) - 1) for s in range(0, size, PART)]
    m = _MULTI.match(etag)
    if m:
        n = int(m.group(2))
        try:
            psize = int(client.head_object(Bucket=bucket, Key=key, PartNumber=1, IfMatch='"%s"' % etag,
                                           **kw)["ContentLength"])
        except Exception:
            psize = 0
        if psize > 0 and (size + psize - 1) // psize == n:
            parts = [(i * psize, min(size, (i + 1) * psize) - 1) for i in range(n)]
            if crc.endswith("-%d" % n):
                return parts, "crc32-composite", crc
            return parts, "md5-multipart", etag
    if crc and "-" not in crc:
        return chunks, "crc32", crc
    if not m and _MD5.match(etag):
        return ([(0, size - 1)] if size else []), "md5", etag  # one part: its MD5 is the ETag
    return chunks, "size", None


_PART_ALGO = {"crc32-composite": "crc32", "crc32": "crc32", "md5-multipart": "md5", "md5": "md5", "size": None}


def _hash_range(fd, start, end, algo):
    h = _hasher(algo)
    if h is None:
        return ""
    pos = start
    while pos <= end:
        b = os.pread(fd, min(8 << 20, end + 1 - pos), pos)
        if not b:
            break
        h.update(b)
        pos += len(b)
    return h.hexdigest()


def _get_range(client, bucket, key, etag, version, fd, start, end, progress, algo="md5", whole=False):
    """GET bytes start..end (the whole object: ``whole``) into ``fd`` at their offset; returns their digest by
    ``algo`` ("" for None). A whole-object GET asks for the server's checksum: where it has one, botocore checks
    it as the body streams (a mismatch raises) and the result is "server"."""
    kw = {"VersionId": version} if version else {}
    if whole:
        kw["ChecksumMode"] = "ENABLED"
    elif end >= start:
        kw["Range"] = "bytes=%d-%d" % (start, end)
    resp = client.get_object(Bucket=bucket, Key=key, IfMatch='"%s"' % etag, **kw)
    body = resp["Body"]
    server = whole and any(resp.get(k) and "-" not in resp[k] for k in _SERVER_SUMS)
    h = None if server else _hasher(algo)
    pos = start
    try:
        while True:
            try:
                b = body.read(1 << 20)
            except Exception as e:
                if type(e).__name__ == "FlexibleChecksumError":  # the server's stored checksum (CRC32 ...)
                    raise IntegrityError("s3://%s/%s: checksum mismatch: %s (corrupted in the store or on the way)"
                                         % (bucket, key, e))
                raise
            if not b:
                break
            if h is not None:
                h.update(b)
            os.pwrite(fd, b, pos)
            pos += len(b)
            progress.add(len(b))
    finally:
        body.close()
    if pos != end + 1:
        raise StageError("s3://%s/%s: the server sent %d bytes of the range %d-%d" % (bucket, key, pos - start,
                                                                                    start, end))
    return "server" if server else (h.hexdigest() if h is not None else "")


_SERVER_SUMS = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256")


def fetch_object(client, cache, obj, progress, pool, dest=None):
    """Download one object into the cache (resuming a partial download), verify it, place it at ``dest`` (if
    given) and return its cache path. ``obj``: {"bucket", "key", "size", "etag", "version"}; its cache id goes
    into ``obj["ident"]``. The object's lock is held throughout, so no eviction removes it before the job's
    link to it is made; its lock file's modification time records this use (the eviction's last use)."""
    bucket, key, size, etag, version = obj["bucket"], obj["key"], obj["size"], obj["etag"], obj.get("version")
    ident = obj["ident"] = cache.ident(bucket, key, etag, version)
    final = cache.path(ident)
    lock = None
    try:
        hit = cache.hit(ident, size)
        if hit:  # placed under a shared lock: an eviction passes over it meanwhile
            lock = cache.lock(ident, exclusive=False)
            hit = cache.hit(ident, size)  # still there (not evicted before the lock was ours)
        if not hit:
            # one download of an object per cache at a time (the nodes of a job on one host, two jobs): the
            # others wait, then find it in the cache
            if lock is not None:
                os.close(lock)
                lock = None
            lock = cache.lock(ident)
            hit = cache.hit(ident, size)
        if hit:
            progress.add(size)
            obj["cached"] = True
        else:
            _fetch_locked(client, cache, obj, ident, final, progress, pool)
        os.utime(lock)
        if dest is not None:
            place(final, dest)
        return final
    finally:
        if lock is not None:
            os.close(lock)


def _fetch_locked(client, cache, obj, ident, final, progress, pool):
    bucket, key, size, etag, version = obj["bucket"], obj["key"], obj["size"], obj["etag"], obj.get("version")
    url = "s3://%s/%s" % (bucket, key)
    part = os.path.join(cache.partial, ident)
    journal_path = part + ".json"
    if pool is None:  # a small object: one GET, checked as it streams
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            algo = "md5" if _MD5.match(etag) else None
            digest = _get_range(client, bucket, key, etag, version, fd, 0, size - 1, progress, algo, whole=True)
            if size == 0 and algo:
                digest = hashlib.md5(b"").hexdigest()
            _verify(url, part, journal_path, fd, size, "server" if digest == "server" else algo or "size",
                    etag if algo else None, [digest])
            obj["verified"] = "server checksum" if digest == "server" else algo or "size"
            os.fchmod(fd, 0o444)
        finally:
            os.close(fd)
        os.replace(part, final)
        return final
    ranges, check, expected = _plan(client, bucket, key, size, etag, version)
    algo = _PART_ALGO[check]
    journal = {"etag": etag, "size": size, "ranges": ranges, "check": check, "done": {}}
    old = None
    try:
        with open(journal_path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        pass
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    lock = threading.Lock()
    try:
        if isinstance(old, dict) and all(old.get(k) == journal[k] for k in ("etag", "size", "check")) \
                and [list(r) for r in ranges] == [list(r) for r in old.get("ranges") or []]:
            for i, digest in (old.get("done") or {}).items():  # resume: a complete part counts once re-hashed
                s, e = ranges[int(i)]
                if _hash_range(fd, s, e, algo) == digest:
                    journal["done"][i] = digest
                    progress.add(e - s + 1)
            if journal["done"]:
                say("%s: resuming, %d of %d parts already here" % (url, len(journal["done"]), len(ranges)))
        os.ftruncate(fd, size)

        def finish(i, digest):
            with lock:
                journal["done"][str(i)] = digest
                tmp = journal_path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(journal, f)
                os.replace(tmp, journal_path)

        todo = [i for i in range(len(ranges)) if str(i) not in journal["done"]]
        _parallel_parts(client, obj, fd, ranges, todo, algo, progress, pool, finish)
        _verify(url, part, journal_path, fd, size, check, expected,
                [journal["done"][str(i)] for i in range(len(ranges))])
        obj["verified"] = check
        os.fchmod(fd, 0o444)
    finally:
        os.close(fd)
    os.replace(part, final)
    _remove(journal_path)
    return final


def _verify(url, part, journal_path, fd, size, check, expected, digests):
    """The downloaded object against ``expected`` by ``check`` (see _plan), from its parts' ``digests``; a
    mismatch removes what was downloaded and raises IntegrityError."""
    got = os.fstat(fd).st_size
    if got != size:
        what = "%d bytes downloaded, the object has %d" % (got, size)
    elif check == "md5-multipart":
        got = "%s-%d" % (hashlib.md5(b"".join(bytes.fromhex(d) for d in digests)).hexdigest(), len(digests))
        what = "the object's ETag is %s, the downloaded data gives %s" % (expected, got) if got != expected else ""
    elif check == "md5":
        what = "the object's ETag is %s, the downloaded data gives %s" % (expected, digests[0]) \
            if digests[0] != expected else ""
    elif check == "crc32-composite":
        got = "%s-%d" % (_b64(zlib.crc32(b"".join(bytes.fromhex(d) for d in digests))), len(digests))
        what = "the server's CRC-32 is %s, the downloaded data gives %s" % (expected, got) if got != expected else ""
    elif check == "crc32":
        got = _b64(int(_hash_range(fd, 0, size - 1, "crc32"), 16))
        what = "the server's CRC-32 is %s, the downloaded data gives %s" % (expected, got) if got != expected else ""
    else:  # "server" (botocore checked it as it streamed) or "size"
        what = ""
    if what:
        _remove(part)
        _remove(journal_path)
        raise IntegrityError("%s: checksum mismatch: %s (corrupted in the store or on the way); nothing was kept"
                             % (url, what))


def _parallel_parts(client, obj, fd, ranges, todo, algo, progress, pool, finish):
    """Parts ``todo`` of one object as ranged GETs of at most SUB bytes side by side in ``pool``; a part whose
    last range arrives is hashed (read back: its ranges came out of order) and ``finish``ed. Returns once no
    range is in flight, even when one failed (its error is raised then)."""
    from concurrent.futures import wait

    bucket, key, etag, version = obj["bucket"], obj["key"], obj["etag"], obj.get("version")
    lock = threading.Lock()
    units, left = [], {}
    for i in todo:
        s, e = ranges[i]
        subs = [(a, min(e, a + SUB - 1)) for a in range(s, e + 1, SUB)]
        left[i] = len(subs)
        units += [(i, a, b, len(subs) == 1) for a, b in subs]

    def unit(i, a, b, whole):
        digest = _get_range(client, bucket, key, etag, version, fd, a, b, progress, algo if whole else None)
        with lock:
            left[i] -= 1
            last = left[i] == 0
        if last:
            if not whole:
                digest = _hash_range(fd, ranges[i][0], ranges[i][1], algo)
            finish(i, digest)

    futs = [pool.submit(unit, *u) for u in units]
    try:
        for f in futs:
            f.result()
    finally:
        for f in futs:
            f.cancel()
        wait(futs)  # nothing may write into ``fd`` once the caller closes it


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _safe_rel(rel, url):
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StageError("%s: the key part %r cannot be a path under the input's folder" % (url, rel))
    return os.path.join(*parts)


def list_input(client, source, path):
    """The objects of one input and where each goes: [(obj, destination)]."""
    bucket, key = split_url(source)
    out = []
    if key and not key.endswith("/"):
        try:
            h = client.head_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise _client_error(e, source, client)
        dest = os.path.join(path, os.path.basename(key)) if path.endswith("/") else path
        out.append(({"bucket": bucket, "key": key, "size": int(h["ContentLength"]), "etag": h["ETag"].strip('"'),
                     "version": h.get("VersionId")}, dest))
        return out
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        for page in pages:
            for o in page.get("Contents") or []:
                k = o["Key"]
                if k.endswith("/"):
                    continue  # a folder marker
                dest = os.path.join(path, _safe_rel(k[len(key):], "s3://%s/%s" % (bucket, k)))
                out.append(({"bucket": bucket, "key": k, "size": int(o["Size"]), "etag": o["ETag"].strip('"')},
                            dest))
    except StageError:
        raise
    except Exception as e:
        raise _client_error(e, source, client)
    if not out:
        raise StageError("%s: no objects under this prefix" % source)
    return out


def place(src, dest):
    """The cached object at ``dest``: a hard link (read-only, shared with the cache), else a copy."""
    d = os.path.dirname(dest)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = "%s.meshrun-tmp.%d" % (dest, os.getpid())
    _remove(tmp)
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def download(client, items, cache, workers=WORKERS):
    """Fetch and place ``items`` ([(obj, dest)]); returns a summary dict."""
    total = sum(o["size"] for o, _ in items)
    progress = Progress("downloaded", total, len(items))
    t0 = time.time()
    try:
        small, large = [], []
        for o, d in items:
            (small if o["size"] <= PART and not _MULTI.match(o["etag"]) else large).append((o, d))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futs = [pool.submit(fetch_object, client, cache, o, progress, None, d) for o, d in small]
            for f in futs:
                f.result()
        with ThreadPoolExecutor(max_workers=workers) as parts:
            for o, d in large:
                fetch_object(client, cache, o, progress, parts, d)
    except StageError:
        raise
    except Exception as e:
        what = getattr(e, "operation_name", None)
        raise _client_error(e, "download" + (" (%s)" % what if what else ""), client)
    finally:
        progress.close()
    cached = sum(o["size"] for o, _ in items if o.get("cached"))
    return {"objects": len(items), "bytes": total, "cached_bytes": cached, "seconds": time.time() - t0}


# ---- uploads -------------------------------------------------------------------------------------


def _walk(path):
    if os.path.isfile(path):
        yield path, None
        return
    for d, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            if os.path.isfile(p) and not os.path.islink(p):
                yield p, os.path.relpath(p, path).replace(os.sep, "/")


def upload_items(path, destination):
    """[(local file, bucket, key)] for one output: a folder goes under the prefix by relative path, a file to
    the key itself (or under a prefix ending in /)."""
    bucket, key = split_url(destination)
    out = []
    for f, rel in _walk(path):
        if rel is None:
            k = key + os.path.basename(f) if (not key or key.endswith("/")) else key
        else:
            k = (key if (not key or key.endswith("/")) else key + "/") + rel
        out.append((f, bucket, k))
    return out


def upload(client, items, workers=WORKERS, record=None):
    """Upload ``items`` ([(file, bucket, key)]) through s3transfer; ``record`` (a dict key -> [size, mtime_ns])
    skips files unchanged since they were last uploaded and is updated. Returns a summary dict."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    todo = []
    for f, b, k in items:
        st = os.stat(f)
        sig = [st.st_size, st.st_mtime_ns]
        if record is not None and record.get("s3://%s/%s" % (b, k)) == sig:
            continue
        todo.append((f, b, k, sig))
    total = sum(s[0] for *_, s in todo)
    progress = Progress("uploaded", total, len(todo))
    t0 = time.time()
    cfg = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=workers,
                         use_threads=True)

    from s3transfer.subscribers import BaseSubscriber

    class Counted(BaseSubscriber):
        def on_progress(self, future, bytes_transferred, **kwargs):
            progress.add(bytes_transferred)

    try:
        with create_transfer_manager(client, cfg) as tm:
            futs = []
            for f, b, k, sig in todo:
                futs.append((tm.upload(f, b, k, subscribers=[Counted()]), b, k, sig))
            for fut, b, k, sig in futs:
                try:
                    fut.result()
                except Exception as e:
                    raise _client_error(e, "upload to s3://%s/%s" % (b, k), client)
                if record is not None:
                    record["s3://%s/%s" % (b, k)] = sig
    finally:
        progress.close()
    return {"objects": len(todo), "bytes": total, "seconds": time.time() - t0}


# ---- the job's steps -----------------------------------------------------------------------------


def _launch(job_dir):
    with open(os.path.join(job_dir, "launch.json")) as f:
        launch = json.load(f)
    data = launch.get("data") or {}
    cwd = launch.get("cwd") or job_dir
    return data, cwd


def _at(cwd, path):
    p = os.path.expanduser(path)
    return p if os.path.isabs(p) else os.path.join(cwd, p)


def step_in(job_dir):
    data, cwd = _launch(job_dir)
    inputs = data.get("inputs") or []
    if not inputs:
        return 0
    client = make_client()
    cache = Cache(endpoint=endpoint_of(client))
    items = []
    for i in inputs:
        path = _at(cwd, i["path"])
        if i["source"].endswith("/") and not path.endswith("/"):
            path += "/"
        items.extend(list_input(client, i["source"], path))
    say("staging %d input object(s), %s" % (len(items), fmt_size(sum(o["size"] for o, _ in items))))
    limits(cache)  # a bad MESHRUN_DATA_CACHE_MAX or _FREE is said before anything is downloaded
    missing = {}
    for o, _ in items:
        ident = cache.ident(o["bucket"], o["key"], o["etag"], o.get("version"))
        missing[ident] = 0 if cache.hit(ident, o["size"]) else o["size"]
    keep, need = set(missing), sum(missing.values())
    if need:
        evict_said(cache, need=need, keep=keep)  # room for the downloads first
    s = download(client, items, cache)
    evict_said(cache, keep=keep)
    rate = (s["bytes"] - s["cached_bytes"]) / max(s["seconds"], 1e-6) / (1 << 20)
    say("inputs ready: %d object(s), %s (%s from the cache) in %.1fs, %.1f MiB/s"
        % (s["objects"], fmt_size(s["bytes"]), fmt_size(s["cached_bytes"]), s["seconds"], rate))
    return 0


_POLICY = {"succeeded": "success", "failed": "failure", "timeout": "failure", "cancelled": "cancel"}


def _record(job_dir):
    try:
        with open(os.path.join(job_dir, RECORD)) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_record(job_dir, rec):
    path = os.path.join(job_dir, RECORD)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)


def _upload_outputs(job_dir, outputs, cwd, client):
    rec = _record(job_dir)
    n = size = 0
    try:
        for o in outputs:
            path = _at(cwd, o["path"])
            if not os.path.exists(path):
                say("output %s: nothing at %s, nothing to upload" % (o["path"], path))
                continue
            s = upload(client, upload_items(path, o["destination"]), record=rec)
            n += s["objects"]
            size += s["bytes"]
    finally:
        _save_record(job_dir, rec)
    return n, size


def step_out(job_dir, state):
    data, cwd = _launch(job_dir)
    when = _POLICY.get(state, "failure")
    outputs = [o for o in data.get("outputs") or [] if when in (o.get("on") or ["success"])]
    if not outputs:
        if data.get("outputs"):
            say("the job %s: no output is uploaded %s" % (state, "on " + when))
        return 0
    t0 = time.time()
    n, size = _upload_outputs(job_dir, outputs, cwd, make_client())
    say("outputs uploaded (the job %s): %d object(s), %s in %.1fs" % (state, n, fmt_size(size), time.time() - t0))
    return 0


def step_sync(job_dir):
    """Upload the outputs that have an ``every`` at that interval until terminated."""
    data, cwd = _launch(job_dir)
    outputs = [o for o in data.get("outputs") or [] if o.get("every")]
    if not outputs:
        return 0
    import signal

    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    client = make_client()
    every = min(float(o["every"]) for o in outputs)
    last = {id(o): time.time() for o in outputs}
    while True:
        time.sleep(max(0.2, min(every, 5.0)))
        due = [o for o in outputs if time.time() - last[id(o)] >= float(o["every"])]
        if not due:
            continue
        try:
            n, size = _upload_outputs(job_dir, due, cwd, client)
            if n:
                say("periodic upload: %d object(s), %s" % (n, fmt_size(size)))
        except StageError as e:
            say("periodic upload failed (tried again later): %s" % e)
        for o in due:
            last[id(o)] = time.time()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="stage.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("in", "out", "sync"))
    ap.add_argument("job_dir")
    ap.add_argument("--state", default="failed")
    a = ap.parse_args(argv)
    try:
        __import__("boto3")
    except ImportError:
        say("boto3 is not installed for %s; install it there (pip install boto3) or set MESHRUN_DATA_PYTHON on "
            "this node to a Python that has it" % sys.executable)
        return 3
    try:
        if a.step == "in":
            return step_in(a.job_dir)
        if a.step == "out":
            return step_out(a.job_dir, a.state)
        return step_sync(a.job_dir)
    except StageError as e:
        say(clean(e))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
