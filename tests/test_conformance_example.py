"""examples/subprocess_backend.py, the minimal backend of docs/writing-a-backend.md, passes the conformance suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import meshrun
import meshrun.backend as mb
from meshrun.testing import BackendContract

EXAMPLES = str(Path(__file__).resolve().parent.parent / "examples")
sys.path.insert(0, EXAMPLES)
from subprocess_backend import SubprocessBackend  # noqa: E402


class TestExampleContract(BackendContract):
    label = "example (subprocess)"
    nodes = 1
    gpus = 2
    timeout = 60.0
    cannot = {"env_contract_2_nodes": "one machine: the example runs single-node jobs"}
    child_prelude = (f"sys.path.insert(0, {EXAMPLES!r}); import meshrun.backend as mb; "
                     "from subprocess_backend import SubprocessBackend; "
                     "mb.register_backend('subprocess', SubprocessBackend)")

    @pytest.fixture
    def contract_backend(self, fake_gpus):
        fake_gpus(2)
        mb.register_backend("subprocess", SubprocessBackend)
        meshrun.configure({"backends": {"subprocess": {"grace_period": 2}}})
        yield "subprocess"
        mb.unregister_backend("subprocess")


def test_bad_settings_and_options_name_backend_field_and_what_is_allowed():
    mb.register_backend("subprocess", SubprocessBackend)
    try:
        meshrun.configure({"backends": {"subprocess": {"grace_periodd": 2}}})
        with pytest.raises(meshrun.ConfigError) as e:
            meshrun.get_backend("subprocess")
        assert e.value.field == "backends.subprocess.grace_periodd"
        assert "subprocess backend" in str(e.value) and "grace_period, python" in str(e.value)
        meshrun.configure({})
        spec = meshrun.JobSpec(command=["true"], backend="subprocess", backend_options={"subprocess": {"nice": 40}})
        with pytest.raises(meshrun.SpecError) as e:
            meshrun.submit(spec)  # refused before placement
        assert e.value.field == "backend_options.subprocess.nice" and "less than or equal to 19" in str(e.value)
        assert "subprocess backend" in str(e.value)
    finally:
        mb.unregister_backend("subprocess")
