"""SkyPilot task YAML -> JobSpec (meshrun._taskyaml): a pure reader, no SkyPilot needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

import meshrun
from meshrun._taskyaml import spec_from_task_config

HOSTILE = "a'b\"c $(touch /tmp/pwned) `id` ${HOME} \\ \n; | & ünïcødé"


def test_reader_does_not_import_sky():
    code = ("import sys, meshrun; from meshrun._taskyaml import spec_from_task_config as f; "
            "f({'run': 'true', 'resources': {'accelerators': 'H100:8'}}); print('sky' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_full_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "tok")
    (tmp_path / "src").mkdir()
    (tmp_path / "d.txt").write_text("x")
    y = tmp_path / "task.yaml"
    y.write_text(
        "name: my job\n"
        "workdir: src\n"
        "num_nodes: 4\n"
        "resources:\n"
        "  accelerators: {A100-80GB: 8}\n"
        "  cpus: 32\n"
        "  memory: 4x\n"
        "  disk_size: 100\n"
        "  infra: aws/us-east-1\n"
        "  use_spot: true\n"
        "  ports: 8888\n"
        "envs: {BATCH: 32, HF_TOKEN: null}\n"
        "secrets: {WANDB_KEY: abc}\n"
        "file_mounts:\n"
        "  /remote/d.txt: d.txt\n"
        "  /ckpt: {source: s3://b, mode: MOUNT}\n"
        "setup: pip install -e .\n"
        "run: python train.py\n"
        "service: {readiness_probe: /}\n"
    )
    spec = meshrun.JobSpec.from_skypilot_yaml(y)
    assert spec.name == "my job" and spec.command == "python train.py" and spec.setup == ["pip install -e ."]
    assert spec.workdir == str(tmp_path / "src") and spec.nodes == 4
    assert spec.resources.gpus == 8 and spec.resources.gpu_type == "A100-80GB"
    assert spec.resources.cpus == 32 and spec.resources.memory is None and spec.resources.disk == 100 * 1024**3
    assert spec.env == {"BATCH": "32", "HF_TOKEN": "tok", "WANDB_KEY": "abc"}
    assert spec.files == {"/remote/d.txt": str(tmp_path / "d.txt")}
    opts = spec.options_for("skypilot")
    assert opts["cpus"] == "32" and opts["memory"] == "4x" and opts["infra"] == "aws/us-east-1"
    assert opts["use_spot"] is True and opts["ports"] == 8888
    assert opts["task"] == {"file_mounts": {"/ckpt": {"source": "s3://b", "mode": "MOUNT"}},
                            "service": {"readiness_probe": "/"}}


def test_hostile_run_and_env_reach_the_spec_unchanged():
    spec = spec_from_task_config({"run": HOSTILE, "envs": {"X": HOSTILE}})
    assert spec.command == HOSTILE and spec.env == {"X": HOSTILE}


@pytest.mark.parametrize("acc, gpus, gtype, kept", [
    ("H100:8", 8, "H100", False),
    ("H100", 1, "H100", False),
    ({"L4": 2}, 2, "L4", False),
    (["H100:8", "A100:8"], 8, None, True),
    ({"A100": 8, "H100": 8}, 8, None, True),
    ("T4:0.5", 0, None, True),
])
def test_accelerators(acc, gpus, gtype, kept):
    spec = spec_from_task_config({"run": "x", "resources": {"accelerators": acc}})
    assert spec.resources.gpus == gpus and spec.resources.gpu_type == gtype
    assert ("accelerators" in spec.options_for("skypilot")) is kept


@pytest.mark.parametrize("config, field", [
    ({"run": "x", "bogus": 1}, "bogus"),
    ({"run": "x", "resources": {"gpus": 1}}, "resources.gpus"),
    ({"setup": "x"}, "run"),
    ({"run": ["a"]}, "run"),
    ({"run": "x", "envs": {"A": None}}, "envs.A"),
    ({"run": "x", "envs": {"A": [1]}}, "envs.A"),
    ({"run": "x", "resources": {"cpus": "many"}}, "resources.cpus"),
    ({"run": "x", "resources": {"memory": "lots"}}, "resources.memory"),
    ({"run": "x", "resources": {"disk_size": "big"}}, "resources.disk_size"),
    ({"run": "x", "num_nodes": 0}, "num_nodes"),
    ({"run": "x", "resources": {"accelerators": "H1 00:2"}}, "resources.accelerators"),
])
def test_errors_name_the_field(config, field, monkeypatch):
    monkeypatch.delenv("A", raising=False)
    with pytest.raises(meshrun.SpecError) as e:
        spec_from_task_config(config)
    assert e.value.field == field, str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(meshrun.SpecError, match="cannot read"):
        meshrun.JobSpec.from_skypilot_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(meshrun.SpecError, match="not valid YAML"):
        meshrun.JobSpec.from_skypilot_yaml(bad)
    two = tmp_path / "two.yaml"
    two.write_text("run: a\n---\nrun: b\n")
    with pytest.raises(meshrun.SpecError, match="pipeline"):
        meshrun.JobSpec.from_skypilot_yaml(two)


def test_a_task_yaml_runs_on_the_local_backend(tmp_path, monkeypatch):
    """`meshrun run task.yaml`: the same task runs wherever meshrun places it, here on this machine."""
    monkeypatch.chdir(tmp_path)
    import yaml

    (tmp_path / "task.yaml").write_text(yaml.safe_dump({
        "resources": {"infra": "aws", "use_spot": True},
        "envs": {"GREETING": HOSTILE},
        "setup": "echo setting up > setup.txt\n",
        "run": "printf '%s' \"$GREETING\" > out.txt\necho nodes=${NNODES}\n",
    }))
    spec = meshrun.JobSpec.from_skypilot_yaml(tmp_path / "task.yaml")
    job = meshrun.submit(spec, backend="local")
    assert job.result(timeout=60) == 0
    assert (tmp_path / "out.txt").read_text() == HOSTILE
    assert (tmp_path / "setup.txt").read_text() == "setting up\n"
    assert "nodes=1" in job.logs()


def test_cli_runs_a_task_yaml(tmp_path, monkeypatch, capsys):
    from meshrun._cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text("name: from-yaml\nrun: echo hi from yaml > cli.txt\n")
    assert main(["run", "-b", "local", "t.yaml"]) == 0
    assert (tmp_path / "cli.txt").read_text() == "hi from yaml\n"
