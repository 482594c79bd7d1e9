"""``meshrun.submit`` and ``meshrun.run`` accept what their documentation says, and each refusal names the call
that does work (and that call is tried here, so the advice stays true). Real jobs on the local backend."""

from __future__ import annotations

import pytest

import meshrun
from meshrun import JobSpec, SpecError


@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


def _plain_functions():
    # defined here, not at module level, so they travel by value (this test module is not importable by
    # name in the job's process)
    def add(a: int, b: int = 0) -> int:
        return a + b

    def echo_backend(backend: str, store: str = "-") -> str:
        return f"{backend}/{store}"

    return add, echo_backend


add, echo_backend = _plain_functions()


@meshrun.job(name="decorated-add", cpus=1)
def decorated_add(a: int, b: int = 0) -> int:
    return a + b


def test_submit_a_plain_function_with_its_arguments():
    job = meshrun.submit(add, 2, b=3)
    assert job.result(timeout=120) == 5
    assert job.spec.kind == "function"
    assert job.spec.args == (2,) and job.spec.kwargs == {"b": 3}


def test_submit_gives_every_keyword_to_the_function():
    # backend= and store= are the function's own parameters here, not placement options
    assert meshrun.submit(echo_backend, backend="mine", store="box").result(timeout=120) == "mine/box"


def test_submit_a_decorated_function_keeps_its_spec():
    job = meshrun.submit(decorated_add, 4, 5)
    assert job.result(timeout=120) == 9
    assert job.name == "decorated-add"
    assert job.spec.resources.cpus == 1


def test_submit_a_spec_still_takes_backend_and_placement_options():
    job = meshrun.submit(JobSpec(function=add, args=(1, 1)), backend="local")
    assert job.result(timeout=120) == 2
    assert job.backend == "local"


def test_run_takes_a_command_or_a_spec():
    assert meshrun.run(["true"]).result(timeout=120) == 0
    job = meshrun.run(JobSpec(command=["true"], name="first"), name="again")
    assert job.result(timeout=120) == 0
    assert job.name == "again"
    fn_spec = meshrun.run(JobSpec(function=add, args=(20, 22)))
    assert fn_spec.result(timeout=120) == 42


def test_run_refuses_a_function_and_names_what_works():
    with pytest.raises(SpecError) as e:
        meshrun.run(add)
    assert e.value.field == "command"
    msg = str(e.value)
    assert "meshrun.run takes a command (an argv list or a string)" in msg
    assert "meshrun.submit(fn, *args, **kwargs)" in msg and "@meshrun.job(...)" in msg and "fn.submit(" in msg
    # ... and what it names does work
    assert meshrun.submit(add, 1, 2).result(timeout=120) == 3
    assert decorated_add.submit(1, 2).result(timeout=120) == 3


def test_run_without_a_command_says_what_a_command_is():
    with pytest.raises(SpecError) as e:
        meshrun.run(gpus=0)
    assert e.value.field == "command"
    assert "meshrun.run needs a command: an argv list such as ['python', 'train.py'] or a string" in str(e.value)


def test_run_refuses_function_as_a_keyword():
    with pytest.raises(SpecError) as e:
        meshrun.run(function=add)
    assert e.value.field == "function"
    assert "meshrun.submit(fn, *args, **kwargs)" in str(e.value)


def test_submit_refuses_a_command_and_names_run():
    for command in ("echo hi", ["echo", "hi"]):
        with pytest.raises(SpecError) as e:
            meshrun.submit(command)
        assert e.value.field == "function"
        assert "meshrun.submit takes a meshrun.JobSpec or a function" in str(e.value)
        assert f"for a command use meshrun.run({command!r}, ...)" in str(e.value)
    assert meshrun.run(["echo", "hi"]).result(timeout=120) == 0


def test_submit_refuses_anything_else_naming_its_type():
    with pytest.raises(SpecError, match=r"takes a meshrun.JobSpec or a function \(then its arguments\), got int"):
        meshrun.submit(42)


def test_submit_of_a_spec_takes_no_extra_positional_arguments():
    with pytest.raises(SpecError) as e:
        meshrun.submit(JobSpec(function=add), 1, 2)
    assert e.value.field == "args"
    assert "JobSpec(function=fn, args=..., kwargs=...)" in str(e.value)
    assert meshrun.submit(JobSpec(function=add, args=(1, 2))).result(timeout=120) == 3


def test_nothing_is_submitted_when_the_call_is_refused():
    for bad in (lambda: meshrun.run(add), lambda: meshrun.submit("true"), lambda: meshrun.submit(42)):
        with pytest.raises(SpecError):
            bad()
    assert meshrun.get_config() is not None
    from meshrun._store import get_store

    assert get_store().list() == []
