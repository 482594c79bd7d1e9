"""The user API's types, proven with mypy: a function's return type reaches ``Job[R]`` and ``result()``, its
parameters are checked at ``submit``, and the package ships ``py.typed``.

Each case is a small program that mypy checks with the project's own configuration (pyproject.toml); the
test compares what mypy reveals and reports with what the program says it should.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

import meshrun

REPO = Path(__file__).resolve().parent.parent

PROGRAM = '''
import meshrun
from meshrun import Job, JobSpec


@meshrun.job(gpus=0, memory="1GiB")
def train(lr: float, steps: int = 10) -> dict[str, float]:
    return {"loss": lr / steps}


@meshrun.job
def label(x: int) -> str:
    return str(x)


def plain(a: int, b: str) -> bytes:
    return b.encode() * a


job = train.submit(0.1, steps=5)
reveal_type(job)  # R: meshrun._job.Job[dict[str, float]]
reveal_type(job.result())  # R: dict[str, float]
reveal_type(job.result(timeout=5))  # R: dict[str, float]
reveal_type(train.map([0.1, 0.2]))  # R: list[meshrun._job.Job[dict[str, float]]]
reveal_type(train.options(gpus=1).submit(0.2).result())  # R: dict[str, float]
reveal_type(train(0.3))  # R: dict[str, float]
reveal_type(label.submit(3).result())  # R: str
reveal_type(meshrun.submit(plain, 2, "x").result())  # R: bytes
reveal_type(meshrun.submit(train, 0.1, steps=3))  # R: meshrun._job.Job[dict[str, float]]
reveal_type(meshrun.gather([label.submit(1), label.submit(2)]))  # R: list[str]
reveal_type(meshrun.run(["echo", "hi"]).result())  # R: int
reveal_type(meshrun.run("echo hi", gpus=0))  # R: meshrun._job.Job[int]
reveal_type(meshrun.submit(JobSpec(command="true")))  # R: meshrun._job.Job[Any]
reveal_type(meshrun.run(JobSpec(command="true"), name="again"))  # R: meshrun._job.Job[Any]
reveal_type(Job.attach("abc"))  # R: meshrun._job.Job[Any]
reveal_type(Job("abc"))  # R: meshrun._job.Job[Any]
reveal_type(job.spec)  # R: meshrun._spec.JobSpec


async def waits() -> None:
    reveal_type(await label.submit(1))  # R: str

train.submit("fast")  # E: arg-type
label.submit()  # E: call-arg
meshrun.submit(plain, 1)  # E: call-overload
meshrun.submit(plain, "1", "x")  # E: call-overload
n: int = label.submit(1).result()  # E: assignment
'''


def _expected(program: str) -> tuple[dict[int, str], dict[int, str]]:
    reveals, errors = {}, {}
    for n, line in enumerate(program.splitlines(), 1):
        if "  # R: " in line:
            reveals[n] = line.split("  # R: ", 1)[1]
        elif "  # E: " in line:
            errors[n] = line.split("  # E: ", 1)[1]
    return reveals, errors


def _mypy(tmp_path: Path, program: str, monkeypatch: pytest.MonkeyPatch) -> str:
    from mypy import api

    # check against the meshrun this test imports (this checkout), whatever else is installed
    here = str(Path(meshrun.__file__).resolve().parent.parent)
    monkeypatch.setenv("MYPYPATH", os.pathsep.join(filter(None, [here, os.environ.get("MYPYPATH")])))
    src = tmp_path / "user_program.py"
    src.write_text(textwrap.dedent(program))
    # the project's configuration and cache (scripts/test.sh has usually warmed it); the file named here
    # replaces the configured file list
    out, err, _status = api.run([
        "--config-file", str(REPO / "pyproject.toml"),
        "--cache-dir", str(REPO / ".venv" / ".mypy_cache"),
        "--no-error-summary", "--show-error-codes", str(src),
    ])
    assert not err, err
    return out


def test_job_types_follow_the_function(tmp_path, monkeypatch):
    out = _mypy(tmp_path, PROGRAM, monkeypatch)
    want_reveals, want_errors = _expected(PROGRAM)
    got_reveals: dict[int, str] = {}
    got_errors: dict[int, str] = {}
    for line in out.splitlines():
        m = re.match(r'.*user_program\.py:(\d+): note: Revealed type is "(.*)"$', line)
        if m:
            got_reveals[int(m.group(1))] = m.group(2)
            continue
        m = re.match(r".*user_program\.py:(\d+): error: .*\[([a-z-]+)\]$", line)
        if m:
            got_errors[int(m.group(1))] = m.group(2)
            continue
        assert ": note: " in line, f"unexpected mypy output: {line}"
    assert got_reveals == want_reveals, out
    assert got_errors == want_errors, out


def test_a_program_using_the_api_as_documented_checks_clean(tmp_path, monkeypatch):
    program = '''
    import meshrun

    @meshrun.job(gpus=1, memory="16GiB", time_limit="2h")
    def train(lr: float) -> dict[str, float]:
        return {"loss": 0.1}

    def main() -> float:
        job = train.submit(0.1)
        losses = [j.result()["loss"] for j in train.map([0.1, 0.01])]
        cmd = meshrun.run(["python", "train.py"], gpus=2, name="train", backend="local")
        code: int = cmd.result()
        spec = meshrun.JobSpec(command=["echo", "hi"], cpus=1)
        other = meshrun.submit(spec, backend="local")
        meshrun.wait([job, other], timeout=60)
        return job.result()["loss"] + sum(losses) + code
    '''
    out = _mypy(tmp_path, program, monkeypatch)
    assert out.strip() == "", out


@pytest.mark.parametrize("package", ["meshrun", "meshrun_ssh", "meshrun_slurm", "meshrun_kubernetes",
                                     "meshrun_skypilot", "meshrun_dstack"])
def test_each_package_ships_py_typed(package):
    import importlib

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    mod = importlib.import_module(package)
    assert (Path(mod.__file__).parent / "py.typed").is_file()
    # and the distribution declares it as package data, so wheels and sdists carry it
    root = REPO if package == "meshrun" else REPO / "backends" / package.removeprefix("meshrun_")
    conf = tomllib.loads((root / "pyproject.toml").read_text())
    assert "py.typed" in conf["tool"]["setuptools"]["package-data"][package]


def test_job_is_generic_at_run_time():
    assert meshrun.Job[int] is not None  # subscriptable, as the annotations above use it
    assert meshrun.JobFunction[[int], str] is not None
