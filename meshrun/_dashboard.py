"""``meshrun dashboard``: a local web app over the job store, the GPU leases, offers and bench results.

The standard library's threaded HTTP server, pages rendered here as HTML (every value escaped), and one small
script (``dashboard_static/dashboard.js``) that polls JSON endpoints for live updates. Nothing of it is
imported by ``import meshrun`` or by the other commands.

Safety (docs/dashboard.md): it listens on 127.0.0.1 unless told otherwise with ``--host`` and
``--allow-remote`` (which then needs a ``--token``); every request needs the session token (given once in the
URL, then kept in an HttpOnly cookie); a request whose Host header names another host is refused (DNS
rebinding); on this machine, a connection made by another OS user is refused (its socket's owner is read from
/proc/net); cancel and retry need the CSRF token of the page besides the cookie, a same-origin request, and
act only on jobs of the dashboard's own user. Pages carry a Content-Security-Policy that allows no inline
script.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import html
import ipaddress
import json
import os
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import parse_qs, urlencode, urlsplit

from ._backend import JobState
from ._errors import JobNotFound, MeshrunError
from ._store import JobRecord, Store, _read_json, get_store
from ._units import format_duration, format_size

STATIC_DIR = Path(__file__).with_name("dashboard_static")
PAGE_SIZE = 50
LOG_FIRST_BYTES = 64 * 1024  # the log tail a job page starts with
LOG_CHUNK_BYTES = 256 * 1024  # at most this much new output per poll
TOKEN_ENV = "MESHRUN_DASHBOARD_TOKEN"
STATES = [s.value for s in JobState if s is not JobState.UNKNOWN]

# ---- text made inert ----------------------------------------------------------------------------------

# terminal escape sequences: CSI (colours, cursor moves), OSC (titles, hyperlinks, clipboard) and the
# two-character ones; then every other control character but newline and tab, and the bidi overrides
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
                   r"|\x1b[ -/]*[0-~]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def clean(text: Any) -> str:
    """``text`` without terminal escape sequences and control characters (newlines and tabs kept; a carriage
    return ends a progress-bar step: what it overwrote is dropped)."""
    s = "" if text is None else str(text)
    s = _ANSI.sub("", s).replace("\r\n", "\n")
    if "\r" in s:
        s = "\n".join(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
                      for line in s.split("\n"))
    return _CONTROLS.sub("", s)


def esc(text: Any) -> str:
    """Text for HTML (element content or a quoted attribute): cleaned, then escaped."""
    return html.escape(clean(text), quote=True)


# ---- formatting ---------------------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return f'<time data-t="{float(ts):.3f}">{time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))}</time>'


def _runtime(r: JobRecord) -> str:
    if not r.started_at:
        return "-"
    return format_duration(max(0.0, (r.ended_at or time.time()) - r.started_at))


def _money(v: float | None) -> str:
    if v is None:
        return "-"
    return f"${v:,.2f}" if v < 100 else f"${v:,.0f}"


def _state(s: str) -> str:
    return f'<span class="state s-{esc(s)}">{esc(s)}</span>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "", body_id: str = "") -> str:
    """A table; ``rows`` hold HTML already escaped."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    tb = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    bid = f' id="{body_id}"' if body_id else ""
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody{bid}>{tb}</tbody></table>'


def _kv(pairs: Sequence[tuple[str, str]]) -> str:
    return '<table class="kv">' + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs) + "</table>"


def job_row(r: JobRecord) -> dict[str, Any]:
    """What the jobs list shows of one job (JSON for the live updates)."""
    return {"id": r.id, "name": clean(r.name), "state": r.state.value, "backend": r.backend, "where": clean(r.where),
            "user": r.user, "sweep": r.array_id, "index": r.array_index, "created_at": r.created_at,
            "runtime": _runtime(r), "reason": clean(r.reason)}


def _row_html(r: JobRecord) -> list[str]:
    sweep = (f'<a href="/?sweep={esc(r.array_id)}">{esc(r.array_id)}</a>'
             + (f"[{r.array_index}]" if r.array_index is not None else "")) if r.array_id else "-"
    return [f'<a href="/job/{esc(r.id)}">{esc(r.id)}</a>', esc(r.name), _state(r.state.value), esc(r.backend or "-"),
            esc(r.where or "-"), esc(r.user or "-"), sweep, _when(r.created_at), esc(_runtime(r))]


# ---- the app: what each page shows --------------------------------------------------------------------


class Dashboard:
    """The pages and actions, apart from HTTP (the benchmark calls them directly)."""

    def __init__(self, store: Store, *, token: str, refresh_every: float = 2.0, bench_dirs: Sequence[str] = ()):
        self.store = store
        self.token = token
        self.csrf = hmac.new(token.encode(), b"meshrun dashboard csrf", hashlib.sha256).hexdigest()
        self.refresh_every = refresh_every
        self.bench_dirs = [Path(d).expanduser() for d in bench_dirs]
        self.user = _user()
        self._offers: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._gpus: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.refresh_error: str | None = None

    # ---- background: keep the states of unfinished jobs current (what `meshrun ls` does on each call)
    def start_refresher(self) -> threading.Thread:
        t = threading.Thread(target=self._refresh_loop, name="meshrun-dashboard-refresh", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    def refresh_once(self) -> None:
        from ._job import Job, refresh

        live = [s for s in JobState if not s.terminal]
        recs = self.store.list(limit=500, states=live)
        if recs:
            refresh([Job(r.id, store=self.store, _record=r) for r in recs])

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_every):
            try:
                self.refresh_once()
                self.refresh_error = None
            except Exception as e:  # a backend that cannot be asked now: shown on the pages, tried again
                self.refresh_error = f"{type(e).__name__}: {e}"

    # ---- layout
    def page(self, title: str, body: str, active: str = "") -> str:
        nav = "".join(f'<a href="{href}"{" class=on" if key == active else ""}>{label}</a>'
                      for key, href, label in (("jobs", "/", "Jobs"), ("gpus", "/gpus", "GPUs"),
                                               ("offers", "/offers", "Offers"), ("bench", "/bench", "Bench")))
        note = (f'<p class="warn">state updates failing: {esc(self.refresh_error)}</p>' if self.refresh_error else "")
        return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
                f'<meta name="csrf" content="{self.csrf}"><title>{esc(title)} - meshrun</title>'
                '<link rel="stylesheet" href="/static/dashboard.css"><script src="/static/dashboard.js" defer></script>'
                f'</head><body><header><b>meshrun</b>{nav}<span class="who">{esc(self.user)}</span></header>'
                f"<main>{note}{body}</main></body></html>")

    # ---- jobs
    def list_jobs(self, q: Mapping[str, str]) -> tuple[list[JobRecord], int, int]:
        page = max(1, _int(q.get("page"), 1))
        state = q.get("state") or None
        states = [JobState(state)] if state in STATES else None
        recs, total = self.store.search(limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE, states=states,
                                        backend=q.get("backend") or None, name=q.get("name") or None,
                                        user=q.get("user") or None, array_id=q.get("sweep") or None)
        return recs, total, page

    def jobs_json(self, q: Mapping[str, str]) -> dict[str, Any]:
        recs, total, page = self.list_jobs(q)
        return {"total": total, "page": page, "page_size": PAGE_SIZE, "jobs": [job_row(r) for r in recs]}

    def jobs_page(self, q: Mapping[str, str]) -> str:
        recs, total, page = self.list_jobs(q)
        filters = {k: q.get(k, "") for k in ("state", "backend", "name", "user", "sweep")}

        def select(name: str, values: Sequence[str]) -> str:
            opts = "".join(f'<option value="{esc(v)}"{" selected" if v == filters[name] else ""}>{esc(v)}</option>'
                           for v in values)
            return f'<label>{name} <select name="{name}"><option value="">any</option>{opts}</select></label>'

        form = ('<form class="filters" method="get" action="/">'
                + select("state", STATES) + select("backend", self.store.distinct("backend"))
                + f'<label>name <input name="name" value="{esc(filters["name"])}" placeholder="contains"></label>'
                + select("user", self.store.distinct("user"))
                + f'<label>sweep <input name="sweep" value="{esc(filters["sweep"])}" size=14></label>'
                + '<button>filter</button> <a href="/">clear</a></form>')
        pages = max(1, -(-total // PAGE_SIZE))
        keep = {k: v for k, v in filters.items() if v}

        def link(p: int, label: str) -> str:
            return f'<a href="/?{esc(urlencode(dict(keep, page=p)))}">{label}</a>'

        nav = (f'<p class="pager" id="pager">{link(page - 1, "&larr; newer") if page > 1 else ""} '
               f'page {page} of {pages} (<span id="total">{total}</span> jobs) {link(page + 1, "older &rarr;") if page < pages else ""}</p>')
        table = _table(["ID", "NAME", "STATE", "BACKEND", "WHERE", "USER", "SWEEP", "SUBMITTED", "RUNTIME"],
                       [_row_html(r) for r in recs], cls="jobs", body_id="jobs")
        live = f'<div id="live" data-api="/api/jobs?{esc(urlencode(dict(keep, page=page)))}"></div>'
        empty = "" if recs else '<p id="empty">no jobs match (meshrun run -- CMD starts one)</p>'
        return self.page("jobs", f"<h1>Jobs</h1>{form}{nav}{table}{empty}{live}", "jobs")

    # ---- one job
    def job_data(self, job_id: str) -> dict[str, Any]:
        """The live part of a job page (JSON): state, times, cost, history, outcome."""
        r = self.store.get(job_id)
        cost = self._cost(r)
        return {"id": r.id, "name": clean(r.name), "state": r.state.value, "reason": clean(r.reason),
                "terminal": r.terminal, "where": clean(r.where), "exit_code": r.exit_code,
                "started_at": r.started_at, "ended_at": r.ended_at, "runtime": _runtime(r),
                "cost_so_far": _money(cost[0]) if cost else "-", "cost_estimated": _money(cost[1]) if cost else "-",
                "history": [[h.get("time"), clean(h.get("event")), clean(_detail(h))] for h in r.history],
                "can_cancel": self._can_cancel(r), "can_retry": self._can_retry(r)}

    def _plan(self, r: JobRecord) -> dict[str, Any] | None:
        try:
            data = json.loads((self.store.job_dir(r.id) / "plan.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _cost(self, r: JobRecord, plan: dict[str, Any] | None = None) -> tuple[float, float | None] | None:
        """(cost so far, estimated cost) from the price of the offer the job runs on; None without a price."""
        plan = plan if plan is not None else self._plan(r)
        if not plan:
            return None
        ranked = [o for o in plan.get("ranked") or [] if isinstance(o, dict)]
        key = next((h.get("offer") for h in reversed(r.history) if h.get("offer")), None)
        offer = next((o for o in ranked if o.get("key") == key), None) or (ranked[0] if ranked else None)
        if offer is None:
            return None
        try:
            price = float(offer.get("total_price_per_hour") or 0.0)
        except (TypeError, ValueError):
            return None
        so_far = price * max(0.0, (r.ended_at or time.time()) - r.started_at) / 3600.0 if r.started_at else 0.0
        inputs = plan.get("inputs") or {}
        runtime = inputs.get("time_limit") or inputs.get("runtime")
        est = price * float(runtime) / 3600.0 if isinstance(runtime, (int, float)) and not r.terminal else None
        return so_far, (so_far if r.terminal else est)

    def _can_cancel(self, r: JobRecord) -> bool:
        return r.user == self.user and (not r.terminal or r.state is JobState.LOST)

    def _can_retry(self, r: JobRecord) -> bool:
        return r.user == self.user and r.terminal and r.kind == "command" and \
            (self.store.job_dir(r.id) / "spec.json").exists()

    def job_page(self, job_id: str) -> str:
        r = self.store.get(job_id)
        d = self.store.job_dir(r.id)
        plan = self._plan(r)
        cost = self._cost(r, plan)
        from ._tracking import html_links

        tracked = html_links(d)  # escaped by _tracking; only http(s) links
        sweep = (f'<a href="/?sweep={esc(r.array_id)}">{esc(r.array_id)}</a> [{r.array_index}]'
                 if r.array_id else "-")
        pairs = [("state", f'<span id="state">{_state(r.state.value)}</span> <span id="reason">{esc(r.reason)}</span>'),
                 ("what", f"<code>{esc(r.summary)}</code>"),
                 ("backend", esc(r.backend or "-") + (f" (id <code>{esc(r.backend_id)}</code>)" if r.backend_id else "")),
                 ("where", f'<span id="where">{esc(r.where or "-")}</span>'),
                 ("user", esc(r.user or "-")), ("sweep", sweep), ("attempt", str(r.attempt)),
                 ("submitted", _when(r.created_at)),
                 ("started", f'<span id="started">{_when(r.started_at)}</span>'),
                 ("ended", f'<span id="ended">{_when(r.ended_at)}</span>'),
                 ("runtime", f'<span id="runtime">{esc(_runtime(r))}</span>'),
                 ("exit code", f'<span id="exit">{"-" if r.exit_code is None else r.exit_code}</span>'),
                 ("cost so far", f'<span id="cost">{_money(cost[0]) if cost else "-"}</span>'),
                 ("cost estimated", f'<span id="cost-est">{_money(cost[1]) if cost else "-"}</span>'
                                    + (" (price of its offer x its runtime or time limit)" if cost else "")),
                 ("folder", f"<code>{esc(d)}</code>")]
        if tracked:
            pairs.append(("tracking", tracked))
        buttons = (f'<button id="cancel" data-job="{esc(r.id)}"{"" if self._can_cancel(r) else " disabled"}>cancel</button> '
                   f'<button id="retry" data-job="{esc(r.id)}"{"" if self._can_retry(r) else " disabled"}>retry</button>'
                   ' <span id="action-msg"></span>')
        hist = _table(["TIME", "EVENT", "DETAIL"], [[_when(h.get("time")), esc(h.get("event")), esc(_detail(h))]
                                                   for h in r.history], body_id="history")
        body = (f'<h1>{esc(r.name)} <small>{esc(r.id)}</small></h1><div class="actions">{buttons}</div>'
                f'{_kv(pairs)}<h2>Outcome</h2><div id="outcome">{self._outcome(r)}</div>'
                f"<h2>Output</h2><label><input type=checkbox id=follow checked> follow</label>"
                f'<pre id="log" class="log"></pre><h2>History</h2>{hist}'
                f"<h2>Placement plan</h2>{self._plan_html(plan)}<h2>Spec</h2><pre>{esc(_spec_text(d))}</pre>"
                f'<div id="live-job" data-job="{esc(r.id)}"></div>')
        return self.page(f"job {r.id}", body)

    def _outcome(self, r: JobRecord) -> str:
        d = self.store.job_dir(r.id)
        if not r.terminal:
            return f"<p>{esc(r.state.value)}: no outcome yet</p>"
        if r.state is JobState.SUCCEEDED:
            if r.kind == "function":
                try:
                    size = format_size((d / "result.pkl").stat().st_size)
                except OSError:
                    size = "?"
                return (f"<p>succeeded: returned a value (result.pkl, {esc(size)}); "
                        f"<code>meshrun.Job.attach({esc(repr(r.id))}).result()</code> loads it</p>")
            return "<p>succeeded (exit code 0)</p>"
        err = _read_json(d / "error.json") if r.kind == "function" else None
        if isinstance(err, dict):
            return (f'<p class="bad">{esc(err.get("type"))}: {esc(str(err.get("message", ""))[:2000])}</p>'
                    f'<pre class="tb">{esc(str(err.get("traceback") or "")[-8000:])}</pre>')
        code = f" (exit code {r.exit_code})" if r.exit_code is not None else ""
        return f'<p class="bad">{esc(r.state.value)}{code}: {esc(r.reason or "no reason given")}</p>'

    def _plan_html(self, plan: dict[str, Any] | None) -> str:
        if not plan:
            return "<p>no plan recorded (the backend was named, or the job was submitted before plans were kept)</p>"
        ranked = [o for o in plan.get("ranked") or [] if isinstance(o, dict)]
        rows = [[str(i + 1), esc(o.get("backend")), esc(o.get("where")), esc(_resources(o)),
                 esc(_money(o.get("total_price_per_hour"))) + (" spot" if o.get("spot") else ""), esc(_start(o))]
                for i, o in enumerate(ranked)]
        rej = [[esc(g.get("backend")), esc(g.get("where")), esc(g.get("count")), esc(g.get("reason"))]
               for g in plan.get("rejected") or [] if isinstance(g, dict)]
        out = f'<p>{esc(plan.get("explanation") or "")} (objective {esc(plan.get("objective") or "-")})</p>'
        out += _table(["#", "BACKEND", "WHERE", "RESOURCES", "$/HOUR", "START"], rows, cls="plan") if rows else ""
        out += ("<h3>Rejected offers</h3>" + _table(["BACKEND", "WHERE", "OFFERS", "WHY NOT"], rej, cls="rejected")
                if rej else "<p>no offer was rejected</p>")
        return out

    def log(self, job_id: str, offset: int | None) -> dict[str, Any]:
        """New output from ``offset`` (bytes into output.log; None: the last LOG_FIRST_BYTES), cleaned of
        terminal escapes. A job whose backend keeps its output elsewhere gets its tail each time."""
        r = self.store.get(job_id)
        p = self.store.job_dir(r.id) / "output.log"
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start = max(0, size - LOG_FIRST_BYTES) if offset is None or offset > size else offset
                f.seek(start)
                data = f.read(min(LOG_CHUNK_BYTES, size - start))
        except FileNotFoundError:
            if r.backend in (None, "local"):
                return {"offset": 0, "text": "", "replace": False, "terminal": r.terminal}
            from ._job import Job

            return {"offset": None, "text": clean(Job(r.id, store=self.store, _record=r).log_tail(200, 64000)),
                    "replace": True, "terminal": r.terminal}
        if start and (offset is None or offset > size):  # begin at a line start
            cut = data.find(b"\n")
            data, start = (data[cut + 1:], start + cut + 1) if cut >= 0 else (data, start)
        end = start + len(data)
        # a multi-byte character cut at the end comes whole next time
        text = data.decode("utf-8", "replace") if end == size else _decode_upto(data)
        return {"offset": start + len(text.encode("utf-8", "replace")) if end != size else end, "text": clean(text),
                "replace": offset is None or offset > size, "terminal": r.terminal}

    # ---- actions
    def cancel(self, job_id: str) -> dict[str, Any]:
        from ._job import Job

        r = self.store.get(job_id)
        self._own(r)
        job = Job(r.id, store=self.store, _record=r)
        job.cancel()
        return {"ok": True, "state": job.record.state.value}

    def retry(self, job_id: str) -> dict[str, Any]:
        """Submit the job's spec again as a new job (placed afresh)."""
        r = self.store.get(job_id)
        self._own(r)
        if not self._can_retry(r):
            raise Refused(HTTPStatus.CONFLICT, "only an ended command job can be retried from here "
                                               "(a function job's arguments are pickled: submit it again from Python)")
        from ._jobfile import JobSpec
        from ._scheduler import submit

        spec = JobSpec.from_json((self.store.job_dir(r.id) / "spec.json").read_text())
        job = submit(spec, store=self.store)
        self.store.add_event(r.id, "retried", as_job=job.id)
        return {"ok": True, "job": job.id}

    def _own(self, r: JobRecord) -> None:
        if r.user != self.user:
            raise Refused(HTTPStatus.FORBIDDEN, f"job {r.id} belongs to {r.user!r}; this dashboard acts only for "
                                                f"{self.user!r}")

    # ---- GPUs
    def gpus(self) -> dict[str, Any]:
        """{host: the agent's snapshot} for this machine and each backend that reports its hosts' leases."""
        with self._lock:
            hit = self._gpus
            if hit is not None and time.monotonic() - hit[0] < 2.0:
                return hit[1]
        from ._localenv import local_gpus
        from ._registry import backend_class, get_backend, installed_backends

        snaps: dict[str, Any] = {}
        try:
            local = local_gpus()
            snaps[f"{local.get('host') or 'local'} (local)"] = local
        except Exception as e:
            snaps["local"] = {"unreachable": f"{type(e).__name__}: {e}"}
        for name in installed_backends():
            if name == "local":
                continue
            try:
                if not hasattr(backend_class(name), "gpus"):  # only backends with hosts of their own (ssh)
                    continue
                b = get_backend(name)
                if hasattr(b, "gpus"):
                    for host, snap in (b.gpus() or {}).items():
                        snaps[f"{host} ({name})"] = snap
            except Exception:
                continue  # a backend that is not configured here has no hosts to show
        util = _utilisation()
        for snap in snaps.values():
            for g in snap.get("gpus") or [] if isinstance(snap, dict) else []:
                if g.get("uuid") in util:
                    g.setdefault("utilization", util[g["uuid"]])
        with self._lock:
            self._gpus = (time.monotonic(), snaps)
        return snaps

    def gpus_page(self) -> str:
        parts = []
        for host, snap in self.gpus().items():
            parts.append(_gpu_host_html(host, snap))
        body = "".join(parts) or "<p>no hosts</p>"
        return self.page("GPUs", f'<h1>GPUs</h1><div id="gpus" data-reload="5">{body}</div>', "gpus")

    # ---- offers
    def offers(self, q: Mapping[str, str]) -> dict[str, Any]:
        from ._gather import cli_offers_timeout, quiet
        from ._options import PlacementOptions
        from ._placement import plan
        from ._spec import JobSpec

        fields: dict[str, Any] = {}
        for k in ("gpus", "gpu_type", "nodes", "cpus", "memory"):
            if q.get(k):
                fields[k] = int(q[k]) if k == "nodes" else q[k]
        kw: dict[str, Any] = {}
        if q.get("objective"):
            kw["objective"] = q["objective"]
        if q.get("max_price"):
            kw["max_price_per_hour"] = float(q["max_price"])
        if q.get("backend"):
            kw["backends"] = [q["backend"]]
        key = json.dumps([fields, kw], sort_keys=True)
        with self._lock:
            hit = self._offers.get(key)
            if hit is not None and time.monotonic() - hit[0] < 30.0:
                return hit[1]
        spec = JobSpec(command=["true"], **fields)
        kw.setdefault("offers_timeout", cli_offers_timeout())
        with quiet():
            p = plan(spec, raise_on_empty=False, options=PlacementOptions.of(**kw))
        data = p.to_dict()
        with self._lock:
            self._offers[key] = (time.monotonic(), data)
            while len(self._offers) > 16:
                self._offers.popitem(last=False)
        return data

    def offers_page(self, q: Mapping[str, str]) -> str:
        def field(name: str, label: str, size: int = 8) -> str:
            return f'<label>{label} <input name="{name}" value="{esc(q.get(name, ""))}" size={size}></label>'

        objective = q.get("objective", "")
        opts = "".join(f'<option{" selected" if o == objective else ""}>{o}</option>' for o in ("cost", "start", "balanced"))
        form = ('<form class="filters" method="get" action="/offers">' + field("gpus", "gpus", 6)
                + field("gpu_type", "type", 8) + field("nodes", "nodes", 4) + field("max_price", "max $/h", 6)
                + field("backend", "backend", 8)
                + f'<label>objective <select name="objective"><option value="">cost</option>{opts}</select></label>'
                + "<button>rank</button></form>")
        try:
            data = self.offers(q)
        except (MeshrunError, ValueError) as e:
            return self.page("offers", f'<h1>Offers</h1>{form}<p class="bad">{esc(e)}</p>', "offers")
        rows = [[esc(r["rank"]), esc(r["offer"].get("backend")), esc(r["offer"].get("where")), esc(_resources(r["offer"])),
                 esc(_money(r["offer"].get("total_price_per_hour"))) + (" spot" if r["offer"].get("spot") else ""),
                 esc(_money(r.get("cost"))), esc(_start(r["offer"])), esc(r.get("why"))] for r in data["ranked"]]
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for rj in data["rejected"]:
            groups.setdefault((rj["offer"].get("backend"), rj["reason"]), []).append(rj["offer"])
        rej = [[esc(b), esc(_wheres(offs)), str(len(offs)), esc(why)] for (b, why), offs in groups.items()]
        body = (f"<h1>Offers</h1>{form}<p>{esc(data.get('explanation'))}</p>"
                + (_table(["#", "BACKEND", "WHERE", "RESOURCES", "$/HOUR", "COST", "START", "WHY"], rows, cls="offers")
                   if rows else "<p>no offer fits</p>")
                + (f"<h2>Rejected ({len(data['rejected'])})</h2>"
                   + _table(["BACKEND", "WHERE", "OFFERS", "WHY NOT"], rej, cls="rejected") if rej else ""))
        return self.page("offers", body, "offers")

    # ---- bench
    def bench_runs(self) -> list[dict[str, Any]]:
        """Bench result files (bench.jsonl) in the bench folders given and in job folders, newest first."""
        found: list[Path] = []
        for d in self.bench_dirs:
            found += sorted(d.glob("*.jsonl")) if d.is_dir() else ([d] if d.is_file() else [])
        try:
            with os.scandir(self.store.jobs_dir) as it:
                for e in it:
                    p = Path(e.path) / "bench" / "bench.jsonl"
                    if p.is_file():
                        found.append(p)
        except OSError:
            pass
        runs = []
        for p in found:
            run = _read_bench(p)
            if run is not None:
                runs.append(run)
        return sorted(runs, key=lambda r: -r["mtime"])

    def bench_page(self) -> str:
        runs = self.bench_runs()
        parts = []
        for run in runs:
            env = run["meta"]
            head = " ".join(str(x) for x in (env.get("gpu_model") or env.get("device"), f"x{env.get('ranks') or '?'}",
                                               env.get("backend"), env.get("dtype")) if x)
            plots = "".join(_bench_svg(coll, series) for coll, series in sorted(run["series"].items()))
            parts.append(f'<section class="bench"><h2>{esc(run["path"])}</h2><p>{esc(head)}'
                         f'{" (job " + esc(run["job"]) + ")" if run["job"] else ""}</p>{plots}</section>')
        body = "".join(parts) or ("<p>no bench results found: run <code>meshrun bench</code> (results go to the job's "
                                  "folder), or start the dashboard with <code>--bench DIR</code></p>")
        return self.page("bench", f"<h1>Bench</h1>{body}", "bench")


class Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


# ---- helpers of the pages ------------------------------------------------------------------------------


def _int(v: Any, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def _decode_upto(data: bytes) -> str:
    """``data`` decoded, leaving out an incomplete multi-byte character at its end."""
    for cut in range(0, 4):
        try:
            return data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", "replace")


def _detail(h: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in h.items() if k not in ("time", "event") and v not in (None, ""))


def _spec_text(d: Path) -> str:
    try:
        return json.dumps(json.loads((d / "spec.json").read_text()), indent=2)  # secrets are stored without values
    except (OSError, ValueError):
        return "(no spec.json)"


def _resources(o: Mapping[str, Any]) -> str:
    parts = []
    if (o.get("nodes") or 1) > 1:
        parts.append(f"{o['nodes']} nodes x")
    parts.append(f"{o.get('gpus')}x{o.get('gpu_type') or 'GPU'}" if o.get("gpus") else "CPU")
    if o.get("cpus"):
        parts.append(f"{o['cpus']:g} CPU")
    if o.get("memory"):
        parts.append(format_size(o["memory"]))
    return " ".join(parts)


def _start(o: Mapping[str, Any]) -> str:
    s = o.get("expected_start")
    if s is None:
        return "unknown" + (f" ({o['start_note']})" if o.get("start_note") and o.get("start_note") != "now" else "")
    return "now" if s <= 0 else f"in {format_duration(s)}"


def _wheres(offers: Sequence[Mapping[str, Any]]) -> str:
    ws = sorted({str(o.get("where")) for o in offers})
    return ", ".join(ws) if len(ws) <= 3 else f"{', '.join(ws[:3])} and {len(ws) - 3} more"


def _since(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return f"{_when(ts)} ({esc(format_duration(max(0.0, time.time() - ts)))} ago)"


def _gpu_host_html(host: str, snap: Any) -> str:
    if not isinstance(snap, dict):
        return ""
    if snap.get("unreachable"):
        return f'<section class="host"><h2>{esc(host)}</h2><p class="bad">unreachable: {esc(snap["unreachable"])}</p></section>'
    gpus = snap.get("gpus") or []
    leases = snap.get("leases") or {}
    foreign = snap.get("foreign") or {}
    head = f'<section class="host"><h2>{esc(host)}</h2><p>{esc(snap.get("source") or "")}'
    head += f", leases: {esc(snap.get('mode'))}" if snap.get("mode") else ""
    head += "</p>"
    if snap.get("error") and not gpus:
        return head + f"<p>no GPUs ({esc(snap['error'])})</p></section>"
    rows = []
    for g in gpus:
        lease = leases.get(str(g.get("index"))) or {}
        procs = foreign.get(g.get("uuid")) or []
        if lease:
            holder = f'<span class="held">{esc(lease.get("user", "?"))}</span>'
            job = (f'<a href="/job/{esc(lease.get("job_id"))}">{esc(lease.get("job_id"))}</a> {esc(lease.get("name"))}')
            since = _since(lease.get("since"))
        elif procs:
            holder, job, since = '<span class="bad">foreign</span>', "", "-"
        else:
            holder, job, since = '<span class="free">free</span>', "-", "-"
        fp = "<br>".join(f"pid {esc(p.get('pid'))} {esc(p.get('process_name') or '?')} "
                         f"({esc(p.get('user') or 'another user (hidden)')}"
                         f"{', ' + esc(p.get('used_memory')) + ' MiB' if p.get('used_memory') not in (None, '') else ''})"
                         for p in procs) or "-"
        util = g.get("utilization")
        rows.append([esc(g.get("label", g.get("index"))), esc(g.get("name") or "-"), esc(format_size(g.get("memory"))),
                     esc(f"{util}%" if util is not None else "-"), holder, job, since, fp])
    out = head + _table(["GPU", "NAME", "MEMORY", "UTIL", "HOLDER", "JOB", "SINCE", "FOREIGN PROCESSES"], rows,
                        cls="gpus")
    queue = snap.get("queue") or []
    if queue:
        fair = snap.get("queue_policy") == "fair"
        q = [[esc(t.get("position", i + 1)), esc(t.get("user")), esc(t.get("held", "-")),
              esc("-" if t.get("recent_gpu_hours") is None else f"{t['recent_gpu_hours']:.2f}"),
              f'<a href="/job/{esc(t.get("job_id"))}">{esc(t.get("job_id"))}</a> {esc(t.get("name"))}',
              esc(f"{t.get('gpus')}{' ' + t['gpu_type'] if t.get('gpu_type') else ''}"), _since(t.get("since"))]
             for i, t in enumerate(queue)]
        out += ("<h3>Queue (" + ("fair share: least recent GPU use first" if fair else "first come, first served")
                + ")</h3>" + _table(["#", "USER", "HOLDS", "RECENT GPU-H", "JOB", "GPUS", "WAITING SINCE"], q,
                                    cls="queue"))
    else:
        out += "<p>queue: empty</p>"
    return out + "</section>"


def _utilisation() -> dict[str, int]:
    """{GPU uuid: utilisation %} from nvidia-smi where it answers (quickly); {} elsewhere."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid,utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=3).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    util = {}
    for line in out.splitlines():
        uuid, _, pct = line.partition(",")
        if pct.strip().isdigit():
            util[uuid.strip()] = int(pct.strip())
    return util


def _read_bench(p: Path) -> dict[str, Any] | None:
    """One bench.jsonl: busbw by size for each collective, meshrun's and nccl-tests' where compared."""
    meta: dict[str, Any] = {}
    job = None
    series: dict[str, dict[str, dict[int, float]]] = {}
    try:
        with open(p) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict):
                    continue
                if rec.get("record") == "run":
                    m = rec.get("meta")
                    meta = m if isinstance(m, dict) else {}
                    job = rec.get("job_id")
                elif rec.get("record") == "result" and isinstance(rec.get("size"), int):
                    name = f"meshrun {rec.get('api', '')} {rec.get('mode', '')}".replace("  ", " ").strip()
                    s = series.setdefault(str(rec.get("collective")), {}).setdefault(name, {})
                    s[rec["size"]] = max(s.get(rec["size"], 0.0), float(rec.get("busbw") or 0.0))
                elif rec.get("record") == "comparison" and isinstance(rec.get("nccl_tests_busbw"), (int, float)):
                    s = series.setdefault(str(rec.get("collective")), {}).setdefault(
                        f"nccl-tests {rec.get('mode', '')}".strip(), {})
                    s[int(rec["size"])] = float(rec["nccl_tests_busbw"])
        mtime = p.stat().st_mtime
    except OSError:
        return None
    if not series:
        return None
    return {"path": str(p), "meta": meta, "job": job, "series": series, "mtime": mtime}


_COLOURS = ["#1565c0", "#2e7d32", "#c62828", "#6a1b9a", "#ef6c00", "#00838f", "#4e342e", "#ad1457"]


def _bench_svg(collective: str, series: Mapping[str, Mapping[int, float]], w: int = 820, h: int = 300) -> str:
    """busbw (GB/s) against message size (log scale) as an inline SVG, one line per series."""
    import math

    pts = [(s, v) for ser in series.values() for s, v in ser.items() if s > 0]
    if not pts:
        return ""
    x0, x1 = math.log2(min(s for s, _ in pts)), math.log2(max(s for s, _ in pts))
    y1 = max(v for _, v in pts) or 1.0
    L, R, T, B = 60, 250, 24, 40
    pw, ph = w - L - R, h - T - B

    def X(s: int) -> float:
        return L + (0 if x1 == x0 else (math.log2(s) - x0) / (x1 - x0) * pw)

    def Y(v: float) -> float:
        return T + ph - v / y1 * ph

    out = [f'<svg class="plot" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">',
           f'<text x="{L}" y="16" class="title">{esc(collective)}: busbw (GB/s) by size</text>',
           f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" class="axis"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" class="axis"/>']
    for i in range(5):
        v = y1 * i / 4
        out.append(f'<text x="{L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    sizes = sorted({s for s, _ in pts})
    step = max(1, len(sizes) // 6)
    for s in sizes[::step]:
        out.append(f'<text x="{X(s):.1f}" y="{T + ph + 16}" text-anchor="middle">{esc(format_size(s))}</text>')
    for i, (name, ser) in enumerate(sorted(series.items())):
        c = _COLOURS[i % len(_COLOURS)]
        path = " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in sorted(ser.items()) if s > 0)
        dash = ' stroke-dasharray="5,3"' if name.startswith("nccl-tests") else ""
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{path}"/>')
        out.append(f'<text x="{L + pw + 8}" y="{T + 12 + 16 * i}" fill="{c}">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):  # pragma: no cover
        return os.environ.get("USER", "?")


# ---- HTTP ---------------------------------------------------------------------------------------------

_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def peer_uid(client: tuple[Any, ...], server_port: int) -> int | None:
    """The uid owning the other end of a loopback TCP connection (from /proc/net/tcp and tcp6), or None when
    that cannot be read."""
    cport = int(client[1])
    want_local, want_remote = f":{cport:04X}", f":{server_port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 7 and parts[1].endswith(want_local) and parts[2].endswith(want_remote):
                        return int(parts[7])
        except OSError:
            continue
    return None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], app: Dashboard, *, remote: bool):
        import socket

        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, Handler)
        self.app = app
        self.remote = remote
        self.port = int(self.server_address[1])
        self.uid = os.getuid()
        self.hosts = {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]")}
        if addr[0] not in ("", "0.0.0.0", "::"):
            self.hosts.add(f"{addr[0] if ':' not in addr[0] else '[' + addr[0] + ']'}:{self.port}")

    @property
    def cookie(self) -> str:
        return f"meshrun_dashboard_{self.port}"


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "meshrun-dashboard"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if os.environ.get("MESHRUN_DASHBOARD_LOG"):
            super().log_message(format, *args)

    # ---- responses
    def _send(self, status: int, body: bytes, ctype: str, extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", _CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _html(self, text: str, status: int = 200) -> None:
        self._send(status, text.encode("utf-8"), "text/html; charset=utf-8")

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _refuse(self, status: HTTPStatus, why: str) -> None:
        if self.path.startswith("/api/") or self.command == "POST":
            self._json({"error": why}, status)
        else:
            self._html(f"<!doctype html><title>{status.value}</title><h1>{status.value} {esc(status.phrase)}</h1>"
                       f"<p>{esc(why)}</p>", status)

    # ---- checks made on every request
    def _allowed(self) -> bool:
        host = self.headers.get("Host", "")
        if host not in self.server.hosts and not self.server.remote:
            self._refuse(HTTPStatus.FORBIDDEN, f"unexpected Host header {host!r} (this dashboard answers "
                                               f"127.0.0.1:{self.server.port} only)")
            return False
        if _loopback(self.client_address[0]):
            uid = peer_uid(self.client_address, self.server.port)
            if uid is not None and uid != self.server.uid:
                self._refuse(HTTPStatus.FORBIDDEN, f"this dashboard serves only the OS user who started it "
                                                   f"(uid {self.server.uid}); the connection is from uid {uid}")
                return False
        return True

    def _cookie_token(self) -> str | None:
        from http.cookies import CookieError, SimpleCookie

        try:
            c: SimpleCookie = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return None
        m = c.get(self.server.cookie)
        return m.value if m is not None else None

    def _authed(self) -> bool:
        got = self._cookie_token()
        return got is not None and hmac.compare_digest(got.encode(), self.server.app.token.encode())

    # ---- GET
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._get()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _get(self) -> None:
        if not self._allowed():
            return
        u = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        app = self.server.app
        if "token" in q:  # the link printed at start: keep the token in a cookie, then drop it from the URL
            if not hmac.compare_digest(q["token"].encode(), app.token.encode()):
                return self._refuse(HTTPStatus.UNAUTHORIZED, "wrong token")
            rest = {k: v for k, v in q.items() if k != "token"}
            where = u.path + ("?" + urlencode(rest) if rest else "")
            self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {
                "Location": where,
                "Set-Cookie": f"{self.server.cookie}={app.token}; HttpOnly; SameSite=Strict; Path=/"})
            return
        if u.path.startswith("/static/"):
            name = u.path[len("/static/"):]
            p = STATIC_DIR / name
            if "/" in name or p.suffix not in _STATIC_TYPES or not p.is_file():
                return self._refuse(HTTPStatus.NOT_FOUND, "no such file")
            return self._send(200, p.read_bytes(), _STATIC_TYPES[p.suffix])
        if not self._authed():
            return self._refuse(HTTPStatus.UNAUTHORIZED, "open the link `meshrun dashboard` printed (it carries the "
                                                         "session token)")
        try:
            self._route_get(u.path, q)
        except JobNotFound as e:
            self._refuse(HTTPStatus.NOT_FOUND, str(e))
        except MeshrunError as e:
            self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, str(e))
        except Exception as e:  # a page that failed says why, and the server goes on
            self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")

    def _route_get(self, path: str, q: dict[str, str]) -> None:
        app = self.server.app
        m = re.fullmatch(r"/(api/)?job/([0-9a-z]{4,40})(/log)?", path)
        if path == "/":
            return self._html(app.jobs_page(q))
        if path == "/api/jobs":
            return self._json(app.jobs_json(q))
        if m and not m.group(1) and not m.group(3):
            return self._html(app.job_page(m.group(2)))
        if m and m.group(1) and m.group(3):
            off = q.get("offset")
            return self._json(app.log(m.group(2), int(off) if off and off.isdigit() else None))
        if m and m.group(1):
            return self._json(app.job_data(m.group(2)))
        if path == "/gpus":
            return self._html(app.gpus_page())
        if path == "/api/gpus":
            return self._json(app.gpus())
        if path == "/offers":
            return self._html(app.offers_page(q))
        if path == "/bench":
            return self._html(app.bench_page())
        self._refuse(HTTPStatus.NOT_FOUND, f"no page {path}")

    # ---- POST: the actions
    def do_POST(self) -> None:
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _post(self) -> None:
        n = _int(self.headers.get("Content-Length"), 0)
        if n > 1 << 16:  # an action carries no body worth reading: do not keep the rest of a big one around
            self.close_connection = True
        elif n > 0:
            self.rfile.read(n)
        if not self._allowed():
            return
        if not self._authed():
            return self._refuse(HTTPStatus.UNAUTHORIZED, "no session token")
        app = self.server.app
        got = self.headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(got.encode(), app.csrf.encode()):
            return self._refuse(HTTPStatus.FORBIDDEN, "missing or wrong CSRF token")
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            return self._refuse(HTTPStatus.FORBIDDEN, f"cross-origin request from {origin!r}")
        if self.headers.get("Sec-Fetch-Site") not in (None, "same-origin"):
            return self._refuse(HTTPStatus.FORBIDDEN, "cross-site request")
        m = re.fullmatch(r"/api/job/([0-9a-z]{4,40})/(cancel|retry)", urlsplit(self.path).path)
        if not m:
            return self._refuse(HTTPStatus.NOT_FOUND, "no such action")
        act: Callable[[str], dict[str, Any]] = app.cancel if m.group(2) == "cancel" else app.retry
        try:
            self._json(act(m.group(1)))
        except Refused as e:
            self._refuse(e.status, str(e))
        except JobNotFound as e:
            self._refuse(HTTPStatus.NOT_FOUND, str(e))
        except Exception as e:
            self._json({"error": f"{type(e).__name__}: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)


# ---- the command ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshrun dashboard",
        description="Serve a web dashboard of the job store, GPU leases, offers and bench results "
                    "(on 127.0.0.1; docs/dashboard.md).")
    p.add_argument("--port", "-p", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; another one needs --allow-remote and --token)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow listening on an address other machines can reach (needs --token)")
    p.add_argument("--token", default=None,
                   help=f"the session token (default: ${TOKEN_ENV}, else a random one made at start)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.add_argument("--refresh", type=float, default=2.0, metavar="SECONDS",
                   help="how often unfinished jobs' states are asked for (default 2)")
    p.add_argument("--bench", dest="bench_dirs", action="append", default=[], metavar="DIR",
                   help="a `meshrun bench --out` folder (or .jsonl file) to show on the Bench page (repeatable)")
    return p


def serve(host: str, port: int, *, token: str, allow_remote: bool = False, refresh_every: float = 2.0,
          bench_dirs: Sequence[str] = (), store: Store | None = None) -> Server:
    """A started server (``serve_forever`` runs it); checks the address against the token rules."""
    if not _loopback(host) and not allow_remote:
        raise MeshrunError(f"--host {host} is reachable from other machines: pass --allow-remote (and --token) "
                           "to listen there, or use an SSH tunnel to 127.0.0.1")
    if not _loopback(host) and not token:
        raise MeshrunError("listening beyond this machine needs a token: --token or "
                           f"${TOKEN_ENV} (at least 16 characters)")
    if len(token) < 16 or not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
        raise MeshrunError("the dashboard token must be at least 16 characters of letters, digits and . _ ~ -")
    store = store or get_store()
    store.open()
    app = Dashboard(store, token=token, refresh_every=refresh_every, bench_dirs=bench_dirs)
    return Server((host, port), app, remote=not _loopback(host))


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    token = a.token or os.environ.get(TOKEN_ENV) or ""
    if not token and _loopback(a.host):
        token = secrets.token_urlsafe(24)
    try:
        srv = serve(a.host, a.port, token=token, allow_remote=a.allow_remote, refresh_every=a.refresh,
                    bench_dirs=a.bench_dirs)
    except MeshrunError as e:
        print(f"meshrun: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"meshrun: error: cannot listen on {a.host}:{a.port}: {e.strerror}", file=sys.stderr)
        return 2
    shown = a.host if ":" not in a.host else f"[{a.host}]"
    url = f"http://{shown}:{srv.port}/?token={token}"
    print(f"meshrun dashboard: {url}", flush=True)
    srv.app.start_refresher()
    if not a.no_browser and sys.stdout.isatty():
        import webbrowser

        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        srv.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        srv.app.stop()
        srv.server_close()
    return 0
