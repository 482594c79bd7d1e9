"""SkyPilot's catalogs: put a snapshot where SkyPilot reads it, and (for a core without
``meshrun.catalog_offers``) price offers through SkyPilot's own catalog module.

SkyPilot reads ``$SKY_RUNTIME_DIR/.sky/catalogs/v8/<cloud>/vms.csv`` (``~`` by default) and downloads a file
only when it is missing; a file without its ``.meta/<file>.md5`` counts as edited by hand and is never
replaced. So a snapshot copied there is what both SkyPilot's optimizer and meshrun's offers use, offline.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import meshrun
import meshrun.backend as mb


def sky_catalog_dir() -> Path:
    root = os.environ.get("SKY_RUNTIME_DIR") or "~"
    return Path(os.path.expanduser(root)) / ".sky" / "catalogs" / "v8"


def install_catalog(source: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None) -> Path:
    """Copy a catalog snapshot (a ``v8`` folder: ``<cloud>/vms.csv``, ``common/accelerators.csv``, ...) to
    where SkyPilot reads its catalogs; returns that folder. Existing files are replaced."""
    src = Path(source).expanduser()
    if (src / "v8").is_dir():
        src = src / "v8"
    if not src.is_dir():
        raise meshrun.ConfigError("catalog_dir", f"{str(src)!r} is not a catalog folder")
    out = Path(dest).expanduser() if dest is not None else sky_catalog_dir()
    for f in sorted(src.rglob("*.csv")):
        target = out / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(target.parent, 0o755)
        tmp = target.with_suffix(".csv.tmp")
        shutil.copyfile(f, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    return out


def sky_catalog_offers(spec: Any, clouds: list[str]) -> list[mb.Offer]:  # pragma: no cover - older cores
    """Offers from SkyPilot's catalog module (GPU jobs: every instance type with that accelerator count)."""
    from sky import catalog

    r = spec.resources
    out: list[mb.Offer] = []
    if not r.gpus:
        for cloud in clouds:
            it = catalog.get_default_instance_type(cpus=f"{r.cpus:g}+" if r.cpus else None,
                                                   memory=f"{r.memory / 1024**3:g}+" if r.memory else None,
                                                   clouds=cloud)
            if it is None:
                out.append(mb.Offer(backend="skypilot", where=cloud, fits=False, reason=f"no {cloud} CPU instance fits"))
                continue
            for spot in (False, True):
                for region in catalog.get_region_zones_for_instance_type(it, spot, clouds=cloud):
                    try:
                        price = catalog.get_hourly_cost(it, spot, region.name, None, clouds=cloud)
                    except Exception:
                        continue
                    out.append(mb.Offer(backend="skypilot", where=f"{cloud}/{region.name}", cpus=r.cpus,
                                             memory=r.memory, nodes=r.nodes, price_per_hour=price, spot=spot,
                                             instance_type=it, region=region.name, launcher="skypilot",
                                             detail={"source": "sky.catalog", "cloud": cloud}))
        return out
    found = catalog.list_accelerators(gpus_only=True, name_filter=r.gpu_type, clouds=clouds, case_sensitive=False,
                                      all_regions=True, require_price=True, quantity_filter=r.gpus)
    for items in found.values():
        for x in items:
            if int(x.accelerator_count) != r.gpus or (r.gpu_type and x.accelerator_name.lower() != r.gpu_type.lower()):
                continue
            if r.cpus and (x.cpu_count or 0) < r.cpus:
                continue
            if r.memory and (x.memory or 0) * 1024**3 < r.memory:
                continue
            for spot, price in ((False, x.price), (True, x.spot_price)):
                if price is None or price != price:  # NaN: no spot price
                    continue
                out.append(mb.Offer(backend="skypilot", where=f"{x.cloud.lower()}/{x.region}", gpus=r.gpus,
                                         gpu_type=x.accelerator_name, cpus=x.cpu_count, nodes=r.nodes,
                                         price_per_hour=float(price), spot=spot, instance_type=x.instance_type,
                                         region=x.region, launcher="skypilot",
                                         detail={"source": "sky.catalog", "cloud": x.cloud.lower()}))
    return out
