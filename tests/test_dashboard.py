"""``meshrun dashboard`` end to end: the real server (``meshrun dashboard`` in its own process) over a real job
store with real local jobs, driven by a real browser (Playwright with Debian's chromium) and by plain HTTP
requests for the refusals. One browser for the whole module; each test opens its own page."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from meshrun.testing import wait_until

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MESHRUN_CHROMIUM", "/usr/bin/chromium")
TOKEN = "test-token-0123456789abcdef"
HOSTILE = ('<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>'
           '\x1b[31mred\x1b[0m\x1b]0;title\x07 $(touch /tmp/pwned) "quoted"')


class Dash:
    def __init__(self, home: Path, env: dict[str, str], proc: subprocess.Popen[str], port: int):
        self.home, self.env, self.proc, self.port = home, env, proc, port
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, *, cookie: bool = True, headers: dict[str, str] | None = None,
                body: str | None = None) -> tuple[int, dict[str, str], str]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = {"Host": f"127.0.0.1:{self.port}"}
        if cookie:
            h["Cookie"] = f"meshrun_dashboard_{self.port}={TOKEN}"
        h.update(headers or {})
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        out = r.status, dict(r.getheaders()), r.read().decode()
        c.close()
        return out

    def csrf(self) -> str:
        status, _, text = self.request("GET", "/gpus")
        assert status == 200
        return text.split('name="csrf" content="', 1)[1].split('"', 1)[0]


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    """``meshrun dashboard`` over a job store of its own (one declared GPU, so a second GPU job queues)."""
    root = tmp_path_factory.mktemp("dashboard")
    (root / "config.toml").write_text("")
    env = dict(os.environ, MESHRUN_HOME=str(root / "home"), MESHRUN_LEASE_DIR=str(root / "leases"),
               MESHRUN_CONFIG=str(root / "config.toml"), MESHRUN_GPUS="0")
    env.pop("MESHRUN_BACKEND", None)
    proc = subprocess.Popen([sys.executable, "-m", "meshrun", "dashboard", "--port", "0", "--no-browser",
                             "--token", TOKEN, "--refresh", "0.3",
                             "--bench", str(REPO / "benchmarks/results/bench_allreduce_h200x2.jsonl")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "meshrun dashboard: http://127.0.0.1:" in line, line
    port = int(line.split("127.0.0.1:", 1)[1].split("/", 1)[0])
    yield Dash(root / "home", env, proc, port)
    proc.terminate()
    proc.wait(10)
    from meshrun import _agent

    for d in (root / "home" / "jobs").iterdir():  # what a failed test left running
        if (d / "state.json").exists() and not (d / "exit.json").exists():
            _agent.cancel(str(d), grace=1)


@pytest.fixture
def store_env(dash: Dash, monkeypatch: pytest.MonkeyPatch) -> Dash:
    """This test submits into the dashboard's store."""
    from meshrun import _config, _registry, _store

    for k in ("MESHRUN_HOME", "MESHRUN_LEASE_DIR", "MESHRUN_CONFIG", "MESHRUN_GPUS"):
        monkeypatch.setenv(k, dash.env[k])
    _registry.reset()
    _config._current = None
    with _store._stores_lock:
        _store._stores.clear()
    return dash


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (scripts/install.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, dash: Dash) -> Iterator[Any]:
    ctx = browser.new_context()
    p = ctx.new_page()
    p.set_default_timeout(30_000)
    p.goto(f"{dash.base}/?token={TOKEN}")  # the link the command prints: the token goes into a cookie
    assert "token=" not in p.url
    yield p
    ctx.close()


def _run(*args: Any, **kw: Any) -> Any:
    import meshrun

    return meshrun.run(*args, backend="local", **kw)


def _row(job_id: str) -> str:
    return f'#jobs tr:has(a[href="/job/{job_id}"])'


def test_pages_render(dash: Dash, store_env: Dash, page: Any) -> None:
    import meshrun

    job = meshrun.run(["true"], name="render-me")  # placed: its page shows the plan
    job.wait(60)
    page.goto(f"{dash.base}/")
    page.wait_for_selector(_row(job.id) + " .s-succeeded")
    assert page.locator("h1").inner_text() == "Jobs"
    page.goto(f"{dash.base}/job/{job.id}")
    assert "render-me" in page.locator("h1").inner_text()
    assert page.locator("table.plan").count() == 1  # the plan, with the offers placement rejected
    assert page.locator("table.rejected tbody tr").count() >= 1
    assert page.locator("#history tr").count() >= 3
    page.goto(f"{dash.base}/gpus")
    assert "declared" in page.locator("table.gpus").inner_text()
    page.goto(f"{dash.base}/offers?gpus=1")
    assert page.locator("h1").inner_text() == "Offers"
    assert page.locator("table.offers, table.rejected").count() >= 1
    page.goto(f"{dash.base}/bench")
    assert page.locator("svg.plot polyline").count() >= 2  # meshrun's busbw and nccl-tests' beside it
    assert "nccl-tests" in (page.locator("svg.plot").first.text_content() or "")


def test_jobs_list_follows_a_job_queued_running_succeeded_without_reload(dash: Dash, store_env: Dash, page: Any,
                                                                         tmp_path: Path) -> None:
    hold, go = tmp_path / "hold-go", tmp_path / "go"
    wait_for = "while [ ! -e {0} ]; do sleep 0.05; done"
    page.goto(f"{dash.base}/?name=live-")
    page.evaluate("window.__same_page = 1")
    holder = _run(wait_for.format(hold), gpus=1, name="live-holder")  # holds the one GPU
    wait_until(lambda: holder.status().value == "running", 30, what="the holder to run")
    job = _run(wait_for.format(go), gpus=1, name="live-job")  # queued behind it
    page.wait_for_selector(_row(job.id) + " .s-pending")
    hold.touch()
    page.wait_for_selector(_row(job.id) + " .s-running")
    go.touch()
    page.wait_for_selector(_row(job.id) + " .s-succeeded")
    page.wait_for_selector(_row(holder.id) + " .s-succeeded")
    assert page.evaluate("window.__same_page") == 1  # updated in place, never reloaded


def test_cancel_in_the_browser_stops_a_real_job(dash: Dash, store_env: Dash, page: Any, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    job = _run(f"echo $$ > {pidfile}; echo started; exec sleep 300", name="to-cancel")
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, what="the job's pid"))
    page.goto(f"{dash.base}/job/{job.id}")
    page.wait_for_selector("#state .s-running")
    page.wait_for_selector("#log:has-text('started')")
    page.click("#cancel")
    page.wait_for_selector("#state .s-cancelled")

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, 15, what="the job's process to end")
    assert job.status().value == "cancelled"
    assert page.locator("#cancel").is_disabled()
    # retry: the same spec again, as a new job whose page opens
    pidfile.unlink()
    page.click("#retry")
    page.wait_for_url(lambda url: "/job/" in url and job.id not in url)
    again = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#state .s-running")
    assert again != job.id and "to-cancel" in page.locator("h1").inner_text()
    page.click("#cancel")
    page.wait_for_selector("#state .s-cancelled")


def test_hostile_name_env_and_output_render_inert(dash: Dash, store_env: Dash, page: Any) -> None:
    script = "printf '%s\\n' \"$EVIL\"; printf '\\033[2J\\033]0;x\\007plain\\n'"
    job = _run(script, name=HOSTILE, env={"EVIL": HOSTILE})
    job.wait(60)
    page.goto(f"{dash.base}/?name=onerror")
    page.wait_for_selector(_row(job.id))
    page.wait_for_timeout(1200)  # a live update has replaced the rows at least once
    page.goto(f"{dash.base}/job/{job.id}")
    page.wait_for_selector("#log:has-text('plain')")
    assert page.evaluate("window.__pwned") is None  # nothing of it ran
    assert page.locator("main img, main script").count() == 0
    title = page.locator("h1").inner_text()
    assert '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>' in title  # shown as text
    assert "\x1b" not in title and "red" in title
    log = page.locator("#log").text_content()
    assert "<script>window.__pwned=1</script>" in log and "\x1b" not in log and "\x07" not in log
    assert "$(touch /tmp/pwned)" in page.locator("pre").last.text_content()  # the spec's env, as given


def test_refusals_without_token_or_csrf_or_from_elsewhere(dash: Dash, store_env: Dash, tmp_path: Path) -> None:
    assert dash.request("GET", "/", cookie=False)[0] == 401
    assert dash.request("GET", "/api/jobs", cookie=False)[0] == 401
    assert dash.request("GET", "/?token=wrong-token-0123456789", cookie=False)[0] == 401
    status, headers, _ = dash.request("GET", f"/?token={TOKEN}", cookie=False)
    assert status == 303 and "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    status, headers, _ = dash.request("GET", "/")
    assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"]
    # DNS rebinding: a page of another site that resolves to 127.0.0.1 sends its own Host
    assert dash.request("GET", "/", headers={"Host": "evil.example:80"})[0] == 403

    job = _run("exec sleep 300", name="not-by-forgery")
    wait_until(lambda: job.status().value == "running", 30, what="the job to run")
    csrf = dash.csrf()
    cancel = f"/api/job/{job.id}/cancel"
    assert dash.request("POST", cancel, body="{}")[0] == 403  # no CSRF token
    assert dash.request("POST", cancel, headers={"X-CSRF-Token": "0" * 64}, body="{}")[0] == 403
    assert dash.request("POST", cancel, cookie=False, headers={"X-CSRF-Token": csrf}, body="{}")[0] == 401
    assert dash.request("POST", cancel, headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
                        body="{}")[0] == 403
    assert dash.request("POST", cancel, headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"},
                        body="{}")[0] == 403
    # a job recorded for another user is not acted on, however well-formed the request
    from meshrun._store import get_store

    get_store().update(job.id, user="someone-else")
    status, _, text = dash.request("POST", cancel, headers={"X-CSRF-Token": csrf}, body="{}")
    assert status == 403 and "acts only for" in json.loads(text)["error"]
    assert job.status().value == "running"
    from meshrun._dashboard import _user

    get_store().update(job.id, user=_user())
    status, _, text = dash.request("POST", cancel, headers={"X-CSRF-Token": csrf}, body="{}")
    assert status == 200 and json.loads(text)["state"] == "cancelled"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root to connect as another user")
def test_another_os_user_is_refused_even_with_the_token(dash: Dash) -> None:
    code = ("import http.client,sys; c=http.client.HTTPConnection('127.0.0.1', int(sys.argv[1]));"
            "c.request('GET', '/', headers={'Cookie': sys.argv[2]}); r=c.getresponse(); print(r.status, r.read().decode())")
    out = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", code, str(dash.port),
                          f"meshrun_dashboard_{dash.port}={TOKEN}"], capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("403 ") and "serves only the OS user" in out.stdout, out


def test_listening_beyond_this_machine_needs_a_flag_and_a_token() -> None:
    from meshrun._dashboard import serve
    from meshrun._errors import MeshrunError

    with pytest.raises(MeshrunError, match="--allow-remote"):
        serve("0.0.0.0", 0, token=TOKEN)
    with pytest.raises(MeshrunError, match="needs a token"):
        serve("0.0.0.0", 0, token="", allow_remote=True)
    out = subprocess.run([sys.executable, "-m", "meshrun", "dashboard", "--host", "0.0.0.0", "--port", "0",
                          "--no-browser"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--allow-remote" in out.stderr
    srv = serve("0.0.0.0", 0, token=TOKEN, allow_remote=True)  # with both it listens
    srv.server_close()


def test_the_dashboard_is_not_imported_by_meshrun_or_its_other_commands() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, meshrun, meshrun._cli; meshrun._cli.build_parser(); "
                          "print(sorted(m for m in sys.modules if 'dashboard' in m or m.startswith('http.server')))"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_clean_strips_terminal_escapes() -> None:
    from meshrun._dashboard import clean, esc

    assert clean("a\x1b[31mb\x1b[0m\x1b]8;;http://x\x07c\x1b]0;t\x1b\\d\x9b2Je\x07\x00f\u202eg") == "abcdefg"
    assert clean("10%\r50%\r100%\nnext") == "100%\nnext"
    assert esc('<b a="1">') == "&lt;b a=&quot;1&quot;&gt;"


def test_search_pages_and_filters(meshrun_home: Path) -> None:
    from meshrun._backend import JobState
    from meshrun._store import get_store

    store = get_store()
    ids = []
    for i in range(7):
        r = store.create(name=f"job-{i}" if i % 2 else f"other-{i}", kind="command", summary="", backend="local",
                         array_id="sw1" if i < 3 else None, array_index=i if i < 3 else None)
        store.update(r.id, state=JobState.FAILED if i == 6 else JobState.SUCCEEDED, created_at=1000.0 + i)
        ids.append(r.id)
    recs, total = store.search(limit=3)
    assert total == 7 and [r.id for r in recs] == ids[::-1][:3]  # newest first
    recs, total = store.search(limit=3, offset=6)
    assert total == 7 and [r.id for r in recs] == [ids[0]]
    assert store.search(limit=3, offset=9) == ([], 7)
    assert {r.id for r in store.search(name="job-")[0]} == {ids[1], ids[3], ids[5]}
    assert store.search(name="%")[1] == 0  # a substring, not a pattern
    assert [r.id for r in store.search(states=[JobState.FAILED])[0]] == [ids[6]]
    assert store.search(array_id="sw1", limit=2)[1] == 3
    assert store.search(user="nobody-here")[1] == 0 and store.search(backend="local")[1] == 7
    assert store.distinct("state") == ["failed", "succeeded"]
