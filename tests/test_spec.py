"""JobSpec: validation, flat resource fields, JSON round trip, JSON Schema, and SpecError only."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshrun
from meshrun import JobSpec, Resources, SpecError


def train(lr, *, epochs=1):
    return lr * epochs


def test_command_spec_with_flat_resources():
    s = JobSpec(command=["python", "train.py", "--lr", "0.1"], gpus="H100:8", cpus=16, memory="32GiB",
                nodes=2, time_limit="1h30m", env={"A": "1"}, name="t")
    assert s.resources == Resources(gpus=8, gpu_type="H100", cpus=16, memory=32 * 1024**3, nodes=2)
    assert s.time_limit == 5400
    assert s.kind == "command" and s.gpus == 8 and s.nodes == 2
    assert s.resources.gpu_request == "H100:8"


def test_gpu_forms():
    assert JobSpec(command="x", gpus=2).resources.gpus == 2
    assert JobSpec(command="x", gpus="2").resources.gpus == 2
    r = JobSpec(command="x", gpus="A100-80GB:4").resources
    assert (r.gpus, r.gpu_type) == (4, "A100-80GB")
    r = JobSpec(command="x", gpus="H100").resources
    assert (r.gpus, r.gpu_type) == (1, "H100")
    r = JobSpec(command="x", gpus=2, gpu_type="L4").resources
    assert (r.gpus, r.gpu_type) == (2, "L4")


@pytest.mark.parametrize(
    "value,seconds",
    [("90s", 90), ("45m", 2700), ("1h30m", 5400), ("2d", 172800), ("01:30:00", 5400), ("1-00:00:00", 86400),
     ("10:00", 600), (3600, 3600), (timedelta(minutes=5), 300), ("1.5h", 5400)],
)
def test_time_limit_forms(value, seconds):
    assert JobSpec(command="x", time_limit=value).time_limit == seconds


def test_function_spec_and_json_round_trip():
    s = JobSpec(function=train, args=(0.1,), kwargs={"epochs": 3}, gpus=1)
    assert s.kind == "function"
    data = json.loads(s.to_json())
    assert data["function"] == f"{__name__}:train"
    assert data["args"] == [0.1] and data["kwargs"] == {"epochs": 3}
    back = JobSpec.from_json(s.to_json())
    # a "module:qualname" reference comes back and resolves to the same callable when importable
    assert back.function == f"{__name__}:train"
    assert back.args == (0.1,) and back.kwargs == {"epochs": 3} and back.resources == s.resources


def test_command_json_round_trip_is_exact():
    s = JobSpec(command=["echo", "it's $(x); `y`\nnewline ünïcode"], name="n'\"$(a)", env={"K": "v\n$(x)"},
                setup=["pip install x"], files={"data/a.txt": "/tmp/a.txt"}, backend_options={"slurm": {"qos": "hi"}},
                time_limit=60, gpus="H100:2", labels={"team": "nlp"})
    assert JobSpec.from_json(s.to_json()) == s
    assert JobSpec.from_dict(s.to_dict()) == s


def test_json_schema_export():
    schema = JobSpec.json_schema()
    assert schema["type"] == "object"
    for f in ("command", "function", "resources", "env", "time_limit", "backend_options"):
        assert f in schema["properties"]
    json.dumps(schema)


def test_spec_is_immutable_and_replace_validates():
    s = JobSpec(command="x", gpus=1)
    with pytest.raises(Exception):
        s.name = "other"  # type: ignore[misc]
    assert s.replace(gpus=4).resources.gpus == 4
    with pytest.raises(SpecError) as e:
        s.replace(gpus=-1)
    assert e.value.field == "gpus"


@pytest.mark.parametrize(
    "fields,field,fragment",
    [
        (dict(command=[]), "command", "at least the program"),
        (dict(command=""), "command", "must not be empty"),
        (dict(command="x", gpus="H100:x"), "gpus", "type and count"),
        (dict(command="x", gpus=-1), "gpus", "negative"),
        (dict(command="x", memory="12 parsecs"), "memory", "32GiB"),
        (dict(command="x", nodes=0), "nodes", "1 to 4096"),
        (dict(command="x", cpus="many"), "cpus", "CPU cores"),
        (dict(command="x", gpu=1), "gpu", "unknown field 'gpu'"),
        (dict(command="x", env={"1A": "b"}), "env", "variable names"),
        (dict(command="x", env={"A": None}), "env", "must be text"),
        (dict(command="x", env={"CUDA_VISIBLE_DEVICES": "0"}), "env", "set by meshrun"),
        (dict(), "command", "exactly one of command"),
        (dict(command="x", function=train), "function", "exactly one"),
        (dict(command="x", args=(1,)), "args", "for function jobs"),
        (dict(command="x", time_limit="-1"), "time_limit", "positive"),
        (dict(command="x", time_limit="soon"), "time_limit", "duration"),
        (dict(command="x", name=""), "name", "empty"),
        (dict(command="x", name="a\x00b"), "name", "NUL"),
        (dict(command="x", backend="Not A Backend"), "backend", "backend name"),
        (dict(command="x", backend_options={"slurm": 3}), "backend_options", "mapping"),
        (dict(command="x", gpus="H100:2", gpu_type="A100"), "gpu_type", "conflicts"),
        (dict(function="not a ref"), "function", "module:qualname"),
        (dict(command="x", retries=-1), "retries", "0 to 100"),
    ],
)
def test_bad_specs_name_the_field(fields, field, fragment):
    with pytest.raises(SpecError) as e:
        JobSpec(**fields)
    assert e.value.field == field, str(e.value)
    assert fragment in str(e.value)


def test_unknown_field_lists_the_valid_ones():
    with pytest.raises(SpecError) as e:
        JobSpec(command="x", timelimit="1h")
    assert "time_limit" in str(e.value) and "timelimit" in str(e.value)


def test_from_json_errors_are_spec_errors():
    with pytest.raises(SpecError):
        JobSpec.from_json("{not json")
    with pytest.raises(SpecError):
        JobSpec.from_json("[1, 2]")


def test_decorator_fields_validate_at_decoration_time():
    with pytest.raises(SpecError) as e:
        meshrun.job(gpus="H100:many")(train)
    assert e.value.field == "gpus"


_field_names = st.sampled_from(
    ["command", "function", "args", "kwargs", "gpus", "gpu_type", "cpus", "memory", "nodes", "time_limit", "env",
     "workdir", "files", "setup", "name", "backend", "backend_options", "image", "max_pending", "retries",
     "labels", "disk", "gpu_memory", "resources", "bogus"]
)
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**12) | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.binary(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_field_names, _values, max_size=6))
def test_property_bad_specs_only_raise_spec_error(fields):
    """Whatever goes in, a JobSpec either validates or raises SpecError naming a field."""
    try:
        spec = JobSpec(**fields)
    except SpecError as e:
        assert isinstance(e.field, str)
        assert str(e)
        return
    # what validates also serialises and comes back equal (for command specs)
    if spec.kind == "command":
        assert JobSpec.from_json(spec.to_json()) == spec


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.integers(), max_size=3)))
def test_property_from_json_only_raises_spec_error(text):
    try:
        JobSpec.from_json(text if isinstance(text, str) else json.dumps(text))
    except SpecError:
        pass
