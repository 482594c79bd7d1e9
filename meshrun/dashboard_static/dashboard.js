// meshrun dashboard: live updates by polling the JSON endpoints. Every value is put in the page as text
// (textContent), never as HTML.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf"]').content;
  const pad = (n) => String(n).padStart(2, "0");
  function when(t) {
    if (!t) return null;
    const d = new Date(t * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function el(tag, text, attrs) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  function timeEl(t) {
    if (!t) return document.createTextNode("-");
    return el("time", when(t), { "data-t": String(t) });
  }
  function stateEl(s) { return el("span", s, { class: "state s-" + s }); }
  function td(child) {
    const c = document.createElement("td");
    c.append(typeof child === "string" ? document.createTextNode(child) : child);
    return c;
  }
  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) throw new Error(url + ": " + r.status);
    return r.json();
  }
  function every(ms, fn) {
    let busy = false;
    const tick = async () => {
      if (busy || document.hidden) return;
      busy = true;
      try { await fn(); } catch (e) { /* the server may be restarting: try again next tick */ } finally { busy = false; }
    };
    return setInterval(tick, ms);
  }

  // ---- jobs list
  const live = document.getElementById("live");
  if (live) {
    const body = document.getElementById("jobs");
    every(1000, async () => {
      const data = await getJSON(live.dataset.api);
      const rows = data.jobs.map((j) => {
        const tr = document.createElement("tr");
        const a = el("a", j.id, { href: "/job/" + encodeURIComponent(j.id) });
        let sweep = "-";
        if (j.sweep) {
          sweep = document.createElement("span");
          sweep.append(el("a", j.sweep, { href: "/?sweep=" + encodeURIComponent(j.sweep) }));
          if (j.index !== null) sweep.append(document.createTextNode("[" + j.index + "]"));
        }
        tr.append(td(a), td(j.name), td(stateEl(j.state)), td(j.backend || "-"), td(j.where || "-"),
                  td(j.user || "-"), td(sweep), td(timeEl(j.created_at)), td(j.runtime));
        return tr;
      });
      body.replaceChildren(...rows);
      const total = document.getElementById("total");
      if (total) total.textContent = String(data.total);
      const empty = document.getElementById("empty");
      if (empty && rows.length) empty.remove();
    });
  }

  // ---- one job
  const liveJob = document.getElementById("live-job");
  if (liveJob) {
    const id = liveJob.dataset.job;
    const log = document.getElementById("log");
    const follow = document.getElementById("follow");
    let offset = null;
    let ended = false;
    const set = (elid, node) => { const e = document.getElementById(elid); if (e) e.replaceChildren(node); };
    const job = every(1000, async () => {
      const d = await getJSON("/api/job/" + encodeURIComponent(id));
      set("state", stateEl(d.state));
      set("reason", document.createTextNode(d.reason || ""));
      set("where", document.createTextNode(d.where || "-"));
      set("started", timeEl(d.started_at));
      set("ended", timeEl(d.ended_at));
      set("runtime", document.createTextNode(d.runtime));
      set("exit", document.createTextNode(d.exit_code === null ? "-" : d.exit_code));
      set("cost", document.createTextNode(d.cost_so_far));
      set("cost-est", document.createTextNode(d.cost_estimated));
      document.getElementById("cancel").disabled = !d.can_cancel;
      document.getElementById("retry").disabled = !d.can_retry;
      const hist = document.getElementById("history");
      hist.replaceChildren(...d.history.map(([t, ev, detail]) => {
        const tr = document.createElement("tr");
        tr.append(td(timeEl(t)), td(ev), td(detail));
        return tr;
      }));
      if (d.terminal && !ended) {
        ended = true;
        // the outcome section is rendered by the server: fetch it once the job has ended
        const r = await fetch(location.pathname, { credentials: "same-origin", cache: "no-store" });
        const doc = new DOMParser().parseFromString(await r.text(), "text/html");
        const fresh = doc.getElementById("outcome");
        if (fresh) document.getElementById("outcome").replaceChildren(...fresh.childNodes);
      }
    });
    const logTimer = every(1000, async () => {
      const url = "/api/job/" + encodeURIComponent(id) + "/log" + (offset === null ? "" : "?offset=" + offset);
      const d = await getJSON(url);
      if (d.replace) log.textContent = d.text; else if (d.text) log.append(document.createTextNode(d.text));
      if (d.offset !== null) offset = d.offset;
      if (log.textContent.length > 2000000) log.textContent = log.textContent.slice(-1000000);
      if (follow.checked) log.scrollTop = log.scrollHeight;
      if (d.terminal && !d.text && ended) clearInterval(logTimer);
    });
    async function act(what) {
      const msg = document.getElementById("action-msg");
      msg.textContent = what + "...";
      const r = await fetch("/api/job/" + encodeURIComponent(id) + "/" + what, {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf, "Content-Type": "application/json" },
        body: "{}",
      });
      const d = await r.json().catch(() => ({ error: String(r.status) }));
      if (!r.ok) { msg.textContent = what + " refused: " + (d.error || r.status); return; }
      if (d.job) { location.href = "/job/" + encodeURIComponent(d.job); return; }
      msg.textContent = what + ": " + (d.state || "done");
    }
    document.getElementById("cancel").addEventListener("click", () => act("cancel"));
    document.getElementById("retry").addEventListener("click", () => act("retry"));
    void job;
  }

  // ---- GPUs: the page reloads itself (leases change rarely, and the server caches the snapshot)
  const gpus = document.getElementById("gpus");
  if (gpus) {
    every(Number(gpus.dataset.reload || 5) * 1000, async () => {
      const r = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      const fresh = doc.getElementById("gpus");
      if (fresh) gpus.replaceChildren(...fresh.childNodes);
    });
  }
})();
