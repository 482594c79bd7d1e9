"""Gathering offers: every installed, usable backend asked in parallel threads, with a deadline and a memory.

A backend that does not answer within ``respond_within`` (1 s) is skipped as not responding and remembered
so for a minute, so a dead Slurm controller or API server costs one submit a second, not every submit ten;
when no backend launches cloud offers, the cloud catalog is read here. On-prem offers are priced from
``[prices]`` (:mod:`meshrun._prices`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from typing import Any, Iterator, Sequence

from dataclasses import replace

from ._backend import Availability, Feature, Offer
from ._errors import MeshrunError, SpecError
from ._options import (
    DEFAULT_CLOUD_LAUNCHER,
    DEFAULT_TIMEOUT,
    PlacementOptions,
    check_names,
    effective,
    respond_limits,
)
from ._prices import onprem_price, price_table
from ._units import format_duration

LOCAL_GRACE = 2.0  # extra seconds the local backend (this machine) is waited for past the timeout
#: gathering that takes longer than this says on stderr which backend it is waiting for
NOTICE_AFTER = 1.0


def _sources(backends: Sequence[str] | None, exclude: Sequence[str] | None,
             options: PlacementOptions) -> tuple[list[str], str | None]:
    """Which backends to ask, and the launcher for catalog offers placement reads itself (or None)."""
    from ._registry import installed_backends

    launcher = options.cloud_launcher or DEFAULT_CLOUD_LAUNCHER
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
        if name != "skypilot" and getattr(spec, "backend_options", {}).get("skypilot"):
            from ._taskyaml import skypilot_only  # a SkyPilot instance_type whose GPUs the spec does not say

            why = skypilot_only(spec)
            if why:
                why = f"the {name} backend cannot run it: {why}"
                return [Offer(backend=name, where="-", fits=False, reason=why)], None
        if (getattr(spec, "inputs", None) or getattr(spec, "outputs", None)) and Feature.DATA not in b.features:
            why = getattr(b, "data_refusal", "") or "it does not run the node-side stager"
            return [Offer(backend=name, where="-", fits=False, reason=f"the {name} backend cannot move the job's "
                          f"object-store inputs/outputs: {why}")], None
        doing("checking availability")
        av = Availability(True) if type(b).always_available else b.check()
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


def _catalog_source(spec: Any, launcher: str, catalog_dir: Any, options: PlacementOptions) -> list[Offer]:
    from ._catalog import catalog_offers
    from ._registry import KNOWN

    clouds = list(options.clouds) if options.clouds is not None else None
    got = catalog_offers(spec, catalog_dir, clouds=clouds, launcher=launcher, expected_start=options.cloud_start)
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
    options: PlacementOptions | None = None,
    asked: Sequence[str] = (),
) -> list[Offer]:
    """Every offer for ``spec``: from each installed backend (or those named), asked in parallel (``asked``:
    backends whose offers the caller has already, left out here).

    A backend has ``respond_within`` seconds (1 s) to check and make its offers; one that does not is listed
    as ``not responding (<what it was doing>, >1s)``, skipped, and remembered so (per user, in
    ``MESHRUN_HOME``) for ``skip_unresponsive_for`` (60 s): later submits do not ask it at all, and a later
    answer (from its thread finishing here, or from ``meshrun backends``) forgets it again. No backend is
    waited for longer than ``timeout`` (``offers_timeout``, 10 s); one backend named alone is waited for that
    long. Gathering that takes longer than a second says on stderr which backend is slow. On-prem offers are
    priced from ``[prices]``. When the cloud launcher (SkyPilot) is not installed, the catalog's cloud offers
    are listed too, rejected with the reason. ``options`` (:class:`PlacementOptions`, over the
    ``[placement]`` config) give the rest; the keywords override them."""
    from . import _registry

    given = PlacementOptions.of(options, backends=backends, exclude_backends=exclude_backends, timeout=timeout,
                                catalog_dir=catalog_dir)
    opts = effective(given)
    check_names(opts, given)
    timeout = max(0.0, opts.offers_timeout if opts.offers_timeout is not None else DEFAULT_TIMEOUT)
    limits = respond_limits(opts)
    backends = given.backends
    exclude_backends = given.exclude_backends
    names, catalog_launcher = _sources(backends, exclude_backends, opts)
    named = backends is not None and len(names) == 1  # one backend asked for by name: waited for, never skipped
    names = [n for n in names if n not in asked]
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
        probe = _registry.Probe(source, lambda _p: (_catalog_source(spec, catalog_launcher, given.catalog_dir, opts), None),
                                limit=limit or timeout, record=False, thread_name=f"meshrun-offers-{source}",
                                wake=wake)
        probes.append((len(out), source, probe, limit, min(timeout, limit) if limit > 0 else timeout))
        out.append(None)
    fresh = [n for n in skipped if marks[n]["time"] > _announced.get(n, 0.0)]  # each record said once here
    if fresh:
        _announced.update((n, time.time()) for n in fresh)
        _notice("skipping " + "; ".join(f"{n}: {_registry.unresponsive_text(marks[n])}" for n in fresh))
    if len(probes) == 1 and probes[0][1] == "local":
        probes[0][2].run_here()  # this machine alone: no thread to start (milliseconds in a forked process)
    for _, _, probe, _, _ in probes:
        if not probe.done.is_set():
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



# ---- the CLI's time budget ----------------------------------------------------------------------------


def cli_offers_timeout(budget: float = 0.9, least: float = 0.3) -> float:
    """How long ``meshrun offers`` may wait for backends so it answers within ``budget`` seconds of the
    process starting (never less than ``least``, never more than ``[placement] offers_timeout``)."""
    conf = PlacementOptions.from_config().offers_timeout
    return max(least, min(DEFAULT_TIMEOUT if conf is None else conf, budget - _process_age()))


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


def gather_gpu_alternatives(spec: Any, backends: Sequence[str] | None = None, **kw: Any) -> list[Offer]:
    """Offers for each of the spec's GPU alternatives (``Resources.gpu_alternatives``), most preferred first,
    so ranking weighs every alternative by its own price; each offer remembers its alternative in
    ``detail["gpu_choice"]`` (see :func:`spec_for_offer`). A spec without alternatives is gathered as is."""
    alts = spec.resources.alternatives() if hasattr(spec, "resources") else []
    if len(alts) <= 1:
        return offers(spec, backends, **kw)
    out: list[Offer] = []
    for r in alts:
        choice = f"{r.gpu_type}:{r.gpus}"
        for o in offers(spec.replace(resources=r), backends, **kw):
            out.append(replace(o, detail={**o.detail, "gpu_choice": choice}))
    return out


def spec_for_offer(spec: Any, offer: Offer | None) -> Any:
    """The spec to submit with ``offer``: the GPU alternative the offer was made for (the spec itself when
    it has no alternatives or the offer names none)."""
    choice = offer.detail.get("gpu_choice") if offer is not None else None
    if not choice or not getattr(spec.resources, "gpu_alternatives", ()):
        return spec
    return spec.replace(gpus=choice)
