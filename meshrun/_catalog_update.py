"""``meshrun catalog update``: fetch current cloud price tables into ``$MESHRUN_HOME/catalogs/v8``.

The tables are SkyPilot's public catalog files (``catalogs/v8/<cloud>/vms.csv`` and
``common/accelerators.csv`` of github.com/skypilot-org/skypilot-catalog), downloaded with httpx. Each update
goes into a new folder beside the last (``catalogs/snapshots/<time>``); every file is checked (a vms.csv must
parse and have the columns prices are read from) before ``catalogs/v8``, a symbolic link, is switched to the
new folder in one atomic rename. A reader therefore sees the old tables or the new ones, never a mix, and a
failed or interrupted update leaves the old tables in use.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ._errors import ConfigError, MeshrunError

#: where the tables come from (``$MESHRUN_CATALOG_URL`` or ``--source`` replace it, e.g. with a mirror)
DEFAULT_SOURCE = "https://raw.githubusercontent.com/skypilot-org/skypilot-catalog/master/catalogs/v8"
#: the GPU clouds fetched when none are named
DEFAULT_CLOUDS = ("aws", "azure", "gcp", "lambda", "nebius", "runpod", "fluidstack", "cudo", "paperspace", "vast")
KEEP = 2  # downloads kept (the one in use and the one before)


@dataclass
class UpdateResult:
    folder: Path
    source: str
    fetched: dict[str, int] = field(default_factory=dict)  # cloud -> bytes
    missing: dict[str, str] = field(default_factory=dict)  # cloud -> why it is not there


def update_catalog(
    clouds: Sequence[str] | None = None,
    *,
    source: str | None = None,
    dest: Path | None = None,
    timeout: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> UpdateResult:
    """Fetch the price tables of ``clouds`` (default: :data:`DEFAULT_CLOUDS`) and make them the catalog in
    use. A cloud the source does not have is reported in ``missing``; no table at all is an error."""
    import httpx

    from ._catalog import FETCHED_FILE, _read_vms, clear_cache, updated_dir

    src = (source or os.environ.get("MESHRUN_CATALOG_URL") or DEFAULT_SOURCE).rstrip("/")
    if not src.startswith(("https://", "http://")):
        raise ConfigError("source", f"expected an http(s) URL of a catalogs/v8 folder, got {src!r}")
    names = list(clouds) if clouds else list(DEFAULT_CLOUDS)
    for c in names:
        if not c or not all(ch.isalnum() or ch in "-_" for ch in c):
            raise ConfigError("clouds", f"{c!r} is not a cloud name (letters, digits, - and _)")
    link = dest or updated_dir()
    root = link.parent
    snapshots = root / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True, mode=0o700)
    new = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%S-", time.gmtime()), dir=snapshots))
    say = progress or (lambda _m: None)
    result = UpdateResult(folder=link, source=src)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            for rel in ["common/accelerators.csv"] + [f"{c}/vms.csv" for c in names]:
                cloud = rel.split("/")[0]
                target = new / rel
                target.parent.mkdir(exist_ok=True)
                def tick(n: int, rel: str = rel) -> None:
                    say(f"{rel}: {_mb(n)}")

                try:
                    size = _download(client, f"{src}/{rel}", target, tick)
                except _NotThere as e:
                    result.missing[cloud] = str(e)
                    shutil.rmtree(target.parent, ignore_errors=True)
                    continue
                if rel.endswith("vms.csv"):
                    try:
                        rows = _read_vms(cloud, target)
                    except (OSError, ValueError) as e:
                        raise MeshrunError(f"{src}/{rel} is not a price table: {e}") from None
                    if not rows:
                        raise MeshrunError(f"{src}/{rel} has no priced rows")
                    result.fetched[cloud] = size
                    say(f"{rel}: {_mb(size)}, {len(rows)} priced rows")
        if not result.fetched:
            raise MeshrunError(f"no price table could be fetched from {src} ("
                               + "; ".join(f"{c}: {w}" for c, w in result.missing.items()) + ")")
        (new / FETCHED_FILE).write_text(json.dumps({"fetched_at": time.time(), "source": src,
                                                    "clouds": sorted(result.fetched)}))
        _switch(link, new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    clear_cache()
    _prune(snapshots, keep=new)
    return result


class _NotThere(Exception):
    pass


def _download(client: object, url: str, target: Path, tick: Callable[[int], None]) -> int:
    import httpx

    assert isinstance(client, httpx.Client)
    try:
        with client.stream("GET", url) as r:
            if r.status_code == 404:
                raise _NotThere("not in the source (HTTP 404)")
            if r.status_code != 200:
                raise MeshrunError(f"fetching {url} failed: HTTP {r.status_code}")
            n, last = 0, 0.0
            with open(target, "wb") as f:
                for chunk in r.iter_bytes(1 << 16):
                    f.write(chunk)
                    n += len(chunk)
                    if time.monotonic() - last > 0.25:
                        tick(n)
                        last = time.monotonic()
            return n
    except httpx.HTTPError as e:
        raise MeshrunError(f"fetching {url} failed: {type(e).__name__}: {e}") from None


def _switch(link: Path, new: Path) -> None:
    """Point ``link`` at ``new`` in one rename (a real folder left there by hand is kept aside, not lost)."""
    tmp = link.parent / f".v8.{os.getpid()}.link"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(os.path.relpath(new, link.parent), tmp)
    if link.is_dir() and not link.is_symlink():
        link.rename(link.parent / f"v8.before-update-{int(time.time())}")
    os.replace(tmp, link)


def _prune(snapshots: Path, keep: Path) -> None:
    old = sorted((p for p in snapshots.iterdir() if p.is_dir() and p != keep), key=lambda p: p.name)
    for p in old[: max(0, len(old) - (KEEP - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def cli_progress() -> Callable[[str], None]:
    """Progress on stderr: a byte count rewritten in place on a terminal, and one line per finished table."""
    tty = sys.stderr.isatty()

    def say(msg: str) -> None:
        done = "priced rows" in msg
        if tty:
            sys.stderr.write("\r\033[K" + msg + ("\n" if done else ""))
        elif done:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    return say
