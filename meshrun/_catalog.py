"""Cloud prices from SkyPilot-format catalog files (``catalogs/v8``), read directly with the csv module.

Layout of a catalog folder (the one SkyPilot keeps in ``~/.sky/catalogs/v8``)::

    <cloud>/vms.csv          InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,
                             GpuInfo,SpotPrice[,AvailabilityZone,...]   one row per instance type and region
    slurm/pricing.csv        Region,Zone,PricePerVCPU,PricePerMemoryGB,AcceleratorName,PricePerAccelerator
    common/accelerators.csv  AcceleratorName,Clouds                     which clouds offer which GPU

Which folder: the ``catalog_dir`` argument, else ``$MESHRUN_CATALOG_DIR``, else ``[placement] catalog_dir``
in the config, else the tables ``meshrun catalog update`` fetched (``$MESHRUN_HOME/catalogs/v8``), else
``~/.sky/catalogs/v8`` when SkyPilot keeps one, else the dated snapshot that ships inside the package
(``meshrun/catalogs``; see its SOURCE.md). :func:`catalog_info` says which one is used and how old it is.

A folder is parsed once and cached until one of its files changes (size or mtime). :func:`catalog_offers`
turns the rows that fit a job into :class:`meshrun.Offer` objects; the SkyPilot backend uses it for its own
offers, and placement uses it to show cloud prices when no cloud backend is installed.
"""

from __future__ import annotations

import csv
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ._backend import Offer
from ._errors import ConfigError

GIB = 1024**3
MIB = 1024**2

#: folders of a catalog that describe on-prem schedulers, not clouds with instance prices
NOT_CLOUDS = frozenset({"common", "slurm", "kubernetes", "ssh", "local"})

#: assumed time to provision a cloud VM, when the configuration does not say (seconds)
DEFAULT_CLOUD_START = 300.0

#: the snapshot shipped inside the package, and the day it was taken
SHIPPED = Path(__file__).resolve().parent / "catalogs" / "v8"
SNAPSHOT_DATE = "2026-12-06"
#: written by ``meshrun catalog update`` beside the tables it fetched: {"fetched_at": epoch, "source": url}
FETCHED_FILE = "FETCHED.json"

_SIZE_IN_MIB = re.compile(r"'SizeInMiB':\s*([0-9.]+)")


def norm_gpu(name: str | None) -> str:
    """Accelerator names compared the way SkyPilot's canonical names are: case and punctuation ignored
    (``h100`` = ``H100``, ``RTX6000-Ada`` = ``RTX6000Ada``), but ``A100`` and ``A100-80GB`` stay distinct."""
    if not name:
        return ""
    return "".join(ch for ch in name.lower() if ch.isalnum())


@dataclass(frozen=True, slots=True)
class VM:
    """One priced row of a cloud's vms.csv (the cheapest zone of its region)."""

    cloud: str
    instance_type: str
    gpu: str  # accelerator name as the catalog spells it ("" for CPU-only)
    gpu_norm: str
    gpus: int
    vcpus: float
    memory_gib: float
    price: float | None  # on-demand $/hour; None when the row has no on-demand price
    spot_price: float | None
    region: str
    gpu_memory_mib: float | None  # per GPU


@dataclass(frozen=True, slots=True)
class SlurmPrice:
    """One row of slurm/pricing.csv; empty strings are wildcards."""

    region: str
    zone: str
    per_vcpu: float
    per_memory_gb: float
    accelerator: str
    per_accelerator: float


@dataclass
class Catalog:
    """A parsed catalog folder. ``index`` maps (normalized GPU name, count) to rows; CPU rows are ("", 0)."""

    root: Path | None
    vms: dict[str, list[VM]] = field(default_factory=dict)  # cloud -> rows
    index: dict[str, dict[tuple[str, int], list[VM]]] = field(default_factory=dict)  # cloud -> index
    accelerators: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # norm -> (name, clouds)
    slurm_pricing: list[SlurmPrice] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # files that could not be read, and why
    load_seconds: float = 0.0

    @property
    def clouds(self) -> list[str]:
        return sorted(self.vms)

    def __len__(self) -> int:
        return sum(len(v) for v in self.vms.values())

    def canonical_gpu(self, name: str | None) -> str | None:
        """The catalog's spelling of a GPU name (``h100`` -> ``H100``), or the name itself if unknown."""
        if not name:
            return name
        hit = self.accelerators.get(norm_gpu(name))
        if hit:
            return hit[0]
        n = norm_gpu(name)
        for cloud_index in self.index.values():
            for (g, _), rows in cloud_index.items():
                if g == n and rows:
                    return rows[0].gpu
        return name


# ---- where the catalog is --------------------------------------------------------------------------


def catalog_dir(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The catalog folder to use, or None when there is none (see the module docstring for the order)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError("catalog_dir", f"{str(p)!r} is not a folder (expected a SkyPilot catalogs/v8 folder)")
        return p
    env = os.environ.get("MESHRUN_CATALOG_DIR")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise ConfigError("MESHRUN_CATALOG_DIR", f"{env!r} is not a folder")
        return p
    from ._config import get_config

    conf = get_config().section("placement").get("catalog_dir")
    if conf:
        p = Path(str(conf)).expanduser()
        if not p.is_dir():
            raise ConfigError("placement.catalog_dir", f"{str(p)!r} is not a folder")
        return p
    fetched = updated_dir()
    if fetched.is_dir():
        return fetched
    sky = Path.home() / ".sky" / "catalogs" / "v8"
    if catalog_has_tables(sky):
        return sky
    return SHIPPED if SHIPPED.is_dir() else None


def catalog_has_tables(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a cloud's price table (``<cloud>/vms.csv``): SkyPilot makes its catalogs folder
    (with only ``.meta`` in it) before it has fetched any cloud's table."""
    try:
        return any((Path(folder) / c / "vms.csv").is_file() for c in os.listdir(folder) if not c.startswith("."))
    except OSError:
        return False


def updated_dir() -> Path:
    """Where ``meshrun catalog update`` keeps the tables it fetched (a link to the newest download)."""
    from ._config import default_home

    return default_home() / "catalogs" / "v8"


@dataclass(frozen=True)
class CatalogInfo:
    """Which catalog folder prices come from, and how old its prices are."""

    root: Path | None
    kind: str  # "shipped", "fetched", "skypilot" or "configured"
    as_of: float | None  # epoch seconds: when the tables were fetched (or the newest file's mtime)
    source: str

    def age_text(self, now: float | None = None) -> str:
        """``prices from the catalog shipped with meshrun (snapshot of 2026-12-06, 12 days old)``."""
        import time

        if self.root is None:
            return "no price catalog (run `meshrun catalog update`)"
        when = ""
        if self.as_of is not None:
            days = max(0, int(((now if now is not None else time.time()) - self.as_of) // 86400))
            day = time.strftime("%Y-%m-%d", time.gmtime(self.as_of))
            when = f" of {day}, {'today' if days == 0 else f'{days} day' + ('s' if days != 1 else '') + ' old'}"
        what = {"shipped": "the snapshot shipped with meshrun", "fetched": "`meshrun catalog update`",
                "skypilot": "SkyPilot's catalog", "configured": "the configured catalog"}[self.kind]
        return f"prices from {what} ({self.root}{when}); refresh: meshrun catalog update"


def catalog_info(path: str | os.PathLike[str] | None = None) -> CatalogInfo:
    """The catalog :func:`load_catalog` would read, what kind it is and how old its prices are."""
    import calendar
    import json
    import time

    root = catalog_dir(path)
    if root is None:
        return CatalogInfo(None, "configured", None, "")
    if root == SHIPPED:
        return CatalogInfo(root, "shipped", calendar.timegm(time.strptime(SNAPSHOT_DATE, "%Y-%m-%d")),
                           "github.com/skypilot-org/skypilot-catalog")
    try:
        meta = json.loads((root / FETCHED_FILE).read_text())
        return CatalogInfo(root, "fetched", float(meta["fetched_at"]), str(meta.get("source", "")))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    newest = max((e[3] / 1e9 for e in _signature(root)), default=None)
    kind = "skypilot" if root == Path.home() / ".sky" / "catalogs" / "v8" else "configured"
    return CatalogInfo(root, kind, newest, str(root))


# ---- loading -----------------------------------------------------------------------------------------

_cache: dict[str, tuple[tuple[Any, ...], Catalog]] = {}
_cache_lock = threading.Lock()


def _signature(root: Path) -> tuple[Any, ...]:
    """What decides whether a cached parse is still good: each relevant file's name, size and mtime."""
    sig: list[Any] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return ()
    for e in entries:
        if not e.is_dir():
            continue
        for fname in ("vms.csv", "pricing.csv", "accelerators.csv"):
            try:
                st = os.stat(os.path.join(e.path, fname))
            except OSError:
                continue
            sig.append((e.name, fname, st.st_size, st.st_mtime_ns))
    return tuple(sig)


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """The parsed catalog (cached per folder until a file changes). An empty Catalog when there is none."""
    root = catalog_dir(path)
    if root is None:
        return Catalog(root=None)
    key = str(root.resolve())
    sig = _signature(root)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
    import time

    t0 = time.perf_counter()
    cat = _parse(root)
    cat.load_seconds = time.perf_counter() - t0
    with _cache_lock:
        _cache[key] = (sig, cat)
    return cat


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
        _offers_cache.clear()


def _float(s: str) -> float | None:
    s = s.strip()
    if not s:
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    return v if v == v and v >= 0 else None  # drop NaN and negatives


def _parse(root: Path) -> Catalog:
    cat = Catalog(root=root)
    try:
        entries = sorted(e for e in os.listdir(root) if (root / e).is_dir())
    except OSError as e:
        cat.errors.append(f"{root}: {e}")
        return cat
    for cloud in entries:
        if cloud in NOT_CLOUDS:
            continue
        f = root / cloud / "vms.csv"
        if f.is_file():
            try:
                rows = _read_vms(cloud, f)
            except (OSError, ValueError, csv.Error) as e:
                cat.errors.append(f"{f}: {e}")
                continue
            cat.vms[cloud] = rows
            idx: dict[tuple[str, int], list[VM]] = {}
            for r in rows:
                idx.setdefault((r.gpu_norm, r.gpus), []).append(r)
            cat.index[cloud] = idx
    acc = root / "common" / "accelerators.csv"
    if acc.is_file():
        try:
            cat.accelerators = _read_accelerators(acc)
        except (OSError, ValueError, csv.Error) as e:
            cat.errors.append(f"{acc}: {e}")
    sp = root / "slurm" / "pricing.csv"
    if sp.is_file():
        try:
            cat.slurm_pricing = _read_slurm_pricing(sp)
        except (OSError, ValueError, csv.Error) as e:
            cat.errors.append(f"{sp}: {e}")
    return cat


def _read_vms(cloud: str, path: Path) -> list[VM]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return []
        col = {name.strip(): i for i, name in enumerate(header)}
        need = ("InstanceType", "Price", "Region")
        missing = [n for n in need if n not in col]
        if missing:
            raise ValueError(f"not a vms.csv: missing column(s) {', '.join(missing)}")
        i_type, i_price, i_region = col["InstanceType"], col["Price"], col["Region"]
        i_acc, i_cnt = col.get("AcceleratorName"), col.get("AcceleratorCount")
        i_cpu, i_mem = col.get("vCPUs"), col.get("MemoryGiB")
        i_info, i_spot = col.get("GpuInfo"), col.get("SpotPrice")
        width = len(header)
        best: dict[tuple[str, str], VM] = {}
        for row in reader:
            if len(row) < width:
                row = row + [""] * (width - len(row))
            itype = row[i_type].strip()
            region = row[i_region].strip()
            if not itype or not region:
                continue
            gpu = row[i_acc].strip() if i_acc is not None else ""
            cnt = _float(row[i_cnt]) if i_cnt is not None else None
            gpus = int(cnt) if gpu and cnt else 0
            if gpu and gpus == 0:
                gpus = 1  # a fractional or missing count on a GPU row: at least one (partial) GPU
            price = _float(row[i_price])
            spot = _float(row[i_spot]) if i_spot is not None else None
            if price is None and spot is None:
                continue
            gmem = None
            if gpu and i_info is not None and row[i_info]:
                m = _SIZE_IN_MIB.search(row[i_info])
                if m:
                    gmem = float(m.group(1))
            vm = VM(
                cloud=cloud,
                instance_type=itype,
                gpu=gpu,
                gpu_norm=norm_gpu(gpu),
                gpus=gpus,
                vcpus=(_float(row[i_cpu]) or 0.0) if i_cpu is not None else 0.0,
                memory_gib=(_float(row[i_mem]) or 0.0) if i_mem is not None else 0.0,
                price=price,
                spot_price=spot,
                region=region,
                gpu_memory_mib=gmem,
            )
            # several zones of one region (AWS, GCP): keep the cheapest price of each kind
            k = (itype, region)
            old = best.get(k)
            if old is None:
                best[k] = vm
            else:
                best[k] = VM(**{**_fields(old), "price": _min(old.price, price), "spot_price": _min(old.spot_price, spot)})
    return list(best.values())


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _fields(vm: VM) -> dict[str, Any]:
    return {k: getattr(vm, k) for k in VM.__slots__}


def _read_accelerators(path: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    import ast

    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        for row in reader:
            if not row or not row[0].strip():
                continue
            clouds: tuple[str, ...] = ()
            if len(row) > 1 and row[1].strip():
                try:
                    v = ast.literal_eval(row[1].strip())
                    clouds = tuple(str(c) for c in v) if isinstance(v, (list, tuple)) else (str(v),)
                except (ValueError, SyntaxError):
                    clouds = tuple(c.strip(" '\"[]") for c in row[1].split(",") if c.strip(" '\"[]"))
            out[norm_gpu(row[0])] = (row[0].strip(), clouds)
    return out


def _read_slurm_pricing(path: Path) -> list[SlurmPrice]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        col = {name.strip(): i for i, name in enumerate(header)}

        def get(row: list[str], name: str) -> str:
            i = col.get(name)
            return row[i].strip() if i is not None and i < len(row) else ""

        for row in reader:
            if not row:
                continue
            out.append(SlurmPrice(
                region=get(row, "Region"),
                zone=get(row, "Zone"),
                per_vcpu=_float(get(row, "PricePerVCPU")) or 0.0,
                per_memory_gb=_float(get(row, "PricePerMemoryGB")) or 0.0,
                accelerator=get(row, "AcceleratorName"),
                per_accelerator=_float(get(row, "PricePerAccelerator")) or 0.0,
            ))
    return out


# ---- Slurm (on-prem) pricing table -------------------------------------------------------------------


def slurm_price(
    cat: Catalog,
    *,
    region: str | None,
    zone: str | None,
    gpu_type: str | None,
    gpus: int,
    cpus: float | None,
    memory: int | None,
) -> tuple[float, str] | None:
    """$/hour per node from slurm/pricing.csv, or None when no row matches.

    Lookup priority, as in SkyPilot: exact Region and Zone; exact Region, any Zone; any Region, exact Zone;
    the wildcard row. Within one level a row naming the accelerator beats a row leaving it empty."""
    if not cat.slurm_pricing:
        return None
    region = region or ""
    zone = zone or ""
    g = norm_gpu(gpu_type)
    best: tuple[int, SlurmPrice] | None = None
    for row in cat.slurm_pricing:
        if row.region and row.region != region:
            continue
        if row.zone and row.zone != zone:
            continue
        if row.accelerator and (not g or norm_gpu(row.accelerator) != g):
            continue
        level = (0 if row.region and row.zone else 1 if row.region else 2 if row.zone else 3) * 2
        level += 0 if row.accelerator else 1
        if best is None or level < best[0]:
            best = (level, row)
    if best is None:
        return None
    row = best[1]
    price = gpus * row.per_accelerator + (cpus or 0.0) * row.per_vcpu + (memory or 0) / GIB * row.per_memory_gb
    where = "/".join(x or "*" for x in (row.region, row.zone, row.accelerator))
    return price, f"slurm/pricing.csv row {where}"


# ---- offers ------------------------------------------------------------------------------------------


def catalog_offers(
    spec: Any,
    catalog_dir: str | os.PathLike[str] | None = None,
    clouds: Sequence[str] | None = None,
    launcher: str = "skypilot",
    *,
    expected_start: float | None = None,
    start_note: str | None = None,
) -> list[Offer]:
    """Priced cloud offers for ``spec`` from the catalog: one per instance type, region and pricing (on
    demand, and spot where the row has a SpotPrice), as ``Offer(backend=launcher, launcher=launcher,
    where="<cloud>/<region>", instance_type=..., region=..., detail={"source": "catalog", "cloud": ...})``.

    A row fits when its accelerator is the requested one (SkyPilot's names, case and punctuation ignored;
    any accelerator when the job gives no type) with exactly the requested count, and it has at least the
    requested vCPUs, memory and GPU memory; CPU jobs get the CPU-only rows. Clouds with no fitting row
    give one ``fits=False`` offer saying what they do have. ``expected_start`` defaults to the configured
    provisioning estimate (``[placement] cloud_start``, 5 minutes)."""
    cat = load_catalog(catalog_dir)
    if cat.root is None:
        return []
    r = spec.resources
    if expected_start is None:
        expected_start = _cloud_start()
    note = start_note or "provisioning estimate"
    wanted = norm_gpu(r.gpu_type)
    lower = {c.lower(): c for c in cat.clouds}
    selected = [lower.get(c.lower(), c) for c in clouds] if clouds is not None else cat.clouds
    # the same job shape on the same catalog gives the same offers: keep the last few (Offers are immutable)
    key = (id(cat), r, tuple(selected), launcher, expected_start, note)
    with _cache_lock:
        hit = _offers_cache.get(key)
    if hit is not None and hit[0] is cat:
        return list(hit[1])
    out = _offers_for(cat, spec, selected, launcher, expected_start, note, wanted)
    with _cache_lock:
        if len(_offers_cache) >= 64:
            _offers_cache.pop(next(iter(_offers_cache)))
        _offers_cache[key] = (cat, tuple(out))
    return out


_offers_cache: dict[tuple[Any, ...], tuple[Catalog, tuple[Offer, ...]]] = {}


def _offers_for(cat: Catalog, spec: Any, selected: list[str], launcher: str, expected_start: float, note: str,
                wanted: str) -> list[Offer]:
    r = spec.resources
    out: list[Offer] = []
    for cloud in selected:
        idx = cat.index.get(cloud)
        if idx is None:
            out.append(Offer(backend=launcher, where=cloud, fits=False, launcher=launcher,
                             reason=f"the catalog at {cat.root} has no prices for {cloud}",
                             detail={"source": "catalog", "cloud": cloud}))
            continue
        if r.gpus:
            if wanted:
                rows = idx.get((wanted, r.gpus), [])
            else:
                rows = [vm for (g, n), vms in idx.items() if g and n == r.gpus for vm in vms]
        else:
            rows = idx.get(("", 0), [])
        fitting = 0
        for vm in rows:
            if r.cpus and vm.vcpus < r.cpus:
                continue
            if r.memory and vm.memory_gib * GIB < r.memory:
                continue
            if r.gpu_memory and (vm.gpu_memory_mib is None or vm.gpu_memory_mib * MIB < r.gpu_memory):
                continue
            fitting += 1
            base = dict(
                backend=launcher,
                where=f"{cloud}/{vm.region}",
                gpus=vm.gpus,
                gpu_type=vm.gpu or None,
                gpu_memory=int(vm.gpu_memory_mib * MIB) if vm.gpu_memory_mib else None,
                cpus=vm.vcpus or None,
                memory=int(vm.memory_gib * GIB) if vm.memory_gib else None,
                nodes=r.nodes,
                expected_start=expected_start,
                start_note=note,
                instance_type=vm.instance_type,
                region=vm.region,
                launcher=launcher,
                detail={"source": "catalog", "cloud": cloud},
            )
            if vm.price is not None:
                out.append(Offer(price_per_hour=vm.price, spot=False, **base))
            if vm.spot_price is not None:
                out.append(Offer(price_per_hour=vm.spot_price, spot=True, **base))
        if not fitting:
            out.append(Offer(backend=launcher, where=cloud, gpus=r.gpus, gpu_type=r.gpu_type, nodes=r.nodes,
                             fits=False, launcher=launcher, reason=_why_none(cat, cloud, spec),
                             detail={"source": "catalog", "cloud": cloud}))
    return out


def _why_none(cat: Catalog, cloud: str, spec: Any) -> str:
    """Why no instance type of ``cloud`` fits: what it has instead."""
    r = spec.resources
    idx = cat.index.get(cloud, {})
    wanted = norm_gpu(r.gpu_type)
    if r.gpus and wanted:
        counts = sorted({n for (g, n) in idx if g == wanted})
        if not counts:
            have = sorted({vms[0].gpu for (g, _), vms in idx.items() if g and vms})
            hint = ""
            acc = cat.accelerators.get(wanted)
            if acc and acc[1]:
                hint = f"; {acc[0]} is offered by {', '.join(acc[1])}"
            return f"{cloud} has no {r.gpu_type} GPUs (it has {', '.join(have) or 'none'}){hint}"
        if r.gpus not in counts:
            return (f"{cloud} has no instance type with {r.gpus} {r.gpu_type} GPUs "
                    f"(counts offered: {', '.join(map(str, counts))})")
    elif r.gpus:
        counts = sorted({n for (g, n) in idx if g})
        if r.gpus not in counts:
            return f"{cloud} has no instance type with {r.gpus} GPUs (counts offered: {', '.join(map(str, counts))})"
    from ._units import format_size

    need = []
    if r.cpus:
        need.append(f"{r.cpus:g} vCPUs")
    if r.memory:
        need.append(f"{format_size(r.memory)} memory")
    if r.gpu_memory:
        need.append(f"{format_size(r.gpu_memory)} per GPU")
    what = f"{r.gpus}x{r.gpu_type or 'GPU'}" if r.gpus else "CPU-only"
    return f"no {cloud} {what} instance type has " + (" and ".join(need) if need else "a price")


def _cloud_start() -> float:
    from ._config import get_config

    v = get_config().section("placement").get("cloud_start")
    if v is None:
        return DEFAULT_CLOUD_START
    from ._units import parse_duration

    try:
        return parse_duration(v)
    except ValueError as e:
        raise ConfigError("placement.cloud_start", str(e)) from None


def gpu_names(cat: Catalog) -> list[str]:
    """Every accelerator name the catalog knows (for messages)."""
    names = {v[0] for v in cat.accelerators.values()}
    for idx in cat.index.values():
        names.update(vms[0].gpu for (g, _), vms in idx.items() if g and vms)
    return sorted(names)


def instance_accelerators(instance_type: str, cloud: str | None = None,
                          path: str | os.PathLike[str] | None = None) -> tuple[str, int] | None:
    """The GPUs of a cloud instance type as the catalog in use lists them: (name, count), ``("", 0)`` for an
    instance without, None when none of its tables lists it (or two clouds' tables disagree). ``cloud``
    (a catalog folder: ``aws``, ``gcp``, ...) limits the search to that cloud's table."""
    cat = load_catalog(path)
    rows = iter_rows(cat, [cloud] if cloud else None)
    found = {(vm.gpu, vm.gpus) for vm in rows if vm.instance_type == instance_type}
    return found.pop() if len(found) == 1 else None


def iter_rows(cat: Catalog, clouds: Iterable[str] | None = None) -> Iterable[VM]:
    for cloud in clouds if clouds is not None else cat.clouds:
        yield from cat.vms.get(cloud, [])
