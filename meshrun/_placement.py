"""Placement: gather priced offers from every backend, rank them by cost and availability, explain the choice.

Two halves, kept apart on purpose:

- :func:`offers` asks every installed, usable backend (in parallel threads; one that does not answer within
  ``respond_within``, 1 s, is skipped as not responding and remembered so for a minute, so a dead Slurm
  controller or API server costs one submit a second, not every submit ten) and, when no backend launches
  cloud offers, reads the cloud catalog itself. On-prem offers are priced from the ``[prices]`` configuration
  here.
- :func:`rank` is a pure function from (spec, offers, objective, constraints) to a :class:`Plan`: the chosen
  offer, the ranked table with each offer's cost, score and a one-line reason, and every rejected offer with
  why. :func:`plan` is both together. docs/placement.md gives the formulas.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import fnmatch
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

from ._backend import Feature, Offer
from ._errors import ConfigError, MeshrunError, NoPlacementError, SpecError
from ._units import format_duration, format_size, parse_duration

HOUR = 3600.0
DEFAULT_RUNTIME = HOUR
DEFAULT_UNKNOWN_START = HOUR
DEFAULT_TIMEOUT = 10.0
LOCAL_GRACE = 2.0  # extra seconds the local backend (this machine) is waited for past the timeout
#: seconds a backend has to answer (check and offers) before a submit skips it as not responding
DEFAULT_RESPOND_WITHIN = 1.0
#: seconds a backend that did not respond is skipped by every later submit of this user, without asking it
DEFAULT_SKIP_UNRESPONSIVE = 60.0
#: gathering that takes longer than this says on stderr which backend it is waiting for
NOTICE_AFTER = 1.0

#: backends whose machines the lab owns: their offers are priced from ``[prices]``
ONPREM_BACKENDS = ("local", "ssh", "slurm", "kubernetes")
#: equal score and start: the backend with the least overhead first, then the offer key (deterministic)
TIE_ORDER = {"local": 0, "ssh": 1, "slurm": 2, "kubernetes": 3}
#: the backend that launches catalog (cloud) offers unless ``[placement] cloud_launcher`` says otherwise
DEFAULT_CLOUD_LAUNCHER = "skypilot"

PLACEMENT_KEYS = (
    "objective",
    "runtime",
    "value_of_time",
    "unknown_start",
    "max_price_per_hour",
    "allow_spot",
    "regions",
    "backends",
    "exclude_backends",
    "catalog_dir",
    "clouds",
    "cloud_launcher",
    "cloud_start",
    "offers_timeout",
    "respond_within",
    "skip_unresponsive_for",
)


class Objective(str, enum.Enum):
    """What placement optimises.

    COST: the lowest expected cost (price per hour of all nodes x expected runtime).
    START: the earliest expected start.
    BALANCED: the lowest cost + value_of_time x expected wait (hours).
    """

    COST = "cost"
    START = "start"
    BALANCED = "balanced"

    def __str__(self) -> str:
        return self.value


# ---- results ----------------------------------------------------------------------------------------


class Ranked:
    """One fitting offer in the ranked table, with what ranked it: ``rank`` (1 = best), ``cost`` (expected $
    for the runtime: total price per hour x runtime), ``wait`` (expected seconds until it starts; None =
    unknown), ``score`` (what the objective sorts by, lower is better; inf for an unknown start under START)
    and ``why`` (one line). Offer attributes are readable directly (``r.backend``, ``r.price_per_hour``)."""

    __slots__ = ("rank", "offer", "cost", "wait", "score", "_ctx", "_why")

    def __init__(self, rank: int, offer: Offer, cost: float, wait: float | None, score: float,
                 ctx: tuple[Objective, float, float, float]):
        self.rank = rank
        self.offer = offer
        self.cost = cost
        self.wait = wait
        self.score = score
        self._ctx = ctx  # (objective, runtime seconds, value of time, assumed hours of an unknown start)
        self._why: str | None = None

    @property
    def why(self) -> str:
        if self._why is None:
            obj, runtime, vot, unknown_h = self._ctx
            rt_text = format_duration(runtime)
            if obj is Objective.BALANCED:
                wait_h = unknown_h if self.wait is None else self.wait / HOUR
                self._why = (f"{_money(self.score)} = {_money(self.cost)} for {rt_text} + {_money(vot)}/h x "
                             f"{format_duration(wait_h * HOUR) if wait_h else '0s'} wait"
                             + (" (unknown start, assumed)" if self.wait is None else ""))
            else:
                self._why = f"{_money(self.cost)} for {rt_text}, {_wait_text(self.offer)}"
        return self._why

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.offer, name)

    def __repr__(self) -> str:
        return f"<Ranked #{self.rank} {self.offer.key} cost={self.cost:.4g} score={self.score:.4g}>"


class Rejection(NamedTuple):
    offer: Offer
    reason: str


@dataclass
class Plan:
    """The outcome of placement: ``chosen`` (None when nothing fits), ``ranked`` (best first), ``rejected``
    (every other option and why), the ``objective`` and the resolved ``inputs``."""

    chosen: Offer | None
    ranked: list[Ranked]
    rejected: list[Rejection] = field(default_factory=list)
    objective: Objective = Objective.COST
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def offers(self) -> list[Offer]:
        """The fitting offers, best first (what failover walks)."""
        return [r.offer for r in self.ranked]

    def explain_choice(self) -> str:
        """One line: what was chosen and why (or why nothing was)."""
        if self.chosen is None:
            n = len(self.rejected)
            if not n:
                return "nothing fits: no backend made an offer (is any backend installed and configured?)"
            groups = group_rejections(self.rejected)
            parts = [f"{g['backend']}" + (f" ({g['count']} offers)" if g["count"] != "1" else "") + f": {g['reason']}"
                     for g in groups[:3]]
            more = f"; {len(groups) - 3} more reasons" if len(groups) > 3 else ""
            return f"nothing fits: {n} option{'s' if n != 1 else ''} rejected ({'; '.join(parts)}{more})"
        best = self.ranked[0]
        n = len(self.ranked)
        what = {
            Objective.COST: "cheapest",
            Objective.START: "earliest start",
            Objective.BALANCED: f"lowest cost + waiting at ${_num(self.inputs.get('value_of_time'))}/h",
        }[self.objective]
        line = f"{best.offer.describe()}: {what} of {n} fitting offer{'s' if n != 1 else ''} ({best.why})"
        if n > 1:
            nxt = self.ranked[1]
            line += f"; next: {nxt.offer.key} ({nxt.why})"
        late = sum(1 for r in self.rejected if _LATE in r.reason or _LATE_MID in r.reason)
        if late and self.inputs.get("deadline") is not None:
            line += f"; {late} option{'s' if late != 1 else ''} could not start within the deadline"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective.value,
            "inputs": _jsonable(self.inputs),
            "chosen": offer_to_dict(self.chosen) if self.chosen is not None else None,
            "explanation": self.explain_choice(),
            "ranked": [
                {
                    "rank": r.rank,
                    "offer": offer_to_dict(r.offer),
                    "cost": round(r.cost, 6),
                    "wait": r.wait,
                    "score": None if math.isinf(r.score) else round(r.score, 6),
                    "why": r.why,
                }
                for r in self.ranked
            ],
            "rejected": [{"offer": offer_to_dict(o), "reason": why} for o, why in self.rejected],
        }

    def print(self, stream: Any = None, *, limit: int | None = 20) -> None:
        """The ranked table and the rejections (grouped by reason), rich in a terminal, plain when piped."""
        import sys

        from ._display import print_table

        stream = stream or sys.stdout
        inp = self.inputs
        runtime = format_duration(inp.get("runtime") or DEFAULT_RUNTIME)
        head = f"objective {self.objective.value}, runtime {runtime}"
        if inp.get("deadline") is not None:
            head += f", deadline: start within {format_duration(inp['deadline'])}"
        if inp.get("value_of_time") is not None:
            head += f", value of time ${_num(inp['value_of_time'])}/h"
        if inp.get("max_price_per_hour") is not None:
            head += f", max ${_num(inp['max_price_per_hour'])}/h"
        shown = self.ranked if limit is None else self.ranked[:limit]
        rows = []
        for r in shown:
            o = r.offer
            rows.append([
                str(r.rank),
                o.backend,
                o.where,
                _resources(o),
                _money(o.total_price_per_hour) + (" spot" if o.spot else ""),
                _money(r.cost),
                _start(o),
                r.why if self.objective is Objective.BALANCED else (o.start_note if o.start_note != "now" else ""),
            ])
        title = f"offers for {inp.get('spec') or 'the job'} ({head})"
        if rows:
            print_table(["#", "BACKEND", "WHERE", "RESOURCES", "$/HOUR", f"COST/{runtime}", "START", "NOTE"],
                        rows, title=title, stream=stream, styles={0: lambda v: "bold green" if v == "1" else ""})
            if limit is not None and len(self.ranked) > limit:
                stream.write(f"... and {len(self.ranked) - limit} more fitting offers (--json lists all)\n")
        else:
            stream.write(f"# {title}\nno offer fits\n")
        if self.rejected:
            stream.write("\n")
            groups = group_rejections(self.rejected)
            rrows = [[g["backend"], g["where"], g["price"], g["reason"]] for g in groups]
            print_table(["BACKEND", "WHERE", "$/HOUR", "WHY NOT"], rrows,
                        title=f"rejected ({len(self.rejected)})", stream=stream)
        stream.write("\n" + ("chosen: " if self.chosen is not None else "") + self.explain_choice() + "\n")
        stream.flush()


_LATE = "expected to start in"
_LATE_MID = "needs a known start"


def group_rejections(rejected: Sequence[Rejection]) -> list[dict[str, str]]:
    """Rejections with the same backend and reason folded into one row (regions of one cloud, say)."""
    groups: dict[tuple[str, str], list[Offer]] = {}
    for o, why in rejected:
        groups.setdefault((o.backend, why), []).append(o)
    out = []
    for (backend, why), offs in groups.items():
        where = _summarize_wheres(sorted({o.where for o in offs}))
        prices = sorted({o.total_price_per_hour for o in offs if o.total_price_per_hour > 0})
        price = "" if not prices else _money(prices[0]) if len(prices) == 1 else f"{_money(prices[0])}-{_money(prices[-1])}"
        kinds = sorted({o.instance_type for o in offs if o.instance_type})
        if kinds:
            where += f" [{', '.join(kinds[:3])}{', ...' if len(kinds) > 3 else ''}]"
        out.append({"backend": backend, "where": where, "price": price, "reason": why, "count": str(len(offs))})
    return out


def _summarize_wheres(wheres: list[str]) -> str:
    """["lambda/us-east-1", "lambda/us-west-1", "nebius/eu-north1"] -> "lambda (2 regions), nebius/eu-north1"."""
    if len(wheres) <= 2:
        return ", ".join(wheres)
    by: dict[str, list[str]] = {}
    for w in wheres:
        head, sep, _ = w.partition("/")
        by.setdefault(head if sep else w, []).append(w)
    parts = [ws[0] if len(ws) == 1 else f"{head} ({len(ws)} regions)" for head, ws in by.items()]
    if len(parts) > 4:
        parts = parts[:4] + [f"+{len(parts) - 4} more"]
    return ", ".join(parts)


def rejection_lines(rejected: Sequence[Rejection]) -> list[str]:
    """Every rejection, one line per reason and backend: ``key: reason`` or ``key and N more: reason``."""
    groups: dict[tuple[str, str], list[Offer]] = {}
    for o, why in rejected:
        groups.setdefault((o.backend, why), []).append(o)
    lines = []
    for (_, why), offs in groups.items():
        keys = [o.key for o in offs]
        if len(keys) <= 3:
            lines.append(f"{', '.join(keys)}: {why}")
        else:
            lines.append(f"{keys[0]} and {len(keys) - 1} more like it: {why}")
    return lines


# ---- formatting helpers -----------------------------------------------------------------------------


def _num(v: Any) -> str:
    if v is None:
        return "-"
    return f"{float(v):g}" if float(v) != int(float(v)) else str(int(float(v)))


def _money(v: float) -> str:
    return f"${v:,.2f}" if v < 100 else f"${v:,.0f}"


def _resources(o: Offer) -> str:
    parts = []
    if o.nodes > 1:
        parts.append(f"{o.nodes} nodes x")
    parts.append(f"{o.gpus}x{o.gpu_type or 'GPU'}" if o.gpus else "CPU")
    if o.cpus:
        parts.append(f"{o.cpus:g} CPU")
    if o.memory:
        parts.append(format_size(o.memory))
    return " ".join(parts)


def _start(o: Offer) -> str:
    if o.expected_start is None:
        return "unknown"
    if o.expected_start <= 0:
        return "now"
    return f"in {format_duration(o.expected_start)}"


def _wait_text(o: Offer) -> str:
    if o.expected_start is None:
        return f"start unknown ({o.start_note})" if o.start_note and o.start_note != "now" else "start unknown"
    if o.expected_start <= 0:
        return "starts now"
    note = f", {o.start_note}" if o.start_note and o.start_note not in ("now", "") else ""
    return f"starts in {format_duration(o.expected_start)}{note}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return None
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


_OFFER_FIELDS = tuple(f.name for f in fields(Offer))


def offer_to_dict(o: Offer) -> dict[str, Any]:
    d = {k: getattr(o, k) for k in _OFFER_FIELDS}
    d["detail"] = _jsonable(dict(o.detail))
    d["key"] = o.key
    d["total_price_per_hour"] = o.total_price_per_hour
    return d


def offer_from_dict(d: Mapping[str, Any]) -> Offer:
    return Offer(**{k: d[k] for k in _OFFER_FIELDS if k in d})


# ---- inputs: arguments, then [placement] config, then defaults ---------------------------------------


def placement_config() -> dict[str, Any]:
    """The ``[placement]`` table, with unknown keys refused (ConfigError listing the valid ones)."""
    from ._config import get_config

    conf = get_config().section("placement")
    for k in conf:
        if k not in PLACEMENT_KEYS:
            raise ConfigError(f"placement.{k}", f"unknown placement setting; the valid ones are: {', '.join(PLACEMENT_KEYS)}")
    return conf


def _err(field_: str, msg: str, from_config: bool) -> SpecError:
    return ConfigError(f"placement.{field_}", msg) if from_config else SpecError(field_, msg)


def _price(v: Any, name: str, from_config: bool) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise _err(name, f"expected a price in $ per hour (a number >= 0), got {v!r}", from_config)
    try:
        f = float(v)
    except ValueError:
        raise _err(name, f"expected a price in $ per hour (a number >= 0), got {v!r}", from_config) from None
    if not math.isfinite(f) or f < 0:
        raise _err(name, f"must be a number >= 0 ($ per hour), got {v!r}", from_config)
    return f


def _duration(v: Any, name: str, from_config: bool) -> float | None:
    if v is None:
        return None
    try:
        return parse_duration(v)
    except ValueError as e:
        raise _err(name, str(e), from_config) from None


def _deadline(v: Any, now: float) -> float | None:
    """Seconds from ``now`` within which the job must start: a duration (seconds, "1h", timedelta) or a
    point in time (datetime, or an ISO 8601 string; naive means local time)."""
    if v is None:
        return None
    if isinstance(v, datetime):
        ts = v.timestamp() if v.tzinfo is not None else v.astimezone().timestamp()
        secs = ts - now
        if secs <= 0:
            raise SpecError("deadline", f"{v.isoformat()} is already past")
        return secs
    if isinstance(v, str):
        try:
            return parse_duration(v)
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(v.strip())
        except ValueError:
            raise SpecError(
                "deadline",
                f"expected a duration such as \"1h\" or \"90m\", seconds, a datetime or an ISO time such as "
                f"\"2030-01-31T18:00\", got {v!r}",
            ) from None
        return _deadline(dt, now)
    if isinstance(v, (int, float, timedelta)) and not isinstance(v, bool):
        try:
            return parse_duration(v)
        except ValueError as e:
            raise SpecError("deadline", str(e)) from None
    raise SpecError("deadline", f"expected a duration, seconds or a datetime, got {type(v).__name__}")


def _names(v: Any, name: str, from_config: bool, check_known: bool = True) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple, set, frozenset)) or not all(isinstance(x, str) and x for x in v):
        raise _err(name, f"expected a list of backend names, got {v!r}", from_config)
    if check_known:
        valid = known_backends()
        bad = [x for x in v if x not in valid]
        if bad:
            raise _err(name, f"unknown backend {bad[0]!r}; the backends are: {', '.join(valid)}", from_config)
    return sorted(set(v), key=list(v).index)


def _regions(v: Any, from_config: bool) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple, set)) or not all(isinstance(x, str) and x.strip() for x in v):
        raise _err("regions", f"expected a list of region names (wildcards allowed, e.g. \"us-*\"), got {v!r}",
                   from_config)
    return list(v)


def _objective(v: Any, from_config: bool) -> Objective | None:
    if v is None:
        return None
    if isinstance(v, Objective):
        return v
    try:
        return Objective(str(v).lower())
    except ValueError:
        raise _err("objective", f"expected one of {', '.join(o.value for o in Objective)}, got {v!r}",
                   from_config) from None


def _bool(v: Any, name: str, from_config: bool) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    raise _err(name, f"expected true or false, got {v!r}", from_config)


def resolve_inputs(
    *,
    objective: Any = None,
    runtime: Any = None,
    deadline: Any = None,
    value_of_time: Any = None,
    max_price_per_hour: Any = None,
    backends: Any = None,
    exclude_backends: Any = None,
    allow_spot: Any = None,
    regions: Any = None,
    unknown_start: Any = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Validated placement inputs: each argument, else the ``[placement]`` config, else the default."""
    conf = placement_config()
    now = time.time() if now is None else now

    def pick(arg: Any, key: str) -> tuple[Any, bool]:
        return (arg, False) if arg is not None else (conf.get(key), True)

    obj = _objective(*pick(objective, "objective"))
    v, c = pick(runtime, "runtime")
    rt = _duration(v, "runtime", c) or DEFAULT_RUNTIME
    v, c = pick(value_of_time, "value_of_time")
    vot = _price(v, "value_of_time", c)
    v, c = pick(max_price_per_hour, "max_price_per_hour")
    mpp = _price(v, "max_price_per_hour", c)
    v, c = pick(unknown_start, "unknown_start")
    unk = _duration(v, "unknown_start", c)
    v, c = pick(allow_spot, "allow_spot")
    spot = _bool(v, "allow_spot", c)
    regs = _regions(*pick(regions, "regions"))
    v, c = pick(backends, "backends")
    bk = _names(v, "backends", c)
    v, c = pick(exclude_backends, "exclude_backends")
    ex = _names(v, "exclude_backends", c)
    if obj is None:
        obj = Objective.BALANCED if vot is not None else Objective.COST
    if obj is Objective.BALANCED and vot is None:
        raise SpecError("value_of_time", "the balanced objective needs value_of_time: what an hour of waiting is "
                        "worth to you, in $ (e.g. value_of_time=20)")
    if bk is not None and ex is not None:
        both = [b for b in bk if b in ex]
        if both:
            raise SpecError("exclude_backends", f"{both[0]!r} is both allowed (backends) and excluded")
    return {
        "objective": obj,
        "runtime": rt,
        "deadline": _deadline(deadline, now),
        "value_of_time": vot,
        "max_price_per_hour": mpp,
        "backends": bk,
        "exclude_backends": ex,
        "allow_spot": bool(spot) if spot is not None else False,
        "regions": regs,
        "unknown_start": unk if unk is not None else DEFAULT_UNKNOWN_START,
    }


# ---- the pure ranking ---------------------------------------------------------------------------------


def rank(spec: Any, offers: Iterable[Offer], **kw: Any) -> Plan:
    """Rank ``offers`` for ``spec`` (pure: no backend is asked). Keywords as for :func:`plan`."""
    inputs = resolve_inputs(**kw)
    return _rank(spec, list(offers), inputs)


def _rank(spec: Any, offers: list[Offer], inputs: dict[str, Any]) -> Plan:
    obj: Objective = inputs["objective"]
    runtime_h = inputs["runtime"] / HOUR
    deadline = inputs["deadline"]
    vot = inputs["value_of_time"] or 0.0
    unknown_h = inputs["unknown_start"] / HOUR
    mpp = inputs["max_price_per_hour"]
    allowed = set(inputs["backends"]) if inputs["backends"] else None
    excluded = set(inputs["exclude_backends"] or ())
    allow_spot = inputs["allow_spot"]
    regions = inputs["regions"]

    scored: list[tuple[tuple[Any, ...], Offer, float, float | None, float]] = []
    rejected: list[Rejection] = []
    position: dict[str, int] = {}  # each backend's own order (e.g. least-loaded host first) breaks ties
    for o in offers:
        pos = position[o.backend] = position.get(o.backend, -1) + 1
        # an offer that cannot run (a backend not installed, too few GPUs) still names every constraint it
        # breaks, so the rejection says all that stands in the way, not only the first thing
        reasons = [] if o.fits else [o.reason or "does not fit"]
        if allowed is not None and o.backend not in allowed:
            reasons.append(f"the {o.backend} backend is not among the allowed backends ({', '.join(sorted(allowed))})")
        if o.backend in excluded:
            reasons.append(f"the {o.backend} backend is excluded")
        if o.spot and not allow_spot:
            reasons.append("spot offer, and spot is not allowed (allow_spot=True to use it)")
        if regions and o.region is not None and not any(fnmatch.fnmatchcase(o.region, p) for p in regions):
            reasons.append(f"region {o.region} is not among the allowed regions ({', '.join(regions)})")
        total = o.total_price_per_hour
        if mpp is not None and total > mpp + 1e-12:
            reasons.append(f"{_money(total)}/h is above max_price_per_hour {_money(mpp)}/h")
        wait = o.expected_start
        if wait is not None and wait < 0:
            wait = 0.0
        if deadline is not None:
            if wait is None and not o.fits:
                pass  # a place that cannot run the job has no start to know; its own reason says why
            elif wait is None:
                reasons.append(f"its start time is unknown ({o.start_note or 'no estimate'}); the deadline "
                               f"({format_duration(deadline)}) {_LATE_MID}")
            elif wait > deadline:
                reasons.append(f"{_LATE} {format_duration(wait)} ({o.start_note}), after the deadline of "
                               f"{format_duration(deadline)}")
        if reasons or not o.fits:
            rejected.append(Rejection(o, "; ".join(reasons)))
            continue
        cost = total * runtime_h
        w = math.inf if wait is None else wait
        if obj is Objective.COST:
            score, second = cost, w
        elif obj is Objective.START:
            score, second = w, cost
        else:
            score = cost + vot * (unknown_h if wait is None else wait / HOUR)
            second = w
        key = (round(score, 9), round(second, 9) if math.isfinite(second) else math.inf,
               TIE_ORDER.get(o.launcher or o.backend, len(TIE_ORDER)), o.backend, pos, o.key, o.price_per_hour,
               o.gpus, o.nodes, o.where, o.region or "", o.instance_type or "")
        scored.append((key, o, cost, wait, score))
    scored.sort(key=lambda t: t[0])
    ctx = (obj, inputs["runtime"], vot, unknown_h)
    ranked = [Ranked(i, o, cost, wait, score, ctx) for i, (_, o, cost, wait, score) in enumerate(scored, start=1)]
    inputs = dict(inputs)
    inputs["spec"] = _spec_text(spec)
    return Plan(ranked[0].offer if ranked else None, ranked, rejected, obj, inputs)


def _spec_text(spec: Any) -> str:
    try:
        return f"{spec.display_name!r} [{spec.resources.describe()}]"
    except AttributeError:
        return "the job"


# ---- on-prem prices ------------------------------------------------------------------------------------

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


# ---- gathering offers ---------------------------------------------------------------------------------


_installed_cache: tuple[float, frozenset[str], list[str]] | None = None
_INSTALLED_TTL = 30.0


def installed_backends() -> list[str]:
    """The registry's installed backends, with its entry-point scan (tens of ms with many distributions)
    cached for 30 s; backends registered in-process are always current."""
    global _installed_cache
    from . import _registry

    manual = frozenset(getattr(_registry, "_manual", {}) or ())
    now = time.monotonic()
    hit = _installed_cache
    if hit is not None and now - hit[0] < _INSTALLED_TTL and hit[1] == manual:
        return list(hit[2])
    names = _registry.installed_names()
    _installed_cache = (now, manual, list(names))
    return names


def known_backends() -> list[str]:
    """Every backend name placement accepts: known to meshrun, installed, or registered in-process."""
    from ._registry import KNOWN

    inst = installed_backends()
    launcher = str(placement_config().get("cloud_launcher") or DEFAULT_CLOUD_LAUNCHER)
    return sorted(set(KNOWN) | set(inst) | {launcher}, key=lambda n: (n != "local", n))


def _sources(backends: Sequence[str] | None, exclude: Sequence[str] | None) -> tuple[list[str], str | None]:
    """Which backends to ask, and the launcher for catalog offers placement reads itself (or None)."""
    conf = placement_config()
    launcher = str(conf.get("cloud_launcher") or DEFAULT_CLOUD_LAUNCHER)
    excluded = set(exclude or ())
    wants_cloud = launcher not in excluded and (not backends or launcher in backends)
    installed = installed_backends() if (not backends or wants_cloud) else []
    names = list(backends) if backends else list(installed)
    names = [n for n in names if n not in excluded]
    catalog_launcher = None
    if wants_cloud and launcher not in installed:
        catalog_launcher = launcher
        names = [n for n in names if n != launcher]
    return names, catalog_launcher


def _ask(name: str, spec: Any, probe: Any = None) -> tuple[list[Offer], str | None]:
    """(offers, failure): failure is None when the backend answered, else what went wrong in a few words (a
    backend that fails after its time to respond is remembered as not responding with it)."""
    from ._registry import get_backend

    def doing(what: str) -> None:
        if probe is not None:
            probe.doing = what

    try:
        doing("loading the plugin")
        b = get_backend(name)
        if getattr(spec, "secrets", None) and Feature.SECRETS not in b.features:
            return [Offer(backend=name, where="-", fits=False, reason=f"the {name} backend cannot pass secrets "
                          "to a job without writing them down (give them as env, or use a backend that can)")], None
        doing("checking availability")
        av = b.check()
        if not av.ok:
            why = f"unavailable: {av.reason or 'check failed'}" + (f" (hint: {av.hint})" if av.hint else "")
            return [Offer(backend=name, where="-", fits=False, reason=why)], av.reason or "check failed"
        doing("making offers")
        got = list(b.offers(spec))
        if not got:
            return [Offer(backend=name, where="-", fits=False, reason="the backend made no offer for this job")], None
        return got, None
    except SpecError:
        raise  # the job itself is wrong for this backend (e.g. a bad backend option): the caller decides
    except MeshrunError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [Offer(backend=name, where="-", fits=False, reason=first)], first
    except Exception as e:  # a backend bug must not break placement
        why = f"{type(e).__name__}: {e}"
        return [Offer(backend=name, where="-", fits=False, reason=f"offers failed: {why}")], why


# ---- time limits, the memory of unresponsive backends, and what the user is told ---------------------


class RespondLimits(NamedTuple):
    default: float  # seconds; 0 = no limit of its own (the backend is waited for up to offers_timeout)
    per_backend: Mapping[str, float]
    skip_for: float  # seconds an unresponsive backend is skipped; 0 = not remembered

    def of(self, name: str) -> float:
        return self.per_backend.get(name, self.default)


def respond_limits(conf: Mapping[str, Any] | None = None) -> RespondLimits:
    """``[placement] respond_within`` (seconds, or a table by backend name with an optional ``default``) and
    ``skip_unresponsive_for`` (a duration; 0 = do not remember), validated."""
    conf = placement_config() if conf is None else conf

    def secs(key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(key, f"expected seconds >= 0 (0 turns the limit off), got {v!r}")
        return float(v)

    raw = conf.get("respond_within", DEFAULT_RESPOND_WITHIN)
    per: dict[str, float] = {}
    if isinstance(raw, Mapping):
        default = DEFAULT_RESPOND_WITHIN
        for k, v in raw.items():
            if k == "default":
                default = secs("placement.respond_within.default", v)
            else:
                per[str(k)] = secs(f"placement.respond_within.{k}", v)
    else:
        default = secs("placement.respond_within", raw)
    skip = conf.get("skip_unresponsive_for", DEFAULT_SKIP_UNRESPONSIVE)
    if (isinstance(skip, (int, float)) and not isinstance(skip, bool) and skip == 0) or (
            isinstance(skip, str) and re.fullmatch(r"\s*0+(\.0*)?\s*[smhd]?\s*", skip)):
        skip_for = 0.0
    else:
        skip_for = _duration(skip, "skip_unresponsive_for", True) or 0.0
    return RespondLimits(default, per, skip_for)


_notices: contextvars.ContextVar[bool] = contextvars.ContextVar("meshrun_placement_notices", default=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Within it, gathering offers prints nothing on stderr (the CLI's ``--json`` modes)."""
    token = _notices.set(False)
    try:
        yield
    finally:
        _notices.reset(token)


def _notice(msg: str) -> None:
    """One line on stderr, unless :func:`quiet`."""
    if not _notices.get():
        return
    import sys

    try:
        sys.stderr.write(f"meshrun: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


#: backend -> when this process last said on stderr that it does not respond (a newer record is said again)
_announced: dict[str, float] = {}


def not_responding_text(doing: str, limit: float) -> str:
    return f"not responding ({doing}, >{limit:g}s)"


def _catalog_source(spec: Any, launcher: str, catalog_dir: Any) -> list[Offer]:
    from ._catalog import catalog_offers
    from ._registry import KNOWN

    conf = placement_config()
    clouds = conf.get("clouds")
    if clouds is not None and (not isinstance(clouds, list) or not all(isinstance(c, str) for c in clouds)):
        raise ConfigError("placement.clouds", f"expected a list of cloud names such as [\"lambda\"], got {clouds!r}")
    got = catalog_offers(spec, catalog_dir, clouds=clouds, launcher=launcher)
    hint = " ".join(KNOWN.get(launcher, "").split())
    why = f"would be launched by the {launcher} backend, which is not installed" + (
        f" (install it with: {hint})" if hint else "")
    return [o if not o.fits else o.rejected(why) for o in got]


def offers(
    spec: Any,
    backends: Sequence[str] | None = None,
    *,
    exclude_backends: Sequence[str] | None = None,
    timeout: float | None = None,
    catalog_dir: str | os.PathLike[str] | None = None,
) -> list[Offer]:
    """Every offer for ``spec``: from each installed backend (or those named), asked in parallel.

    A backend has ``[placement] respond_within`` seconds (1 s) to check and make its offers; one that does
    not is listed as ``not responding (<what it was doing>, >1s)``, skipped, and remembered so (per user,
    in ``MESHRUN_HOME``) for ``skip_unresponsive_for`` (60 s): later submits do not ask it at all, and a
    later answer (from its thread finishing here, or from ``meshrun backends``) forgets it again. No backend
    is waited for longer than ``timeout`` (``[placement] offers_timeout``, 10 s); one backend named alone is
    waited for that long. Gathering that takes longer than a second says on stderr which backend is slow.
    On-prem offers are priced from ``[prices]``. When the cloud launcher (SkyPilot) is not installed, the
    catalog's cloud offers are listed too, rejected with the reason."""
    from . import _registry

    conf = placement_config()
    if timeout is None:
        timeout = float(conf.get("offers_timeout", DEFAULT_TIMEOUT))
    timeout = max(0.0, timeout)
    limits = respond_limits(conf)
    if backends is not None:
        backends = _names(backends, "backends", False)
    if exclude_backends is not None:
        exclude_backends = _names(exclude_backends, "exclude_backends", False)
    names, catalog_launcher = _sources(backends, exclude_backends)
    named = backends is not None and len(names) == 1  # one backend asked for by name: waited for, never skipped
    marks = {} if named or limits.skip_for <= 0 else _registry.unresponsive()
    prices = price_table()
    out: list[list[Offer] | None] = []
    skipped: list[str] = []
    wake = threading.Event()
    probes: list[tuple[int, str, Any, float, float]] = []  # (slot, source, probe, limit, wait)
    spec_errors: list[SpecError] = []

    def backend_fn(name: str) -> Any:
        def fn(probe: Any) -> tuple[list[Offer], str | None]:
            try:
                return _ask(name, spec, probe)
            except SpecError as e:
                spec_errors.append(e)
                return [Offer(backend=name, where="-", fits=False, reason=str(e))], None
        return fn

    for name in names:
        limit = limits.of(name)
        mark = marks.get(name) if limit > 0 and name != "local" else None
        if mark is not None:
            skipped.append(name)
            out.append([Offer(backend=name, where="-", fits=False, reason=_registry.unresponsive_text(mark))])
            continue
        if name == "local":  # this machine answers from its own process table: a grace on a loaded machine,
            wait = min(timeout, limit or timeout) + LOCAL_GRACE  # and never remembered as not responding
        elif named or limit <= 0:
            wait = timeout
        else:
            wait = min(timeout, limit)
        probe = _registry.Probe(name, backend_fn(name), limit=limit or timeout,
                                skip_for=limits.skip_for if limit > 0 else 0.0, record=name != "local",
                                thread_name=f"meshrun-offers-{name}", wake=wake)
        probes.append((len(out), name, probe, limit, wait))
        out.append(None)
    if catalog_launcher is not None:
        source = f"{catalog_launcher} (catalog)"
        limit = limits.default
        probe = _registry.Probe(source, lambda _p: (_catalog_source(spec, catalog_launcher, catalog_dir), None),
                                limit=limit or timeout, record=False, thread_name=f"meshrun-offers-{source}",
                                wake=wake)
        probes.append((len(out), source, probe, limit, min(timeout, limit) if limit > 0 else timeout))
        out.append(None)
    fresh = [n for n in skipped if marks[n]["time"] > _announced.get(n, 0.0)]  # each record said once here
    if fresh:
        _announced.update((n, time.time()) for n in fresh)
        _notice("skipping " + "; ".join(f"{n}: {_registry.unresponsive_text(marks[n])}" for n in fresh))
    for _, _, probe, _, _ in probes:
        probe.start()

    t0 = time.monotonic()
    open_ = list(probes)
    noticed, told = False, 0
    given_up: list[tuple[str, str, bool]] = []  # (source, reason, remembered) of those not waited for
    while True:
        wake.clear()
        now = time.monotonic()
        still = []
        for slot, source, probe, limit, wait in open_:
            if probe.done.is_set():
                out[slot] = _answer(source, probe)
            elif now - t0 >= wait and probe.give_up():
                ran = now - t0
                if limit > 0 and ran >= limit:
                    why = not_responding_text(probe.doing, wait)
                else:
                    why = f"did not answer within {wait:g}s (offers_timeout; it was {probe.doing})"
                out[slot] = [Offer(backend=source.split()[0], where="-", fits=False, reason=why)]
                given_up.append((source, why, probe.remembered))
            elif probe.done.is_set():  # it ended just now
                out[slot] = _answer(source, probe)
            else:
                still.append((slot, source, probe, limit, wait))
        open_ = still
        now = time.monotonic()
        _announced.update((source, time.time()) for source, _, remembered in given_up if remembered)
        if not noticed and now - t0 >= NOTICE_AFTER and (open_ or given_up):
            noticed, told = True, len(given_up)
            _notice(_slow_line(given_up, [(s, p) for _, s, p, _, _ in open_], limits.skip_for, now - t0))
        elif noticed and len(given_up) > told:  # skipped after the line that said it was waited for
            _notice(_slow_line(given_up[told:], [], limits.skip_for, now - t0))
            told = len(given_up)
        if not open_:
            break
        nxt = min(t0 + w for _, _, _, _, w in open_)
        if not noticed:
            nxt = min(nxt, t0 + NOTICE_AFTER)
        wake.wait(max(0.0, nxt - now))
    if named and spec_errors:
        raise spec_errors[0]  # one backend asked for by name: its verdict on the spec stands
    result: list[Offer] = []
    for got in out:
        for o in got or []:
            result.append(onprem_price(o, prices))
    return result


def _answer(source: str, probe: Any) -> list[Offer]:
    if probe.result is not None:
        return probe.result
    e = probe.error
    why = str(e) if isinstance(e, MeshrunError) else (probe.failure or "no answer")
    return [Offer(backend=source.split()[0], where="-", fits=False, reason=why)]


def _slow_line(given_up: Sequence[tuple[str, str, bool]], waiting: Sequence[tuple[str, Any]], skip_for: float,
               took: float) -> str:
    """The one stderr line of a gathering that takes longer than a second."""
    parts = []
    for source, why, remembered in given_up:
        part = f"{source} is {why}" if why.startswith("not responding") else f"{source} {why}"
        if why.startswith("not responding") and remembered:
            part += f": skipped, and not asked again for {format_duration(skip_for)}"
        else:
            part += ": skipped"
        parts.append(part)
    for source, probe in waiting:
        parts.append(f"still waiting for {source} ({probe.doing}, {probe.running_for():.1f}s so far)")
    return f"gathering offers is slow ({took:.1f}s): " + "; ".join(parts)


gather_offers = offers


def gather_gpu_alternatives(spec: Any, backends: Sequence[str] | None = None, **kw: Any) -> list[Offer]:
    """Offers for each of the spec's GPU alternatives (``Resources.gpu_alternatives``), most preferred first,
    so ranking weighs every alternative by its own price; each offer remembers its alternative in
    ``detail["gpu_choice"]`` (see :func:`spec_for_offer`). A spec without alternatives is gathered as is."""
    alts = spec.resources.alternatives() if hasattr(spec, "resources") else []
    if len(alts) <= 1:
        return gather_offers(spec, backends, **kw)
    out: list[Offer] = []
    for r in alts:
        choice = f"{r.gpu_type}:{r.gpus}"
        for o in gather_offers(spec.replace(resources=r), backends, **kw):
            out.append(replace(o, detail={**o.detail, "gpu_choice": choice}))
    return out


def spec_for_offer(spec: Any, offer: Offer | None) -> Any:
    """The spec to submit with ``offer``: the GPU alternative the offer was made for (the spec itself when
    it has no alternatives or the offer names none)."""
    choice = offer.detail.get("gpu_choice") if offer is not None else None
    if not choice or not getattr(spec.resources, "gpu_alternatives", ()):
        return spec
    return spec.replace(gpus=choice)


# ---- plan: gather + rank -----------------------------------------------------------------------------


def plan(
    spec: Any,
    *,
    objective: Any = None,
    runtime: Any = None,
    deadline: Any = None,
    value_of_time: Any = None,
    max_price_per_hour: Any = None,
    backends: Sequence[str] | None = None,
    exclude_backends: Sequence[str] | None = None,
    allow_spot: bool | None = None,
    regions: Sequence[str] | None = None,
    unknown_start: Any = None,
    offers: Sequence[Offer] | None = None,
    timeout: float | None = None,
    catalog_dir: str | os.PathLike[str] | None = None,
    raise_on_empty: bool = True,
) -> Plan:
    """Where ``spec`` should run, and why. Gathers offers from the backends (or ranks ``offers`` when given)
    and ranks them by ``objective``:

    - ``"cost"`` (default): lowest total price per hour x ``runtime`` (default 1 h);
    - ``"start"``: earliest expected start;
    - ``"balanced"``: lowest cost + ``value_of_time`` ($ per hour of waiting) x expected wait.

    Constraints: ``deadline`` (the job must be expected to start within it: seconds, "1h", a timedelta or a
    datetime; offers with an unknown start are rejected), ``max_price_per_hour`` (all nodes together),
    ``backends`` / ``exclude_backends``, ``allow_spot`` (default False) and ``regions`` (wildcards allowed;
    on-prem offers have no region and pass). Raises :class:`meshrun.NoPlacementError` listing every
    rejection when nothing fits, unless ``raise_on_empty=False``."""
    inputs = resolve_inputs(objective=objective, runtime=runtime, deadline=deadline, value_of_time=value_of_time,
                            max_price_per_hour=max_price_per_hour, backends=backends,
                            exclude_backends=exclude_backends, allow_spot=allow_spot, regions=regions,
                            unknown_start=unknown_start)
    if offers is None:
        t0 = time.perf_counter()
        got = gather_gpu_alternatives(spec, inputs["backends"], exclude_backends=inputs["exclude_backends"],
                                      timeout=timeout, catalog_dir=catalog_dir)
        gathered = time.perf_counter() - t0
    else:
        got, gathered = list(offers), 0.0
    p = _rank(spec, got, inputs)
    p.inputs["gather_seconds"] = round(gathered, 4)
    if p.chosen is None and raise_on_empty:
        raise no_placement(spec, p)
    return p


def no_placement(spec: Any, p: Plan) -> NoPlacementError:
    name = getattr(spec, "display_name", "the job")
    what = _spec_text(spec)
    lines = rejection_lines(p.rejected) or ["no backend made an offer (is any backend installed and configured?)"]
    err = NoPlacementError(f"no offer can run {what}: every option was rejected", lines)
    err.plan = p  # type: ignore[attr-defined]
    err.job_name = name  # type: ignore[attr-defined]
    return err


# ---- the plan of a submitted job, kept in its folder for failover ------------------------------------

PLAN_FILE = "plan.json"
MAX_STORED = 50


def save_plan(job_dir: Path, p: Plan | None, launch: Mapping[str, Any], max_pending: float | None,
              candidates: Sequence[Offer] | None = None) -> None:
    """Write ``plan.json``: the ranked offers (best first), the original launch description and
    ``max_pending``, so any process can move the job to its next offer later."""
    cands = list(candidates if candidates is not None else (p.offers if p is not None else []))[:MAX_STORED]
    data = {
        "version": 1,
        "created_at": time.time(),
        "objective": p.objective.value if p is not None else None,
        "inputs": _jsonable(p.inputs) if p is not None else {},
        "explanation": p.explain_choice() if p is not None else None,
        "max_pending": max_pending,
        "launch": dict(launch),
        "ranked": [offer_to_dict(o) for o in cands],
        # why the other options were not taken, one entry per backend and reason
        "rejected": [{"backend": g["backend"], "where": g["where"], "count": int(g["count"]), "reason": g["reason"]}
                     for g in group_rejections(p.rejected)][:MAX_STORED] if p is not None else [],
    }
    from ._store import _atomic_write  # 0600, like every file of a job folder

    _atomic_write(Path(job_dir) / PLAN_FILE, (json.dumps(data, indent=1, default=str) + "\n").encode())


def load_plan(job_dir: Path) -> dict[str, Any] | None:
    """``plan.json`` of a job folder with its offers rebuilt (``data["offers"]``), or None."""
    try:
        data = json.loads((Path(job_dir) / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        data["offers"] = [offer_from_dict(d) for d in data.get("ranked", [])]
    except TypeError:
        return None
    return data



# ---- failover: submit errors and jobs pending past max_pending ----------------------------------------

#: a backend that failed this many submits of one job is skipped for the rest of its failover
FAILS_PER_BACKEND = 3

#: files of a job folder that belong to the job, not to one attempt (everything else is archived on a move)
JOB_FILES = ("spec.json", "payload.pkl", PLAN_FILE, ".failover.lock")
ATTEMPTS_DIR = "attempts"


def record_plan(prepared: Any, store: Any, p: Plan) -> None:
    """Keep the plan with a prepared job (plan.json, for failover from any process) and record why it was
    placed where it was (the ``placed`` event, which also carries ``max_pending``)."""
    sub = prepared.submission
    save_plan(sub.job_dir, p, sub.launch, sub.spec.max_pending)
    slow = sorted({o.backend for o, why in p.rejected if why.startswith("not responding")})
    store.add_event(prepared.record.id, "placed", offer=p.chosen.key if p.chosen else None,
                    objective=p.objective.value, why=p.explain_choice(), candidates=len(p.ranked),
                    max_pending=sub.spec.max_pending, not_responding=", ".join(slow) or None)


def write_launch(job_dir: Path, launch: Mapping[str, Any]) -> None:
    """Rewrite launch.json (atomically) with the job's original launch description."""
    job_dir = Path(job_dir)
    from ._store import _atomic_write  # 0600, like every file of a job folder

    _atomic_write(job_dir / "launch.json", (json.dumps(dict(launch), sort_keys=True) + "\n").encode())


def archive_attempt(job_dir: Path, attempt: int) -> Path:
    """Move what one attempt left in the job folder (the agent's records, its output) to attempts/<n>/, so
    the next attempt starts from a clean folder and the old output stays readable."""
    job_dir = Path(job_dir)
    dest = job_dir / ATTEMPTS_DIR / str(attempt)
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    for p in job_dir.iterdir():
        if p.name in JOB_FILES or p.name == ATTEMPTS_DIR or p.name.startswith(".") and p.name.endswith(".lock"):
            continue
        try:
            os.replace(p, dest / p.name)
        except OSError:
            pass
    return dest


@contextlib.contextmanager
def job_folder_lock(job_dir: Path) -> Iterator[bool]:
    """Try to take the job folder's exclusive lock (without waiting): yields True when this process holds it,
    False when another process is moving or resubmitting the job right now."""
    import fcntl

    fd = os.open(Path(job_dir) / ".failover.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def move_to_next_offer(job: Any, *, waited: float, max_pending: float) -> bool:
    """Cancel a job stuck in PENDING and submit its folder to the next offer of its plan. Returns True when
    it moved. Safe against several processes refreshing the same job: one holds the folder's lock and
    re-checks the record; the others do nothing."""
    from ._backend import JobState, Submission
    from ._registry import get_backend
    from ._scheduler import Prepared, _submit_with_failover
    from ._spec import JobSpec

    store = job._store
    job_dir = Path(job.job_dir)
    with job_folder_lock(job_dir) as mine:
        if not mine:
            return False  # another process is moving it right now
        rec = store.get(job.id)
        if rec.state is not JobState.PENDING or rec.backend_id != job._record.backend_id:
            job._record = rec
            return False
        data = load_plan(job_dir)
        if data is None:
            store.add_event(job.id, "failover_exhausted", reason="no plan.json in the job folder: nothing to move to")
            job._record = store.get(job.id)
            return False
        tried = {h.get("offer") for h in rec.history if h.get("event") in ("submitted", "submit_failed")}
        current = next((h.get("offer") for h in reversed(rec.history) if h.get("event") == "submitted"), None)
        cands = [o for o in data["offers"] if o.key not in tried]
        why = f"pending for {format_duration(waited)}, longer than max_pending {format_duration(max_pending)}"
        if not cands:
            store.add_event(job.id, "failover_exhausted", reason=f"{why}, but every offer of its plan was tried; "
                            f"it stays on {rec.backend}")
            job._record = store.get(job.id)
            return False
        backend = get_backend(rec.backend)
        now_state = backend.status([rec.backend_id]).get(rec.backend_id)
        if now_state is not None and now_state.state is not JobState.PENDING:
            return False  # it started (or ended) meanwhile: the next refresh records that
        try:
            backend.cancel(rec.backend_id)
        except MeshrunError as e:
            store.add_event(job.id, "failover_failed", backend=rec.backend, error=f"cancel failed: {e}")
            job._record = store.get(job.id)
            return False
        archive_attempt(job_dir, rec.attempt)
        launch = data.get("launch") or json.loads((job_dir / ATTEMPTS_DIR / str(rec.attempt) / "launch.json").read_text())
        write_launch(job_dir, launch)
        store.add_event(job.id, "moved", attempt=rec.attempt, backend=rec.backend, backend_id=rec.backend_id,
                        offer=current, reason=why, next=cands[0].key)
        store.update(job.id, state=JobState.SUBMITTING, backend_id=None, reason=f"moving: {why}", where=None,
                     submitted_at=None)
        spec = JobSpec.from_json((job_dir / "spec.json").read_text())
        sub = Submission(job_id=job.id, job_dir=job_dir, spec=spec, launch=dict(launch), attempt=rec.attempt + 1)
        prepared = Prepared(store.get(job.id), sub)
        try:
            _submit_with_failover(prepared, store, cands[0].backend, cands[0], None, candidates=cands)
        except MeshrunError:
            pass  # recorded: every remaining offer failed, the job is FAILED with the reasons in its history
        job._record = store.get(job.id)
        return True


# ---- the CLI's time budget ----------------------------------------------------------------------------


def cli_offers_timeout(budget: float = 0.9, least: float = 0.3) -> float:
    """How long ``meshrun offers`` may wait for backends so it answers within ``budget`` seconds of the
    process starting (never less than ``least``, never more than ``[placement] offers_timeout``)."""
    try:
        conf = float(placement_config().get("offers_timeout", DEFAULT_TIMEOUT))
    except (TypeError, ValueError):
        conf = DEFAULT_TIMEOUT
    return max(least, min(conf, budget - _process_age()))


def _process_age() -> float:
    """Seconds since this process started (0 where /proc cannot tell)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def still_asking() -> list[str]:
    """Sources whose offers were not waited for and whose thread still runs (a CLI may exit without them)."""
    return sorted(t.name.removeprefix("meshrun-offers-") for t in threading.enumerate()
                  if t.name.startswith("meshrun-offers-") and t.is_alive())
