"""On-prem prices: the ``[prices]`` table (per backend, host or partition), and Slurm's catalog fallback."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from ._backend import Offer
from ._errors import ConfigError, MeshrunError

#: backends whose machines the lab owns: their offers are priced from ``[prices]``
ONPREM_BACKENDS = ("local", "ssh", "slurm", "kubernetes")

_PRICE_RESERVED = ("default", "cpu", "memory")


@dataclass(frozen=True)
class PriceTable:
    """``[prices]``: $ per GPU-hour by GPU type (``default`` for the rest), ``cpu`` ($ per CPU-hour) and
    ``memory`` ($ per GiB-hour), at the top level (every on-prem backend), per backend (``[prices.ssh]``) or
    per host or partition (``[prices."slurm:gpu-long"]``)."""

    scopes: Mapping[str, Mapping[str, float]]

    @property
    def backends(self) -> set[str]:
        return {s.split(":", 1)[0] for s in self.scopes if s}

    def lookup(self, backend: str, where: str | Sequence[str] | None, gpu_type: str | None, gpus: int,
               cpus: float | None, memory: int | None) -> tuple[float, str] | None:
        """$/hour per node and where the price came from, or None when no table prices this offer. ``where``
        may list several names of the place (``cluster/partition``, the partition, the host)."""
        places = [where] if isinstance(where, str) else list(where or [])
        chain = [f"{backend}:{w}" for w in places if w] + [backend, ""]
        chain = [s for s in dict.fromkeys(chain) if s in self.scopes]
        if not chain:
            return None
        found = False
        sources = []
        gpu_price = 0.0
        if gpus:
            for s in chain:
                p = _gpu_price(self.scopes[s], gpu_type)
                if p is not None:
                    gpu_price, found = p[0], True
                    sources.append(_scope_name(s) + (f".{p[1]}" if p[1] else ""))
                    break
        extra = 0.0
        for comp, amount in (("cpu", cpus or 0.0), ("memory", (memory or 0) / 1024**3)):
            for s in chain:
                if comp in self.scopes[s]:
                    if amount:
                        extra += amount * self.scopes[s][comp]
                        sources.append(f"{_scope_name(s)}.{comp}")
                    found = True
                    break
        if not found:
            return None
        return gpus * gpu_price + extra, "config " + " + ".join(sources or [_scope_name(chain[0])])


def _scope_name(s: str) -> str:
    return "[prices]" if not s else f"[prices.{json.dumps(s) if ':' in s else s}]"


def _gpu_price(table: Mapping[str, float], gpu_type: str | None) -> tuple[float, str] | None:
    from ._catalog import norm_gpu

    if gpu_type:
        g = norm_gpu(gpu_type)
        best: tuple[int, str] | None = None
        for k in table:
            if k in _PRICE_RESERVED:
                continue
            nk = norm_gpu(k)
            if nk == g:
                return table[k], k
            if nk and nk in g and (best is None or len(nk) > best[0]):
                best = (len(nk), k)
        if best is not None:
            return table[best[1]], best[1]
    if "default" in table:
        return table["default"], "default"
    return None


def price_table() -> PriceTable:
    """The ``[prices]`` configuration, validated (ConfigError naming the key for a bad value)."""
    from ._config import get_config

    conf = get_config().section("prices")
    scopes: dict[str, dict[str, float]] = {"": {}}
    for k, v in conf.items():
        if isinstance(v, Mapping):
            backend = k.split(":", 1)[0]
            if not backend:
                raise ConfigError(f"prices.{k}", "a price table is named after a backend, or backend:host / "
                                  "backend:partition (e.g. [prices.ssh] or [prices.\"slurm:gpu\"])")
            tbl = {}
            for gk, gv in v.items():
                if isinstance(gv, Mapping):
                    raise ConfigError(f"prices.{k}.{gk}", "price tables nest one level only: [prices.<backend>] "
                                      "or [prices.\"<backend>:<host or partition>\"]")
                tbl[gk] = _config_price(f"prices.{k}.{gk}", gv)
            scopes[k] = tbl
        else:
            scopes[""][k] = _config_price(f"prices.{k}", v)
    if not scopes[""]:
        del scopes[""]
    return PriceTable(scopes)


def _config_price(key: str, v: Any) -> float:
    unit = {"cpu": "$ per CPU-hour", "memory": "$ per GiB-hour"}.get(key.rsplit(".", 1)[-1], "$ per GPU-hour")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ConfigError(key, f"must be a number >= 0 ({unit}), got {v!r}")
    return float(v)


def onprem_price(o: Offer, prices: PriceTable | None = None, catalog: Any = None) -> Offer:
    """``o`` priced by the lab's own rates: ``[prices]`` (most specific entry first), else the price the backend
    gave, else (Slurm) the catalog's slurm/pricing.csv, else 0. Cloud and catalog offers are left alone."""
    if o.detail.get("source") == "catalog":
        return o
    prices = prices if prices is not None else price_table()
    if o.backend not in ONPREM_BACKENDS and o.backend not in prices.backends:
        return o
    places = [o.where] + [str(o.detail[k]) for k in ("partition", "host") if o.detail.get(k)]
    hit = prices.lookup(o.backend, places, o.gpu_type, o.gpus, o.cpus, o.memory)
    if hit is not None:
        return replace(o, price_per_hour=hit[0], detail={**o.detail, "price_source": hit[1]})
    if o.price_per_hour > 0:
        return o
    if o.backend == "slurm":
        if catalog is None:
            from ._catalog import load_catalog

            try:
                catalog = load_catalog()
            except MeshrunError:
                return o
        from ._catalog import slurm_price

        d = o.detail
        hit = slurm_price(catalog, region=o.region or d.get("cluster"), zone=d.get("partition") or o.where,
                          gpu_type=o.gpu_type, gpus=o.gpus, cpus=o.cpus, memory=o.memory)
        if hit is not None:
            return replace(o, price_per_hour=hit[0], detail={**o.detail, "price_source": hit[1]})
    return o

