"""Plan types and the pure ranking: from (spec, offers, options) to a :class:`Plan`, asking nothing.

:func:`rank` is a pure function of the spec, the offers and the placement inputs: the chosen offer, the ranked
table with each offer's cost, score and a one-line reason, and every rejected offer with why.
docs/placement.md gives the formulas. Gathering the offers is :mod:`meshrun._gather`; both together are
:func:`meshrun.plan` (:mod:`meshrun._placement`).
"""

from __future__ import annotations

import enum
import fnmatch
import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from ._backend import Offer
from ._errors import NoPlacementError
from ._options import DEFAULT_RUNTIME, HOUR, Objective, PlacementOptions, resolve_inputs
from ._units import format_duration, format_size

#: equal score and start: the backend with the least overhead first, then the offer key (deterministic)
TIE_ORDER = {"local": 0, "ssh": 1, "slurm": 2, "kubernetes": 3}

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
    #: sources not asked: the plan was settled early (``meshrun.plan(settle_early=True)``), see ``rest_of``
    unasked: list[str] = field(default_factory=list)
    #: the placement options it was made with (the config's are read again)
    options: Any = field(default=None, repr=False, compare=False)

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
        if self.unasked:
            line += f"; the others not asked ({', '.join(self.unasked)}): nothing beats free and now"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective.value,
            "inputs": _jsonable(self.inputs),
            "unasked": list(self.unasked),
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


# ---- the pure ranking ---------------------------------------------------------------------------------


def rank(spec: Any, offers: Iterable[Offer], options: PlacementOptions | None = None, **kw: Any) -> Plan:
    """Rank ``offers`` for ``spec`` (no backend is asked): ``options`` (or the same keywords as
    :func:`meshrun.plan`) over the ``[placement]`` config."""
    inputs = resolve_inputs(PlacementOptions.of(options, **kw))
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
        if total < 0 or not math.isfinite(total):  # a backend's bug: ranking (and settling early) assume >= 0
            reasons.append(f"its price ({total}/h) is not a price: the {o.backend} backend's offer is wrong")
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


def no_placement(spec: Any, p: Plan) -> NoPlacementError:
    name = getattr(spec, "display_name", "the job")
    what = _spec_text(spec)
    lines = rejection_lines(p.rejected) or ["no backend made an offer (is any backend installed and configured?)"]
    err = NoPlacementError(f"no offer can run {what}: every option was rejected", lines)
    err.plan = p  # type: ignore[attr-defined]
    err.job_name = name  # type: ignore[attr-defined]
    return err

