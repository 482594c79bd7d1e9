"""Placement: rank offers by cost and availability, and explain the choice. (Expanded by the placement work.)"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

from ._backend import Offer
from ._errors import MeshrunError, NoPlacementError


class Objective(str, enum.Enum):
    COST = "cost"
    START = "start"
    BALANCED = "balanced"


@dataclass
class Plan:
    chosen: Offer
    ranked: list[Offer]
    rejected: list[tuple[Offer, str]] = field(default_factory=list)
    objective: Objective = Objective.COST

    def explain_choice(self) -> str:
        return f"{self.chosen.describe()} chosen by {self.objective.value}"


def offers(spec: Any, backends: Sequence[str] | None = None) -> list[Offer]:
    from ._registry import get_backend, installed_names

    out: list[Offer] = []
    for name in backends or installed_names():
        try:
            b = get_backend(name)
            av = b.check()
            if not av.ok:
                out.append(Offer(backend=name, where="-", fits=False, reason=f"unavailable: {av.reason}"))
                continue
            out.extend(b.offers(spec))
        except MeshrunError as e:
            out.append(Offer(backend=name, where="-", fits=False, reason=str(e)))
    return out


def plan(spec: Any, *, objective: str | Objective = Objective.COST, offers_: Sequence[Offer] | None = None,
         **kw: Any) -> Plan:
    objective = Objective(objective)
    all_offers = list(offers_) if offers_ is not None else offers(spec, kw.get("backends"))
    fitting = [o for o in all_offers if o.fits]
    rejected = [(o, o.reason or "does not fit") for o in all_offers if not o.fits]
    if not fitting:
        raise NoPlacementError(f"no backend can run {spec.display_name!r}",
                               [f"{o.key}: {why}" for o, why in rejected])
    ranked = sorted(fitting, key=lambda o: (o.total_price_per_hour, o.expected_start if o.expected_start is not None else float("inf"), o.key))
    return Plan(ranked[0], ranked, rejected, objective)
