"""The warm command server (meshrun/_cliclient.py, meshrun/_cliserver.py): `meshrun run`/`offers` and a fresh interpreter's first
`meshrun.run` answered by a forked child of a resident process, exactly as the process itself would have.

Each test runs its own server (its own PYTHONPATH, hence its own socket) and stops it at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshrun.testing import wait_until

REPO = Path(__file__).resolve().parent.parent
HOSTILE = "it's \"q\" $(touch /tmp/pwned-cli-server) `id` \n; rm -rf ~ \\ é"

# a client that reports, beside its exit code, whether it loaded pydantic (a served command never does)
CLIENT = r"""
import sys
from meshrun._cli import main
sys.argv = ["meshrun"] + sys.argv[1:]
rc = main()
sys.stderr.write("\nLOADED-PYDANTIC=%s\n" % ("pydantic" in sys.modules))
sys.exit(rc)
"""


@pytest.fixture
def served(tmp_path, monkeypatch, helpers):
    """This test's server: the environment that reaches it (a PYTHONPATH of its own) and a function that
    starts it and waits until it answers."""
    marker = tmp_path / "path-entry"
    marker.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(marker)] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env["MESHRUN_CLI_SERVER"] = "1"
    env["MESHRUN_BACKEND"] = "local"
    env.pop("PYTHONDONTWRITEBYTECODE", None)

    def path() -> str:
        r = subprocess.run([sys.executable, "-c", "from meshrun._cliclient import server_path; print(server_path())"],
                           env=env, capture_output=True, text=True, check=True)
        return r.stdout.strip()

    sock = path()

    def start() -> int:
        subprocess.run([sys.executable, "-c", "from meshrun._cliclient import start; start()"], env=env, check=True)
        wait_until(lambda: os.path.exists(sock), 60, 0.05, "the command server's socket")
        return server_pid()

    def server_pid() -> int:
        servers = helpers.serving(sock)  # the server, not its spare (a child with the same command line)
        assert len(servers) == 1, servers
        return servers[0]

    class Served:
        pass

    s = Served()
    s.env, s.sock, s.start, s.marker, s.server_pid = env, sock, start, marker, server_pid
    yield s
    try:
        os.unlink(sock)  # the server ends within a second of its socket going
    except OSError:
        pass
    wait_until(lambda: subprocess.run(["pgrep", "-f", f"meshrun._cliserver {sock}"],
                                      capture_output=True).returncode != 0, 30, 0.1, "the server to end")


def client(served, *args, cwd=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLIENT, *args], env=served.env, cwd=cwd, capture_output=True,
                          text=True, timeout=120, **kw)


def test_run_through_the_server_is_the_same_command(served, tmp_path):
    """The served child takes on the caller's argv, environment, working directory, umask and streams: a
    hostile value reaches the job unchanged, the job runs where the caller stood, output and exit code are
    the job's; and the caller never loads pydantic."""
    served.start()
    work = tmp_path / "work dir"
    work.mkdir()
    env = dict(served.env, HOSTILE_VALUE=HOSTILE)
    r = subprocess.run([sys.executable, "-c", CLIENT, "run", "--name", HOSTILE, "--", "/bin/sh", "-c",
                        'printf "%s|" "$HOSTILE_VALUE" "$PWD" "$1"; umask; exit 3', "sh", HOSTILE],
                       env=env, cwd=work, capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: os.umask(0o027))
    assert r.returncode == 3, r.stderr
    assert r.stdout == f"{HOSTILE}|{work}|{HOSTILE}|0027\n", r.stdout
    assert "LOADED-PYDANTIC=False" in r.stderr, r.stderr
    assert not os.path.exists("/tmp/pwned-cli-server")
    jobs = json.loads(subprocess.run([sys.executable, "-m", "meshrun", "ls", "--json"], env=served.env,
                                     capture_output=True, text=True, check=True).stdout)
    assert [j["name"] for j in jobs] == [HOSTILE] and jobs[0]["state"] == "failed", jobs
    doctor = subprocess.run([sys.executable, "-m", "meshrun", "doctor", "--json"], env=served.env,
                            capture_output=True, text=True)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["command server"]["detail"] == f"answers at {served.sock}", checks["command server"]


def test_the_program_hands_a_served_command_over_without_loading_the_cli(served, tmp_path):
    """``python -m meshrun`` (and the installed script, meshrun._cliclient:program): a served command imports
    nothing of the CLI in the caller, gives the job's output and exit code, and the caller ends right after."""
    served.start()
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "meshrun", "run", "--", "/bin/sh", "-c",
                        "echo served; exit 7"], env=served.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 7 and r.stdout == "served\n", r.stderr
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "meshrun._cliclient" in imported and "meshrun._cli" not in imported and "pydantic" not in imported
    off = subprocess.run([sys.executable, "-m", "meshrun", "run", "--", "/bin/sh", "-c", "exit 7"],
                         env=dict(served.env, MESHRUN_CLI_SERVER="0"), capture_output=True, text=True, timeout=120)
    assert off.returncode == 7, off.stderr


def test_without_a_server_the_command_runs_itself_and_starts_one(served):
    """No server: the caller does the work (loading pydantic) and starts one; the next command is served."""
    assert not os.path.exists(served.sock)
    first = client(served, "run", "--", "/bin/echo", "one")
    assert first.returncode == 0 and first.stdout == "one\n", first.stderr
    assert "LOADED-PYDANTIC=True" in first.stderr
    wait_until(lambda: os.path.exists(served.sock), 60, 0.05, "the server the first command started")
    second = client(served, "run", "--", "/bin/echo", "two")
    assert second.returncode == 0 and second.stdout == "two\n", second.stderr
    assert "LOADED-PYDANTIC=False" in second.stderr


def test_offers_and_bad_input_through_the_server(served):
    """Errors come back as the process's own: the message on stderr and exit code 2."""
    served.start()
    ok = client(served, "offers", "--gpus", "0", "--json")
    assert ok.returncode in (0, 1), ok.stdout + ok.stderr  # 1: some backend could not be asked
    assert json.loads(ok.stdout)["chosen"]["backend"] == "local", ok.stdout
    bad = client(served, "run", "--gpus", "-3", "--", "true")
    assert bad.returncode == 2 and "gpus" in bad.stderr and "LOADED-PYDANTIC=False" in bad.stderr, bad.stderr


API = r"""
import json, sys
import meshrun
job = meshrun.run(["/bin/sh", "-c", 'printf "%s" "$V"'], env={"V": sys.argv[1]}, name="api")
served = "pydantic" not in sys.modules
job.wait()
try:
    meshrun.run(["true"], memory="lots")
    err = None
except meshrun.SpecError as e:
    err = [type(e).__name__, e.field, str(e)]
print(json.dumps({"out": job.logs(), "state": job.status().value, "err": err,
                  "served": served, "job_type": type(job).__name__}))
"""


def test_a_fresh_interpreters_first_submit_is_served(served):
    """`meshrun.run` from a fresh interpreter goes to the server with plain values, returns a real Job, and a
    spec error comes back as the same exception (type and field) the process would have raised."""
    served.start()
    r = subprocess.run([sys.executable, "-c", API, HOSTILE], env=served.env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["out"] == HOSTILE and got["state"] == "succeeded", got
    assert got["job_type"] == "Job"
    assert got["err"][0] == "SpecError" and got["err"][1] == "memory", got
    assert got["served"] is True, "the first submit was not served"


def test_ctrl_c_reaches_the_command_and_a_killed_caller_leaves_nothing(served, helpers):
    """Ctrl-C on the caller is passed to the command (which detaches from the job, as it does unserved); a
    caller killed outright takes its command with it, as a hung-up terminal would."""
    server = served.start()
    p = subprocess.Popen([sys.executable, "-c", CLIENT, "run", "--", "sleep", "300"], env=served.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def children() -> list[int]:  # the server's children that serve a command (not its spare)
        return [p for p in helpers.children(server) if helpers.comm(p) != "meshrun-spare"]

    wait_until(lambda: children(), 60, 0.05, "the served command")
    time.sleep(1.0)  # the job is submitted and followed
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert "detached" in err and "keeps running" in err, err
    job_id = err.split("meshrun cancel ")[1].split(" ")[0].rstrip(")\n")
    subprocess.run([sys.executable, "-m", "meshrun", "cancel", job_id], env=served.env, check=True,
                   capture_output=True)
    wait_until(lambda: not children(), 30, 0.05, "the served command to end")

    p = subprocess.Popen([sys.executable, "-c", CLIENT, "run", "--", "sleep", "300"], env=served.env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: children(), 60, 0.05, "the served command")
    p.kill()
    p.wait()
    wait_until(lambda: not children(), 30, 0.05, "the command of the killed caller to end")


def test_a_spare_forked_ahead_becomes_the_command_and_ends_with_the_server(served, helpers):
    """The server keeps one child forked ahead (named meshrun-spare in ps), which becomes the next command; a
    fresh spare follows; when the server ends, so does its spare (no orphan is left)."""
    server = served.start()
    warm = client(served, "run", "--", "true")  # the first command teaches the server its imports (a new spare)
    assert warm.returncode == 0, warm.stderr

    def spare() -> int | None:
        spares = helpers.children(server, "meshrun-spare")
        assert len(spares) <= 1, spares
        return spares[0] if spares else None

    first = wait_until(spare, 30, 0.02, "the server's spare")
    p = subprocess.Popen([sys.executable, "-c", CLIENT, "run", "--", "sleep", "300"], env=served.env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: helpers.comm(first) not in ("meshrun-spare", ""), 30, 0.02,
                   "the spare to take the command")
        assert first in helpers.children(server)
        second = wait_until(spare, 30, 0.02, "the next spare")
        assert second != first
    finally:
        p.kill()
        p.wait()
    wait_until(lambda: not helpers.proc_alive(first), 30, 0.05, "the command of the killed caller to end")
    os.unlink(served.sock)  # the server ends within a second of its socket going, and its spare with it
    wait_until(lambda: not helpers.proc_alive(second) and not helpers.proc_alive(server), 30, 0.05,
               "the server and its spare to end")


def test_a_server_steps_aside_when_what_it_imported_changed(served):
    """An install (a directory on its sys.path changes) makes the server stale: the next command runs in
    its own process, the stale server ends, and a fresh one takes over."""
    old = served.start()
    (served.marker / "newly_installed.py").write_text("")
    r = client(served, "run", "--", "/bin/echo", "after")
    assert r.returncode == 0 and r.stdout == "after\n", r.stderr
    assert "LOADED-PYDANTIC=True" in r.stderr  # it ran itself
    wait_until(lambda: subprocess.run(["kill", "-0", str(old)], capture_output=True).returncode != 0, 30, 0.1,
               "the stale server to end")
    wait_until(lambda: os.path.exists(served.sock), 60, 0.05, "a fresh server")
    assert served.server_pid() != old


def test_messages_that_share_a_read_each_come_whole():
    """The protocol's frames: two messages sent at once (a fast command's hello and its exit code) are read
    as two, in order; a torn or oversized message is refused, not misread."""
    import socket

    from meshrun._cliclient import Frames, frame, unframe

    a, b = socket.socketpair()
    try:
        a.sendall(frame({"pid": 12}) + frame({"exit": 2, "error": HOSTILE}))
        a.close()
        frames = Frames(b)
        assert frames.next() == {"pid": 12}
        assert frames.next() == {"exit": 2, "error": HOSTILE}
        assert frames.next() is None  # closed
    finally:
        b.close()
    assert unframe(frame({"x": 1})[:-1]) == (None, 0)  # not all there yet
    with pytest.raises(ValueError):
        unframe((100).to_bytes(4, "big") + b"x" * 100, limit=10)
    with pytest.raises(ValueError):
        unframe((3).to_bytes(4, "big") + b"\x00\x01\x02")


LIMITS = "ulimit -Sn; ulimit -Hn"


def test_the_callers_resource_limits_hold_and_a_server_below_them_steps_aside(served):
    """A served command runs with its caller's resource limits (``ulimit -n`` before ``meshrun run``), as it
    would have run in the caller. A hard limit above the server's is one only a process with CAP_SYS_RESOURCE
    may raise: such a caller is still served with it; any other runs the command itself, and the server
    steps aside (the next one is started with the caller's limits). tests/hostile/test_client.py plays an
    unprivileged user."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(hard, 4096) // 2

    def limited(s: int, h: int):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (s, h))

    subprocess.run([sys.executable, "-c", "from meshrun._cliclient import start; start()"], env=served.env,
                   check=True, preexec_fn=limited(low // 2, low))
    wait_until(lambda: os.path.exists(served.sock), 60, 0.05, "the command server's socket")
    old = served.server_pid()
    r = subprocess.run([sys.executable, "-c", CLIENT, "run", "--", "/bin/sh", "-c", LIMITS], env=served.env,
                       capture_output=True, text=True, timeout=120, preexec_fn=limited(low // 4, low))
    assert r.returncode == 0 and r.stdout.split() == [str(low // 4), str(low)], r.stdout + r.stderr
    assert "LOADED-PYDANTIC=False" in r.stderr  # served, with the caller's soft limit
    r = subprocess.run([sys.executable, "-c", CLIENT, "run", "--", "/bin/sh", "-c", LIMITS], env=served.env,
                       capture_output=True, text=True, timeout=120, preexec_fn=limited(low // 4, low + 1))
    assert r.returncode == 0 and r.stdout.split() == [str(low // 4), str(low + 1)], r.stdout + r.stderr
    from meshrun._agent import _may_raise_hard_limits

    if _may_raise_hard_limits():
        assert "LOADED-PYDANTIC=False" in r.stderr and served.server_pid() == old  # it may raise it
    else:
        assert "LOADED-PYDANTIC=True" in r.stderr  # ran itself: the server could not have given it that
        wait_until(lambda: subprocess.run(["kill", "-0", str(old)], capture_output=True).returncode != 0, 30,
                   0.1, "the server below the caller's limits to end")


def test_limits_out_of_reach_are_named(monkeypatch):
    """What makes a warm server step aside: a hard limit above its own, for a server that may not raise it."""
    import resource

    from meshrun._agent import limits_out_of_reach

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    from meshrun import _agent

    monkeypatch.setattr(_agent, "_may_raise_hard_limits", lambda: False)
    assert limits_out_of_reach({"RLIMIT_NOFILE": [soft, hard]}) is None
    assert limits_out_of_reach({"RLIMIT_NOFILE": [1, 1], "RLIMIT_NOPE": [1, 2]}) is None
    assert limits_out_of_reach(None) is None
    if hard != resource.RLIM_INFINITY:
        why = limits_out_of_reach({"RLIMIT_NOFILE": [soft, hard + 1]})
        assert why == f"the submitter's hard RLIMIT_NOFILE ({hard + 1}) is above this server's ({hard})", why
        assert "above" in limits_out_of_reach({"RLIMIT_NOFILE": [soft, resource.RLIM_INFINITY]})
    monkeypatch.setattr(_agent, "_may_raise_hard_limits", lambda: True)
    assert limits_out_of_reach({"RLIMIT_NOFILE": [soft, resource.RLIM_INFINITY]}) is None
