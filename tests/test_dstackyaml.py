"""dstack task configuration -> JobSpec (meshrun._dstackyaml): a pure reader, no dstack needed."""

from __future__ import annotations

import pytest

import meshrun
from meshrun._dstackyaml import spec_from_dstack_config

HOSTILE = "a'b\"c $(touch /tmp/pwned) `id` ${HOME} \\ \n; | & ünïcødé"


def test_full_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "from-env")
    (tmp_path / "t.dstack.yml").write_text(
        "type: task\n"
        "name: train\n"
        "python: '3.11'\n"
        "nodes: 2\n"
        "env:\n"
        "  - HF_TOKEN\n"
        "  - BATCH=32\n"
        "commands:\n"
        "  - pip install -r requirements.txt\n"
        "  - python train.py\n"
        "files:\n"
        "  - data:/workflow/data\n"
        "max_duration: 2h\n"
        "spot_policy: auto\n"
        "resources:\n"
        "  gpu: A100:80GB:8\n"
        "  cpu: 32..\n"
        "  memory: 256GB..\n"
        "  disk: 500GB\n"
        "  shm_size: 16GB\n"
    )
    spec = meshrun.JobSpec.from_dstack_yaml(tmp_path / "t.dstack.yml")
    assert spec.name == "train" and spec.nodes == 2 and spec.time_limit == 7200
    assert spec.command == "pip install -r requirements.txt && python train.py"
    assert spec.env == {"HF_TOKEN": "from-env", "BATCH": "32"}
    assert spec.files == {"/workflow/data": str(tmp_path / "data")}
    r = spec.resources
    assert (r.gpus, r.gpu_type, r.gpu_memory) == (8, "A100", 80 * 1024**3)
    assert (r.cpus, r.memory, r.disk) == (32, 256 * 1024**3, 500 * 1024**3)
    assert spec.options_for("dstack") == {"python": "3.11", "spot_policy": "auto", "resources": {
        "gpu": "A100:80GB:8", "cpu": "32..", "memory": "256GB..", "disk": "500GB", "shm_size": "16GB"}}


@pytest.mark.parametrize("gpu, want, alts", [
    ("H100:8", "H100:8", ()),
    ("A10G,A100", "A10G:1", ("A10G:1", "A100:1")),
    ({"name": ["L4", "A10G"], "count": 2}, "L4:2", ("L4:2", "A10G:2")),
    ("nvidia:24GB", "1", ()),
    (2, "2", ()),
    ("A100:2..2", "A100:2", ()),
])
def test_gpu_specs(gpu, want, alts):
    spec = spec_from_dstack_config({"type": "task", "commands": ["x"], "resources": {"gpu": gpu}})
    assert spec.resources.gpu_request == want and spec.resources.gpu_alternatives == alts


@pytest.mark.parametrize("config, field", [
    ({"type": "service", "commands": ["x"]}, "type"),
    ({"type": "task", "commands": ["x"], "ports": [8000]}, "ports"),
    ({"type": "task", "commands": ["x"], "resources": {"gpu": "1..8"}}, "resources.gpu"),
    ({"type": "task", "commands": ["x"], "resources": {"gpu": "amd:MI300X:8"}}, "resources.gpu"),
    ({"type": "task", "commands": ["x"], "resources": {"memory": "16GB..40GB"}}, "resources.memory"),
    ({"type": "task", "commands": ["x"], "env": {"T": "${{ secrets.hf }}"}}, "env.T"),
    ({"type": "task", "commands": ["x"], "env": ["UNSET_FOR_SURE"]}, "env.UNSET_FOR_SURE"),
    ({"type": "task", "commands": ["x"], "bogus": 1}, "bogus"),
    ({"type": "task"}, "commands"),
])
def test_what_meshrun_cannot_express_is_refused_by_name(config, field, monkeypatch):
    monkeypatch.delenv("UNSET_FOR_SURE", raising=False)
    with pytest.raises(meshrun.SpecError) as e:
        spec_from_dstack_config(config)
    assert e.value.field == field, str(e.value)


def test_env_overrides_and_hostile_values():
    spec = spec_from_dstack_config({"type": "task", "commands": [HOSTILE], "env": ["A", "B=1"]},
                                   env={"A": HOSTILE})
    assert spec.command == HOSTILE.strip() and spec.env == {"A": HOSTILE, "B": "1"}


def test_dstack_retry_mapping_becomes_the_backends_retry_options():
    spec = spec_from_dstack_config({"type": "task", "commands": ["x"],
                                    "retry": {"on_events": ["no-capacity", "error"], "duration": "1h"}})
    opts = spec.options_for("dstack")
    assert opts["retry"] == "1h" and opts["retry_on"] == ["no-capacity", "error"]
