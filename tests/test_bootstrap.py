"""meshrun/_bootstrap.py, the verified boot and install program backends send as ``python3 -c``: run here as
the remote host runs it (a fresh interpreter given the file's text), and its checks called as functions."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import meshrun.backend as mb
from meshrun import _bootstrap


def run(*args: str, stdin: bytes = b"", cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", mb.boot_program(), *args], input=stdin, capture_output=True,
                          cwd=cwd, timeout=60)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def progs(tmp_path: Path) -> Path:
    d = tmp_path / "progs"
    d.mkdir(mode=0o700)
    return d


def write(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    path.chmod(mode)
    return sha(data)


def test_the_program_sent_is_the_module_file():
    assert mb.boot_program() == Path(_bootstrap.__file__).read_text()
    from meshrun_ssh import boot_argv

    argv = boot_argv("python3", ("/x/agent.py", "0" * 64), ["run", "dir"], modules=[("helper", "/x/h.py", "1" * 64)])
    assert argv[:3] == ["python3", "-c", mb.boot_program()]
    assert argv[3:] == ["-m", "helper", "/x/h.py", "1" * 64, "/x/agent.py", "0" * 64, "run", "dir"]


def test_importing_it_changes_nothing():
    before = list(sys.path)
    import importlib

    importlib.reload(_bootstrap)
    assert sys.path == before


def test_boot_runs_the_checked_bytes_with_their_args_and_modules(progs: Path, tmp_path: Path):
    helper = write(progs / "helper-1.py", b"GREETING = 'hello'\n")
    main = write(progs / "main-1.py", b"import sys, helper\nprint(helper.GREETING, sys.argv[1:], __file__)\n")
    # a planted module in the working directory is never imported in its place
    (tmp_path / "hashlib.py").write_text("raise SystemExit('planted module imported')\n")
    p = run("-m", "helper", str(progs / "helper-1.py"), helper, str(progs / "main-1.py"), main, "a b", "$(x)",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == f"hello ['a b', '$(x)'] {progs / 'main-1.py'}\n"


@pytest.mark.parametrize("case", ["changed", "writable", "link", "missing"])
def test_boot_refuses_a_file_that_is_not_the_verified_copy(progs: Path, tmp_path: Path, case: str):
    want = write(progs / "main-1.py", b"print('ran')\n")
    path = progs / "main-1.py"
    if case == "changed":
        path.write_bytes(b"print('swapped')\n")
    elif case == "writable":
        path.chmod(0o620)
    elif case == "link":
        other = tmp_path / "elsewhere.py"
        write(other, b"print('ran')\n")
        path.unlink()
        path.symlink_to(other)
    else:
        path.unlink()
    p = run(str(path), want)
    assert p.returncode == _bootstrap.STALE_EXIT and b"ran" not in p.stdout
    assert p.stderr.decode().startswith(f"meshrun-boot: stale: {path}")


def test_boot_refuses_a_directory_others_may_write(progs: Path):
    want = write(progs / "main-1.py", b"print('ran')\n")
    progs.chmod(0o777)
    p = run(str(progs / "main-1.py"), want)
    assert p.returncode == _bootstrap.UNSAFE_EXIT and b"ran" not in p.stdout
    err = p.stderr.decode()
    assert "meshrun-boot: unsafe:" in err and "other users may write to it" in err and f"chmod go-w {progs}" in err
    progs.chmod(0o1777)  # sticky: allowed
    assert run(str(progs / "main-1.py"), want).stdout == b"ran\n"


def install(d: Path, files: dict[str, bytes]) -> tuple[int, dict]:
    manifest = [[n, len(b), sha(b)] for n, b in files.items()]
    p = run("--install", str(d), stdin=json.dumps(manifest).encode() + b"\n" + b"".join(files.values()))
    return p.returncode, json.loads(p.stdout.decode().splitlines()[-1])


def test_install_keeps_a_good_copy_and_replaces_anything_else(tmp_path: Path):
    d = tmp_path / "home" / "agent"
    (tmp_path / "home").mkdir(mode=0o700)
    rc, rep = install(d, {"agent-1.py": b"A\n", "helper-1.py": b"H\n"})
    assert rc == 0 and rep["ok"] and [n for n, _ in rep["installed"]] == ["agent-1.py", "helper-1.py"]
    assert (d / "agent-1.py").read_bytes() == b"A\n" and (d / "agent-1.py").stat().st_mode & 0o777 == 0o600
    assert d.stat().st_mode & 0o777 == 0o700
    rc, rep = install(d, {"agent-1.py": b"A\n"})
    assert rc == 0 and rep["kept"] == ["agent-1.py"] and rep["installed"] == []
    (d / "agent-1.py").write_bytes(b"tampered\n")
    (d / "helper-1.py").chmod(0o666)
    rc, rep = install(d, {"agent-1.py": b"A\n", "helper-1.py": b"H\n"})
    assert rc == 0 and dict(rep["installed"]) == {"agent-1.py": "its content was not the expected one",
                                                  "helper-1.py": "other users may write to it (mode 0666)"}
    assert (d / "agent-1.py").read_bytes() == b"A\n" and (d / "helper-1.py").stat().st_mode & 0o777 == 0o600


def test_install_refuses_a_directory_others_may_write_and_a_bad_request(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    rc, rep = install(shared / "agent", {"agent-1.py": b"A\n"})
    assert rc == _bootstrap.UNSAFE_EXIT and rep["unsafe"] and str(shared) in rep["error"]
    assert not (shared / "agent").exists()
    ok = tmp_path / "ok"
    ok.mkdir(mode=0o700)
    rc, rep = install(ok / "agent", {"../escape.py": b"A\n"})
    assert rc == 1 and not rep["ok"] and "bad file" in rep["error"]
    assert not (tmp_path / "escape.py").exists()


def test_the_checks_as_functions(tmp_path: Path):
    f = tmp_path / "f"
    write(f, b"x" * 10)
    assert _bootstrap.read_checked(str(f), 10) == b"x" * 10
    with pytest.raises(_bootstrap.Stale, match="larger than 9 bytes"):
        _bootstrap.read_checked(str(f), 9)
    with pytest.raises(_bootstrap.Stale, match="not a regular file"):
        _bootstrap.read_checked(str(tmp_path), 10)
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    _bootstrap.check_dir(str(d), True)
    os.chmod(d, 0o770)
    with pytest.raises(_bootstrap.Unsafe, match="other users may write"):
        _bootstrap.check_dir(str(d), True)
    _bootstrap.check_dir(str(d), False)  # group-writable is fine where ownership does not matter
    with pytest.raises(_bootstrap.Unsafe, match="is not a directory"):
        _bootstrap.check_dir(str(f), False)
