"""One user's side of the client's privacy rules (tests/hostile/test_client.py replays the attacks as two
users): where fork-server sockets live, what is refused, how the store is tightened, what terminal output
shows, and that a job through the warm fork server carries its submitter's umask."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import meshrun
from meshrun import _local
from meshrun._display import print_kv, print_table, safe_text


@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


def test_safe_text_shows_controls_and_keeps_unicode(capsys):
    evil = "a\x1b]52;c;ZXZpbA==\x07b\x1b[2J\r\x9b31m\u202eevil\u2066 ünïcødé ✓ 日本 👩‍💻"
    shown = safe_text(evil)
    assert shown == ("a\\x1b]52;c;ZXZpbA==\\x07b\\x1b[2J\\x0d\\x9b31m\\u202eevil\\u2066 ünïcødé ✓ 日本 👩‍💻")
    assert safe_text("two\nlines", newlines=True) == "two\nlines" and safe_text("two\nlines") == "two\\x0alines"
    print_table(["NAME", "USER"], [[evil, "bob\x1b[31m"]], title="t\x07")
    print_kv([("name", evil), ("what", "line1\nline2\x1b[K")])
    out = capsys.readouterr().out
    for ch in ("\x1b", "\x07", "\x9b", "\r", "\u202e", "\u2066"):
        assert ch not in out
    assert "日本 👩‍💻" in out and "line2\\x1b[K" in out


def _private(path: Path, mode: int = 0o700) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    return path


def test_sockets_live_in_a_private_xdg_runtime_dir(tmp_path, monkeypatch, helpers):
    xdg = _private(tmp_path / "run")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    path = _local.fork_server_path(meshrun.get_config().home)
    assert path is not None and Path(path).parent == xdg / "meshrun"
    assert stat.S_IMODE((xdg / "meshrun").stat().st_mode) == 0o700
    assert meshrun.run(["true"]).result(timeout=60) == 0
    helpers.wait_until(lambda: os.path.exists(path), what="the fork server's socket")
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077 == 0
    assert not list(meshrun.get_config().home.glob("*.sock"))  # never in MESHRUN_HOME


def test_old_import_lists_of_fork_servers_are_pruned_when_a_server_starts(tmp_path, monkeypatch, helpers):
    """Each MESHRUN_HOME and agent version leaves its fork server's import list beside the socket; one unused
    for two weeks goes when a server starts; a recent one, another file, and a link stay."""
    import time

    xdg = _private(tmp_path / "run")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    d = xdg / "meshrun"
    d.mkdir(mode=0o700)
    old, recent, other = d / "agent-0000000001.sock.warm.json", d / "agent-0000000002.sock.warm.json", d / "notes"
    for p in (old, recent, other):
        p.write_text("{}")
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    link = d / "agent-0000000003.sock.warm.json"
    link.symlink_to(target)
    weeks_ago = time.time() - 15 * 86400
    for p in (old, other):
        os.utime(p, (weeks_ago, weeks_ago))
    os.utime(link, (weeks_ago, weeks_ago), follow_symlinks=False)
    assert meshrun.run(["true"]).result(timeout=60) == 0  # starts this home's fork server
    helpers.wait_until(lambda: not old.exists(), what="the old import list to go")
    assert recent.exists() and other.exists() and link.is_symlink() and target.exists()


def test_a_loose_xdg_runtime_dir_is_passed_over(tmp_path, monkeypatch):
    xdg = _private(tmp_path / "run", 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    path = _local.fork_server_path(meshrun.get_config().home, warn=False)
    assert path is not None and Path(path).parent == Path(f"/tmp/meshrun-{os.getuid()}")
    assert stat.S_IMODE(xdg.stat().st_mode) == 0o755 and not (xdg / "meshrun").exists()


def test_a_loose_socket_dir_is_refused_with_the_fix_and_left_alone(tmp_path, monkeypatch, capfd):
    xdg = _private(tmp_path / "run")
    loose = _private(xdg / "meshrun", 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    job = meshrun.run(["echo", "started directly"])
    assert job.result(timeout=60) == 0 and "started directly" in job.logs()
    err = capfd.readouterr().err
    assert f"{loose} has mode 0755" in err and f"chmod 700 {loose}" in err
    assert stat.S_IMODE(loose.stat().st_mode) == 0o755 and list(loose.iterdir()) == []


def test_a_loose_home_and_index_of_ours_are_tightened(tmp_path, monkeypatch):
    home = _private(tmp_path / "loose-home", 0o777)
    (home / "jobs.db").touch()
    os.chmod(home / "jobs.db", 0o644)  # as an earlier meshrun (or SQLite's default) left it
    monkeypatch.setenv("MESHRUN_HOME", str(home))
    code = "import meshrun; print(meshrun.run(['echo', '--api-key=x']).result(timeout=60))"
    env = {**os.environ, "MESHRUN_HOME": str(home)}
    for i in range(2):
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert (f"{home} was open to other users (mode 0777); made it 0700" in p.stderr) == (i == 0), p.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [home, home / "jobs", home / "jobs.db"]}
    assert modes == {"loose-home": 0o700, "jobs": 0o700, "jobs.db": 0o600}
    for d in (home / "jobs").iterdir():
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        for f in d.iterdir():
            assert stat.S_IMODE(f.lstat().st_mode) & 0o077 == 0, f


def test_umask_of_each_submitter_through_the_warm_server(tmp_path, helpers):
    """The warm server is started by a submit with umask 027; a later one with 077 and one with 002 each see
    their own (a fresh process per submit, as from a shell), through that one server."""
    probe = "umask; awk '/^PPid/ {print $2}' /proc/$PPID/status"  # and the supervisor's parent
    code = ("import os, sys, meshrun; os.umask(int(sys.argv[1], 8));"
            "j = meshrun.run(['/bin/sh', '-c', sys.argv[2]]); j.result(timeout=60); print(j.logs().strip())")
    path = _local.fork_server_path(meshrun.get_config().home, warn=False)
    seen, parents = {}, set()
    for mask in ("027", "077", "002"):
        p = subprocess.run([sys.executable, "-c", code, mask, probe], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        umask, parent = p.stdout.split()
        seen[mask] = umask
        if mask == "027":
            helpers.wait_until(lambda: os.path.exists(path), what="the fork server")
            continue
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline and path.encode() in cmdline, cmdline
        parents.add(parent)
    assert seen == {"027": "0027", "077": "0077", "002": "0002"}
    assert len(parents) == 1


def test_the_fork_servers_spare_becomes_the_next_jobs_supervisor_as_that_submitter(helpers):
    """The warm fork server keeps a child forked ahead (meshrun-nextjob in ps), which becomes the next job's
    supervisor with that submitter's environment, umask and resource limits, as a child forked for the job
    would; a fresh spare follows, and when the server ends its spare ends too."""
    meshrun.run(["true"]).result(timeout=60)  # starts the fork server
    path = _local.fork_server_path(meshrun.get_config().home, warn=False)
    helpers.wait_until(lambda: os.path.exists(path), what="the fork server")

    srv, = helpers.wait_until(lambda: helpers.serving(path), what="the fork server's process")

    def spare() -> int | None:
        found = helpers.children(srv, "meshrun-nextjob")
        assert len(found) <= 1, found
        return found[0] if found else None

    first = helpers.wait_until(spare, what="the fork server's spare")
    probe = 'echo "$PPID $(umask) $(ulimit -Sn) $MR_PROBE"'
    code = ("import os, resource, sys, meshrun; os.umask(0o077);"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (321, resource.getrlimit(resource.RLIMIT_NOFILE)[1]));"
            "j = meshrun.run(['/bin/sh', '-c', sys.argv[1]]); j.result(timeout=60); print(j.logs().strip())")
    p = subprocess.run([sys.executable, "-c", code, probe], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, MR_PROBE="it's $(id) \"q\""))
    assert p.returncode == 0, p.stderr
    supervisor, umask, nofile, value = p.stdout.split(" ", 3)
    assert int(supervisor) == first  # the spare became the supervisor ...
    assert (umask, nofile, value.strip()) == ("0077", "321", "it's $(id) \"q\"")  # ... as this submitter
    second = helpers.wait_until(spare, what="the next spare")
    assert second != first
    os.kill(second, signal.SIGKILL)  # a spare killed while it waits: the next job is forked, and a spare follows
    helpers.wait_until(lambda: not helpers.proc_alive(second), what="the killed spare to go")
    assert meshrun.run(["true"]).result(timeout=60) == 0
    third = helpers.wait_until(lambda: (lambda p: p if p not in (None, second) else None)(spare(), ),
                               what="a spare after the killed one")
    os.unlink(path)  # the server ends within a second of its socket going, and its spare with it
    helpers.wait_until(lambda: not helpers.proc_alive(srv) and not helpers.proc_alive(third), timeout=30,
                       what="the fork server and its spare to end")
