"""Placement: gather priced offers from every backend, rank them by cost and availability, explain the choice.

:func:`plan` puts the parts together, which live apart on purpose:

- :mod:`meshrun._options`: :class:`PlacementOptions`, the arguments and the ``[placement]`` config, validated;
- :mod:`meshrun._gather`: the offers of every installed, usable backend, asked in parallel with a deadline;
- :mod:`meshrun._prices`: on-prem offers priced from ``[prices]``;
- :mod:`meshrun._plan`: the pure ranking into a :class:`Plan` (chosen, ranked, rejected and why).

What happens to a job after placement (submit, failover, retries) is :mod:`meshrun._attempts`.
docs/placement.md gives the formulas.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from ._backend import Offer
from ._gather import _sources, gather_gpu_alternatives
from ._gather import offers as gather_offers
from ._options import PlacementOptions, effective, resolve_inputs
from ._plan import Objective, Plan, Rejection, _rank, no_placement, rank

__all__ = ["Objective", "Plan", "PlacementOptions", "offers", "plan", "rank", "rest_of"]

offers = gather_offers


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
    options: PlacementOptions | None = None,
    settle_early: bool = False,
) -> Plan:
    """Where ``spec`` should run, and why. Gathers offers from the backends (or ranks ``offers`` when given)
    and ranks them by ``objective``:

    - ``"cost"`` (default): lowest total price per hour x ``runtime`` (default 1 h);
    - ``"start"``: earliest expected start;
    - ``"balanced"``: lowest cost + ``value_of_time`` ($ per hour of waiting) x expected wait.

    Constraints: ``deadline`` (the job must be expected to start within it: seconds, "1h", a timedelta or a
    datetime; offers with an unknown start are rejected), ``max_price_per_hour`` (all nodes together),
    ``backends`` / ``exclude_backends``, ``allow_spot`` (default False) and ``regions`` (wildcards allowed;
    on-prem offers have no region and pass). The keywords are those of :class:`PlacementOptions` (``timeout``
    is its ``offers_timeout``); ``options`` may carry them all at once (the keywords win). Raises
    :class:`meshrun.NoPlacementError` listing every rejection when nothing fits, unless
    ``raise_on_empty=False``.

    ``settle_early`` (what a submit uses): a job that wants no GPU is first offered to this machine alone, and
    when this machine can start it now at no cost, no other backend is asked. Nothing can rank above that
    offer: no price is below zero, no start is sooner than now, and ties go to this machine. The backends not
    asked are listed among the rejections, and in ``Plan.unasked`` (:func:`rest_of` asks them, for
    failover)."""
    opts = PlacementOptions.of(options, objective=objective, runtime=runtime, deadline=deadline,
                               value_of_time=value_of_time, max_price_per_hour=max_price_per_hour,
                               backends=backends, exclude_backends=exclude_backends, allow_spot=allow_spot,
                               regions=regions, unknown_start=unknown_start, timeout=timeout,
                               catalog_dir=catalog_dir)
    inputs = resolve_inputs(opts)
    if offers is None:
        t0 = time.perf_counter()
        here: list[Offer] = []
        first = settle_early and _local_first(spec, inputs)
        if first:
            here = gather_offers(spec, ["local"], options=opts)
            p = _rank(spec, here, inputs)
            if _unbeatable(p):
                names, catalog = _sources(inputs["backends"], inputs["exclude_backends"], effective(opts))
                p.unasked = [n for n in names if n != "local"] + ([f"{catalog} (catalog)"] if catalog else [])
                why = ("not asked: this machine can start it now at no cost, which no offer can beat "
                       "(`meshrun offers` asks every backend)")
                p.rejected += [Rejection(Offer(backend=n.split()[0], where="-", fits=False, reason=why), why)
                               for n in p.unasked]
                p.options = opts
                p.inputs["gather_seconds"] = round(time.perf_counter() - t0, 4)
                return p
        got = here + gather_gpu_alternatives(spec, inputs["backends"], exclude_backends=inputs["exclude_backends"],
                                             options=opts, asked=["local"] if first else [])
        gathered = time.perf_counter() - t0
    else:
        got, gathered = list(offers), 0.0
    p = _rank(spec, got, inputs)
    p.options = opts
    p.inputs["gather_seconds"] = round(gathered, 4)
    if p.chosen is None and raise_on_empty:
        raise no_placement(spec, p)
    return p


def _local_first(spec: Any, inputs: dict[str, Any]) -> bool:
    """Whether to ask this machine alone first: it may run the job, and it answers a job without GPUs from
    its own memory (no tool to start, nothing that can hang)."""
    if inputs["backends"] is not None and "local" not in inputs["backends"]:
        return False
    if "local" in (inputs["exclude_backends"] or ()):
        return False
    res = getattr(spec, "resources", None)
    return res is not None and not res.gpus and len(res.alternatives()) <= 1


def _unbeatable(p: Plan) -> bool:
    """This machine's offer is free and starts now: every ranking key is (0, 0, this machine first)."""
    if p.chosen is None or p.chosen.backend != "local":
        return False
    best = p.ranked[0]
    return best.cost == 0 and best.wait == 0


def rest_of(spec: Any, options: PlacementOptions | None) -> Plan:
    """The plan over every backend but this machine, with the same options: what a plan settled early did
    not ask, for failover once this machine did not run the job. Never raises for an empty plan."""
    o = effective(options)
    backends = tuple(b for b in o.backends if b != "local") if o.backends is not None else None
    if backends == ():
        return Plan(None, [], [], o.objective or Objective.COST, {})
    excluded = tuple(o.exclude_backends or ()) + ("local",)
    return plan(spec, options=o.model_copy(update={"backends": backends, "exclude_backends": excluded}),
                raise_on_empty=False)
