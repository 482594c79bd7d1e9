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
from ._gather import gather_gpu_alternatives
from ._gather import offers as gather_offers
from ._options import PlacementOptions, resolve_inputs
from ._plan import Objective, Plan, _rank, no_placement, rank

__all__ = ["Objective", "Plan", "PlacementOptions", "offers", "plan", "rank"]

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
    ``raise_on_empty=False``."""
    opts = PlacementOptions.of(options, objective=objective, runtime=runtime, deadline=deadline,
                               value_of_time=value_of_time, max_price_per_hour=max_price_per_hour,
                               backends=backends, exclude_backends=exclude_backends, allow_spot=allow_spot,
                               regions=regions, unknown_start=unknown_start, timeout=timeout,
                               catalog_dir=catalog_dir)
    inputs = resolve_inputs(opts)
    if offers is None:
        t0 = time.perf_counter()
        got = gather_gpu_alternatives(spec, inputs["backends"], exclude_backends=inputs["exclude_backends"],
                                      options=opts)
        gathered = time.perf_counter() - t0
    else:
        got, gathered = list(offers), 0.0
    p = _rank(spec, got, inputs)
    p.inputs["gather_seconds"] = round(gathered, 4)
    if p.chosen is None and raise_on_empty:
        raise no_placement(spec, p)
    return p
