"""SkyPilot task YAML -> JobSpec (meshrun._taskyaml): a pure reader, no SkyPilot needed."""

from __future__ import annotations

import os
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
    monkeypatch.chdir(tmp_path)  # SkyPilot takes relative paths from the current directory
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
    assert spec.env == {"BATCH": "32", "HF_TOKEN": "tok"} and spec.secrets == {"WANDB_KEY": "abc"}
    assert spec.files == {"/remote/d.txt": str(tmp_path / "d.txt")}
    opts = spec.options_for("skypilot")
    assert opts["cpus"] == "32" and opts["memory"] == "4x" and opts["infra"] == "aws/us-east-1"
    assert opts["use_spot"] is True and opts["ports"] == 8888
    assert opts["task"] == {"file_mounts": {"/ckpt": {"source": "s3://b", "mode": "MOUNT"}},
                            "service": {"readiness_probe": "/"}}


def test_hostile_run_and_env_reach_the_spec_unchanged():
    spec = spec_from_task_config({"run": HOSTILE, "envs": {"X": HOSTILE}})
    assert spec.command == HOSTILE and spec.env == {"X": HOSTILE}


@pytest.mark.parametrize("acc, gpus, gtype, alts, kept", [
    ("H100:8", 8, "H100", (), False),
    ("H100", 1, "H100", (), False),
    ({"L4": 2}, 2, "L4", (), False),
    ({"A10:1": None}, 1, "A10", (), True),  # YAML's reading of the flow mapping {A10:1}
    (["H100:8", "A100:8"], 8, "H100", ("H100:8", "A100:8"), True),
    ({"L4": 1, "A10G": 1}, 1, "L4", ("L4:1", "A10G:1"), True),
    ("T4:0.5", 1, "T4", (), True),  # a whole GPU elsewhere; SkyPilot gets the fraction
    ({"T4": 0.5, "L4": 0.25}, 1, "T4", ("T4:1", "L4:1"), True),
])
def test_accelerators(acc, gpus, gtype, alts, kept):
    spec = spec_from_task_config({"run": "x", "resources": {"accelerators": acc}})
    assert (spec.resources.gpus, spec.resources.gpu_type, spec.resources.gpu_alternatives) == (gpus, gtype, alts)
    assert (spec.options_for("skypilot").get("accelerators") == acc) is kept


@pytest.mark.parametrize("res, first, alts", [
    ({"gpus": "A10:1"}, "A10:1", ()),
    ({"any_of": [{"accelerators": "A100:1"}, {"gpus": "H100:1"}]}, "A100:1", ("A100:1", "H100:1")),
    ({"ordered": [{"accelerators": {"L4": 1, "A10G": 1}, "infra": "aws"}, {"accelerators": "T4:1"}]},
     "L4:1", ("L4:1", "A10G:1", "T4:1")),
    ({"accelerators": "A100:8", "any_of": [{"infra": "aws"}, {"infra": "gcp"}]}, "A100:8", ()),
    ({"accelerators": "H100:1", "any_of": [{"accelerators": "A100:1"}, {"infra": "gcp"}]}, "A100:1",
     ("A100:1", "H100:1")),  # the second inherits the top-level accelerators
])
def test_gpu_alternatives_from_any_of_and_ordered(res, first, alts):
    spec = spec_from_task_config({"run": "x", "resources": res})
    assert spec.resources.gpu_request == first and spec.resources.gpu_alternatives == alts


def test_sizes_and_values_skypilot_accepts():
    spec = spec_from_task_config({"run": "x", "resources": {"disk_size": "1024GB", "memory": "32GB+"},
                                  "envs": {"FLAG": True, "N": 3}, "secrets": ["secrets:HF_TOKEN", "WANDB"]})
    assert spec.resources.disk == 1024 * 1024**3 and spec.resources.memory == 32 * 1024**3
    assert spec.env == {"FLAG": "True", "N": "3"}  # SkyPilot writes a bool as True/False
    assert spec.secrets == {"HF_TOKEN": None, "WANDB": None}  # taken from the environment at submit
    assert spec.options_for("skypilot")["memory"] == "32GB+"  # SkyPilot gets its own text back
    assert spec_from_task_config({"run": "x", "secrets": None}).secrets == {}
    spec = spec_from_task_config({"run": "x", "resources": {"memory": "1TB"}})
    assert spec.resources.memory == 1024**4 and spec.options_for("skypilot")["memory"] == "1TB"


def test_paths_like_skypilot(tmp_path, monkeypatch):
    """Relative paths from the current directory, ~ expanded, ${VAR}/$VAR from envs and inline secrets."""
    monkeypatch.chdir(tmp_path)
    spec = spec_from_task_config({
        "run": "x", "workdir": "./code-${SIZE}", "envs": {"SIZE": "7b"}, "secrets": {"B": "bkt"},
        "file_mounts": {"/data/$SIZE": "data/${SIZE}.bin", "/ckpt": "s3://$B/ckpt", "/x/${NOPE}": "~/f"},
        "resources": {"image_id": "docker:nvcr.io/nvidia/pytorch:24.01-py3"},
    })
    assert spec.workdir == str(tmp_path / "code-7b")
    assert spec.files == {"/data/7b": str(tmp_path / "data" / "7b.bin"),
                          "/x/${NOPE}": os.path.expanduser("~/f")}
    assert spec.options_for("skypilot")["task"]["file_mounts"] == {"/ckpt": "s3://$B/ckpt"}  # SkyPilot fills it
    assert spec.image == "nvcr.io/nvidia/pytorch:24.01-py3"
    assert spec.options_for("skypilot")["image_id"] == "docker:nvcr.io/nvidia/pytorch:24.01-py3"


def test_env_overrides_merge_and_fill_nulls(monkeypatch):
    monkeypatch.delenv("MODEL", raising=False)
    cfg = {"run": "x", "envs": {"MODEL": None, "KEEP": "1", "LR": "0.1"}}
    spec = spec_from_task_config(cfg, env={"MODEL": "llama", "LR": "0.2"})
    assert spec.env == {"MODEL": "llama", "KEEP": "1", "LR": "0.2"}
    with pytest.raises(meshrun.SpecError) as e:
        spec_from_task_config(cfg)
    assert e.value.field == "envs.MODEL" and "--env MODEL=" in str(e.value)
    spec = spec_from_task_config({"run": "x", "secrets": {"HF_TOKEN": None}}, env={"HF_TOKEN": "t"})
    assert spec.secrets == {"HF_TOKEN": "t"} and spec.env == {}  # --env fills a secret, which stays secret


@pytest.mark.parametrize("config, field", [
    ({"run": "x", "bogus": 1}, "bogus"),
    ({"run": "x", "resources": {"gpus": "A10:1", "accelerators": "A10:1"}}, "resources.gpus"),
    ({"run": "x", "resources": {"accelerators": "{L4:1, A10G:1}"}}, "resources.accelerators"),
    ({"run": "x", "resources": {"accelerators": {"L4": "one"}}}, "resources.accelerators.L4"),
    ({"run": "x", "resources": {"accelerators": "T4:0"}}, "resources.accelerators"),
    ({"run": "x", "resources": {"ordered": [{"accelerators": "A100:1"}, {"infra": "gcp"}]}}, "resources.ordered[1]"),
    ({"run": "x", "resources": {"disk_size": "1024GB+"}}, "resources.disk_size"),
    ({"run": "x", "secrets": {"S": [1]}}, "secrets.S"),
    ({"run": "x", "envs": {"S": "1"}, "secrets": {"S": "2"}}, "secrets.S"),
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


@pytest.mark.parametrize("text,match,field", [
    # SkyPilot reads these as tasks, but there is no job to run (sky jobs pool apply / sky serve up / sky launch)
    ("pool:\n  workers: 2\nresources:\n  accelerators: {L4, A10G}\nsetup: pip install x\n",
     "SkyPilot pool spec.*not a task to run", "run"),
    ("service:\n  readiness_probe: /\nsetup: x\n", "SkyPilot service spec.*sky serve up", "run"),
    ("resources:\n  cpus: 2+\nsetup: pip install x\n", "only sets up a cluster.*give it a run section", "run"),
    # a job group runs its tasks at the same time; meshrun runs a file's tasks as a chain, so none of them is
    # started (whatever else its header holds: SkyPilot reads it as a job group by execution: parallel alone)
    ("name: g\nexecution: parallel\n---\nname: a\nrun: echo a\n---\nname: b\nrun: echo b\n",
     r"job group.*2 tasks run at the same time.*sky jobs launch .*f\.yaml.*pipeline", "execution"),
    ("name: g\nexecution: parallel\nprimary_tasks: [a]\ntermination_delay: 10s\ninter_connection: x\n---\n"
     "name: a\nrun: echo a\n", "job group.*1 tasks run at the same time", "execution"),
    # a pipeline's execution is serial, as SkyPilot's own loader says
    ("name: g\nexecution: sideways\n---\nrun: echo a\n---\nrun: echo b\n", "'sideways' is not an execution mode",
     "execution"),
    # a first document with more than name/execution and no execution: parallel is a task to SkyPilot too
    ("name: g\nexecution: serial\nprimary_tasks: [a]\n---\nrun: echo a\n", "not a SkyPilot task field", "execution"),
])
def test_skypilot_files_with_no_job_to_chain_are_refused_saying_what_they_are(text, match, field, tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text(text)
    with pytest.raises(meshrun.SpecError, match=match) as e:
        meshrun.JobSpec.pipeline_from_skypilot_yaml(f)
    assert e.value.field == field


def test_a_serial_job_group_is_a_chain(tmp_path):
    f = tmp_path / "group.yaml"
    f.write_text("name: g\nexecution: serial\n---\nrun: echo a\n---\nrun: echo b\n")
    assert [s.command for s in meshrun.JobSpec.pipeline_from_skypilot_yaml(f)] == ["echo a", "echo b"]


def test_a_job_group_starts_no_task(tmp_path, monkeypatch, capsys):
    """`meshrun run` on a parallel job group refuses it before anything runs: no task is half-run."""
    from meshrun._cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.yaml").write_text("name: g\nexecution: parallel\n---\nname: a\nrun: echo a > a.txt\n---\n"
                                     "name: b\nrun: echo b > b.txt\n")
    assert main(["run", "-b", "local", "g.yaml"]) == 2
    assert "SkyPilot job group" in capsys.readouterr().err
    assert not (tmp_path / "a.txt").exists() and not (tmp_path / "b.txt").exists()


P4D = ("InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice\n"
       "p4d.24xlarge,A100,8.0,96.0,1152.0,32.77,us-east-1,,\nm5.8xlarge,,,32.0,128.0,1.54,us-east-1,,\n")


@pytest.fixture
def aws_catalog(tmp_path, monkeypatch):
    """A catalog folder whose AWS table lists p4d.24xlarge (8 A100) and m5.8xlarge (no GPU)."""
    from meshrun._catalog import clear_cache

    (tmp_path / "cat" / "aws").mkdir(parents=True)
    (tmp_path / "cat" / "aws" / "vms.csv").write_text(P4D)
    monkeypatch.setenv("MESHRUN_CATALOG_DIR", str(tmp_path / "cat"))
    clear_cache()
    yield tmp_path / "cat"
    clear_cache()


def test_gpus_implied_by_an_instance_type_come_from_the_catalog(aws_catalog):
    from meshrun_skypilot import _task

    spec = spec_from_task_config({"run": "x", "resources": {"infra": "aws", "instance_type": "p4d.24xlarge"}})
    assert spec.resources.gpu_request == "A100:8"  # other backends are asked for what the instance has
    # SkyPilot is given the instance type as written (it reads the instance's GPUs itself)
    assert _task.task_config(spec)["resources"] == {"infra": "aws", "instance_type": "p4d.24xlarge",
                                                    "accelerators": None}
    cpu = spec_from_task_config({"run": "x", "resources": {"instance_type": "m5.8xlarge"}})
    assert cpu.resources.gpus == 0
    from meshrun._taskyaml import skypilot_only

    assert skypilot_only(spec) is None and skypilot_only(cpu) is None
    # an alternative named only by its instance type is one of the GPU alternatives, in its place
    alt = spec_from_task_config({"run": "x", "resources": {"ordered": [{"accelerators": "H100:8"},
                                                                          {"instance_type": "p4d.24xlarge"}]}})
    assert alt.resources.gpu_alternatives == ("H100:8", "A100:8")
    res = _task.task_config(alt)["resources"]
    assert res["accelerators"] is None  # no top-level GPU for the instance-type alternative to inherit
    with pytest.raises(meshrun.SpecError, match="asks for no GPU while another") as e:  # GPUs or none
        spec_from_task_config({"run": "x", "resources": {"any_of": [{"accelerators": "H100:8"},
                                                                     {"instance_type": "m5.8xlarge"}]}})
    assert e.value.field == "resources.any_of[1]"


def test_an_instance_type_the_catalog_does_not_list_runs_only_on_skypilot(aws_catalog):
    """Never 0 GPUs in silence: an instance type whose GPUs meshrun cannot tell keeps the job off the other
    backends, each passed over with the reason."""
    spec = spec_from_task_config({"run": "true", "resources": {"instance_type": "a3-highgpu-8g", "infra": "gcp"}})
    assert spec.resources.gpus == 0
    p = meshrun.plan(spec, backends=["local"], raise_on_empty=False)
    assert p.chosen is None
    why = [r.offer.reason for r in p.rejected if r.offer.backend == "local"]
    assert why and "instance_type a3-highgpu-8g, whose GPUs meshrun cannot tell" in why[0]
    with pytest.raises(meshrun.NoPlacementError, match="a3-highgpu-8g"):
        meshrun.submit(spec, backend="local")
    # a JobSpec that names a GPU instance type and no GPU is refused there too, saying what to ask for
    bare = meshrun.JobSpec(command="true", backend_options={"skypilot": {"instance_type": "p4d.24xlarge"}})
    why = [r.offer.reason for r in meshrun.plan(bare, backends=["local"], raise_on_empty=False).rejected]
    assert why and 'has 8 A100 GPU(s), but asks for none: give gpus="A100:8"' in why[0]
    # once the GPUs are said, or the instance has none, other backends are asked (the local one has no H100)
    from meshrun._taskyaml import skypilot_only

    assert skypilot_only(spec.replace(gpus="H100:8")) is None
    cpu = spec_from_task_config({"run": "true", "resources": {"instance_type": "m5.8xlarge"}})
    assert meshrun.plan(cpu, backends=["local"]).chosen is not None


def test_file_errors(tmp_path):
    with pytest.raises(meshrun.SpecError, match="cannot read"):
        meshrun.JobSpec.from_skypilot_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(meshrun.SpecError, match="not valid YAML"):
        meshrun.JobSpec.from_skypilot_yaml(bad)
    two = tmp_path / "two.yaml"
    two.write_text("name: pipe\n---\nrun: a\n---\nrun: b\nresources: {accelerators: L4}\n")
    with pytest.raises(meshrun.SpecError, match="pipeline of 2 tasks.*meshrun run FILE"):
        meshrun.JobSpec.from_skypilot_yaml(two)
    first, second = meshrun.JobSpec.pipeline_from_skypilot_yaml(two)
    assert first.command == "a" and second.command == "b" and second.resources.gpu_request == "L4:1"


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


def test_cli_flags_after_the_file_and_env_merging(tmp_path, monkeypatch):
    """`meshrun run t.yaml --env K=V` (SkyPilot's order): the flags apply, --env merges and fills nulls."""
    from meshrun._cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FILLED", raising=False)
    (tmp_path / "t.yaml").write_text("envs: {KEEP: kept, OVER: file, FILLED: null}\n"
                                     "run: echo \"$KEEP $OVER $FILLED\" > env.txt\n")
    assert main(["run", "-b", "local", "t.yaml", "--env", "OVER=cli", "-e", f"FILLED={HOSTILE}"]) == 0
    assert (tmp_path / "env.txt").read_text() == f"kept cli {HOSTILE}\n"
    assert main(["run", "--env", "FILLED=x", "t.yaml", "-b", "local", "--name", "named"]) == 0
    assert (tmp_path / "env.txt").read_text() == "kept file x\n"
    assert main(["run", "-b", "local", "t.yaml"]) == 2  # FILLED is nowhere: refused, naming it


def test_cli_runs_a_pipeline_as_a_chain(tmp_path, monkeypatch, capsys):
    from meshrun._cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("name: pipe\n---\nrun: echo one >> chain.txt\n---\nrun: exit 3\n---\n"
                                     "run: echo three >> chain.txt\n")
    assert main(["run", "-b", "local", "p.yaml"]) == 3
    assert (tmp_path / "chain.txt").read_text() == "one\n"  # the third never started
    assert "1 task(s) not started" in capsys.readouterr().err
    assert main(["run", "-d", "-b", "local", "p.yaml"]) == 2  # a chain needs meshrun to start each in turn


def test_cli_runs_a_dstack_task(tmp_path, monkeypatch):
    from meshrun._cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FROM_SUBMITTER", "yes")
    (tmp_path / ".dstack.yml").write_text("type: task\nenv: [FROM_SUBMITTER, B=2]\n"
                                          "commands:\n  - echo $FROM_SUBMITTER > d.txt\n  - echo $B >> d.txt\n")
    assert main(["run", ".dstack.yml", "-b", "local"]) == 0
    assert (tmp_path / "d.txt").read_text() == "yes\n2\n"


def test_cli_show_prints_what_meshrun_reads_without_secret_values(tmp_path, monkeypatch, capsys):
    from meshrun._cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text("resources: {accelerators: {L4: 1, A10G: 1}}\nsecrets: {TOK: s3cr3t-value}\n"
                                     "run: echo hi\n")
    assert main(["show", "t.yaml"]) == 0
    out = capsys.readouterr().out
    spec = meshrun.JobSpec.from_json(out)
    assert spec.resources.gpu_alternatives == ("L4:1", "A10G:1") and spec.secrets == {"TOK": None}
    assert "s3cr3t-value" not in out
    assert main(["show", "--native", "-b", "local", "t.yaml"]) == 2  # the local backend has nothing to show


def test_a_command_line_resource_replaces_what_the_file_kept_for_its_tool():
    from meshrun._cli import _override
    from meshrun._dstackyaml import spec_from_dstack_config

    sky = spec_from_task_config({"run": "x", "resources": {"accelerators": {"L4": 1, "A10G": 1}, "cpus": 8,
                                                          "infra": "aws"}})
    got = _override(sky, {"gpus": "H100:2"})
    assert got.resources.gpu_request == "H100:2" and got.resources.gpu_alternatives == ()
    assert got.options_for("skypilot") == {"cpus": "8", "infra": "aws"}  # the candidates are gone, not the rest
    assert _override(sky, {"memory": "8GiB"}).options_for("skypilot")["accelerators"] == {"L4": 1, "A10G": 1}
    # an instance type names its own GPUs: a new GPU request replaces it too
    inst = spec_from_task_config({"run": "x", "resources": {"instance_type": "p4d.24xlarge", "infra": "aws"}})
    assert _override(inst, {"gpus": "H100:8"}).options_for("skypilot") == {"infra": "aws"}
    dst = spec_from_dstack_config({"type": "task", "commands": ["x"], "resources": {"gpu": "A100:2"}})
    assert "resources" not in _override(dst, {"cpus": 4}).options_for("dstack")
    assert _override(dst, {"name": "n"}).options_for("dstack")["resources"] == {"gpu": "A100:2"}
