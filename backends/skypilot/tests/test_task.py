"""Spec <-> SkyPilot task: the mapping, checked by SkyPilot's own validation, and meshrun's run script.

No API server and no cluster here: SkyPilot validates the task YAML itself (``sky.Task.from_yaml_config``
runs its schema, ``sky.Resources`` its resource checks); the run script is executed by bash on this machine
with the variables SkyPilot sets on each node.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest

import meshrun
import meshrun.backend as mb
from meshrun._taskyaml import spec_from_task_config

from meshrun_skypilot import _task

GOLDEN = Path(__file__).resolve().parent / "golden"
HOSTILE = "a'b\"c $(touch /tmp/pwned) `id` ${HOME} \\ \n\t; | & > <  ünïcødé \u2028 end"


def _roundtrip_config(cfg: dict) -> dict:
    """config -> sky.Task (SkyPilot's schema validation) -> the config SkyPilot writes back."""
    task = _task.build_task(cfg)
    return task.to_yaml_config()


def test_import_does_not_import_sky():
    code = "import sys, meshrun, meshrun_skypilot; meshrun_skypilot.SkyPilotBackend; print('sky' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_spec_to_task_and_back_with_hostile_strings(tmp_path, sky_home):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "data.txt").write_text("x")
    spec = meshrun.JobSpec(
        name="train run",
        command=f"python train.py --msg {HOSTILE!r}\necho '{HOSTILE}'",
        gpus="H100:8", cpus=16, memory="64GiB", disk="200GiB", nodes=2,
        env={"WEIRD": HOSTILE, "EMPTY": "", "NUM": "3"},
        workdir=str(work), files={"/data/data.txt": str(tmp_path / "data.txt")},
        setup=["pip install -r requirements.txt"],
        backend_options={"skypilot": {"infra": "lambda/us-east-1", "use_spot": True, "ports": [8080]}},
    )
    cfg = _task.task_config(spec)
    assert cfg["resources"]["accelerators"] == "H100:8"
    assert cfg["resources"]["cpus"] == "16+" and cfg["resources"]["memory"] == "64+"
    assert cfg["resources"]["disk_size"] == 200 and cfg["num_nodes"] == 2
    back = _roundtrip_config(cfg)  # SkyPilot accepts it ...
    assert back["envs"] == spec.env  # ... and keeps the hostile strings byte for byte
    assert back["run"] == spec.command
    assert back["resources"]["use_spot"] is True
    assert back["resources"]["accelerators"] == {"H100": 8}
    again = spec_from_task_config(back)  # ... and meshrun reads SkyPilot's YAML back into the same spec
    for field in ("name", "command", "env", "workdir", "files", "setup", "resources"):
        assert getattr(again, field) == getattr(spec, field), field
    assert again.options_for("skypilot")["infra"] == "lambda/us-east-1"
    assert again.options_for("skypilot")["use_spot"] is True


def test_command_list_becomes_a_quoted_run(sky_home):
    spec = meshrun.JobSpec(command=["printf", "%s|", "a b", "$(x)", "'q'"], env={"K": "v"})
    cfg = _task.task_config(spec)
    back = _roundtrip_config(cfg)
    out = subprocess.run(["bash", "-c", back["run"]], capture_output=True, text=True).stdout
    assert out == "a b|$(x)|'q'|"


def test_yaml_file_to_spec_to_task(tmp_path, sky_home, monkeypatch):
    monkeypatch.setenv("TOKEN_FROM_ENV", HOSTILE)
    monkeypatch.chdir(tmp_path)  # relative paths are from the current directory, as SkyPilot reads them
    (tmp_path / "code").mkdir()
    y = tmp_path / "task.yaml"
    y.write_text(
        "name: sft\n"
        "workdir: ./code\n"
        "num_nodes: 2\n"
        "resources:\n"
        "  infra: nebius\n"
        "  accelerators: H200:8\n"
        "  cpus: 32+\n"
        "  memory: 256+\n"
        "  disk_size: 512\n"
        "  use_spot: true\n"
        "  job_recovery: {strategy: FAILOVER, max_restarts_on_errors: 2}\n"
        "envs:\n"
        "  MODEL: llama\n"
        "  TOKEN_FROM_ENV: null\n"
        "file_mounts:\n"
        "  /data: s3://bucket/data\n"
        "setup: |\n"
        "  pip install torch\n"
        "run: |\n"
        "  torchrun --nnodes=$SKYPILOT_NUM_NODES --node_rank=$SKYPILOT_NODE_RANK train.py\n"
    )
    spec = meshrun.JobSpec.from_skypilot_yaml(y)
    assert spec.resources.gpus == 8 and spec.resources.gpu_type == "H200" and spec.nodes == 2
    assert spec.env["TOKEN_FROM_ENV"] == HOSTILE
    opts = spec.options_for("skypilot")
    assert opts["infra"] == "nebius" and opts["use_spot"] is True and opts["job_recovery"]["strategy"] == "FAILOVER"
    assert opts["task"]["file_mounts"] == {"/data": "s3://bucket/data"}
    cfg = _task.task_config(spec)
    back = _roundtrip_config(cfg)
    assert back["run"].startswith("torchrun") and back["setup"] == "pip install torch\n"
    assert back["file_mounts"]["/data"] == "s3://bucket/data"
    assert back["resources"]["job_recovery"]["max_restarts_on_errors"] == 2


def test_build_task_leaves_its_config_alone(sky_home):
    cfg = {"run": "x", "resources": {"gpus": "A10:1", "any_of": [{"infra": "aws"}, {"infra": "gcp"}]},
           "envs": {"A": "1"}, "secrets": {"S": "v"}}
    before = json.loads(json.dumps(cfg))
    first = _task.build_task(cfg)
    assert cfg == before
    second = _task.build_task(cfg)
    assert [r.accelerators for r in first.resources] == [r.accelerators for r in second.resources]


def test_gpu_candidates_and_fractions_reach_skypilot_unchanged(sky_home):
    """A candidate set or fraction stays SkyPilot's to choose from: the task equals SkyPilot's own parse."""
    for res in ({"accelerators": {"L4": 1, "A10G": 1}}, {"accelerators": "T4:0.5"},
                {"ordered": [{"accelerators": "A100:1", "infra": "aws"}, {"accelerators": "H100:1"}]},
                {"gpus": {"A10:1": None}},
                {"accelerators": "H100:1", "any_of": [{"accelerators": "A100:1"}, {"infra": "gcp"}]}):
        cfg = {"run": "x", "resources": res}
        spec = spec_from_task_config(cfg)
        assert spec.resources.gpus >= 1
        ours = sorted(str(r) for r in _task.build_task(_task.task_config(spec)).resources)
        theirs = sorted(str(r) for r in _task.build_task(cfg).resources)
        assert ours == theirs, res


def test_secrets_stay_skypilot_secrets(sky_home, meshrun_home, tmp_path, monkeypatch):
    monkeypatch.setenv("FROM_ENV", "env-secret-value")
    spec = meshrun.JobSpec(command="echo hi", gpus="L4:1", secrets={"TOKEN": "inline-secret-value", "FROM_ENV": None})
    assert _task.task_config(spec)["secrets"] == {"TOKEN": None, "FROM_ENV": None}  # the portable file: names
    from meshrun._scheduler import prepare
    from meshrun._store import get_store

    store = get_store()

    sub = prepare(spec, store=store, backend="skypilot").submission
    cfg = _task.launch_config(sub)
    assert cfg["secrets"] == {"TOKEN": "inline-secret-value", "FROM_ENV": "env-secret-value"}
    assert "TOKEN" not in cfg.get("envs", {})
    task = _task.build_task(cfg)
    shown = task._to_yaml_config(redact_secrets=True)  # SkyPilot's redacted view
    assert shown["secrets"] == {"TOKEN": "<redacted>", "FROM_ENV": "<redacted>"} and "envs" not in shown
    assert "secret-value" not in json.dumps(task.to_yaml_config(use_user_specified_yaml=True))
    for p in sub.job_dir.rglob("*"):
        if p.is_file():
            assert b"secret-value" not in p.read_bytes(), p


def test_unknown_option_lists_the_valid_ones():
    spec = meshrun.JobSpec(command="true", backend_options={"skypilot": {"clusterr": "x"}})
    with pytest.raises(meshrun.SpecError) as e:
        _task.task_config(spec)
    assert "backend_options.skypilot.clusterr" in str(e.value) and "infra" in str(e.value) and "keep" in str(e.value)


@pytest.mark.parametrize("opts, field", [
    ({"keep": "yes"}, "keep"),
    ({"cluster": "bad name!"}, "cluster"),
    ({"idle_minutes": -1}, "idle_minutes"),
    ({"task": [1]}, "task"),
])
def test_bad_option_values_name_the_field(opts, field):
    spec = meshrun.JobSpec(command="true", backend_options={"skypilot": opts})
    with pytest.raises(meshrun.SpecError) as e:
        _task.task_config(spec)
    assert f"backend_options.skypilot.{field}" in str(e.value)


@pytest.mark.parametrize("opts", [{"cpus": "lots"}, {"memory": -3}, {"infra": "nocloud/x"}, {"disk_tier": "warp"}])
def test_skypilot_rejects_bad_resources_before_launch(opts, sky_home):
    spec = meshrun.JobSpec(command="true", backend_options={"skypilot": opts})
    with pytest.raises(meshrun.SpecError) as e:
        _task.build_task(_task.task_config(spec))
    assert "SkyPilot rejects the task" in str(e.value)


def test_bad_env_name_is_caught_by_skypilot_schema(sky_home):
    cfg = {"run": "true", "envs": {"1BAD": "x"}}
    with pytest.raises(meshrun.SpecError) as e:
        _task.build_task(cfg)
    assert "1BAD" in str(e.value)


def test_gpus_without_a_model_need_one():
    spec = meshrun.JobSpec(command="true", gpus=2)
    with pytest.raises(meshrun.SpecError) as e:
        _task.task_config(spec)
    assert e.value.field == "gpu_type"


def test_run_script_golden():
    script = _task.run_script(job_id="0123abcdwxyz", bundle_b64="QUJD", python="/opt/py 3/bin/python3",
                              nonce="f" * 32, cloudpickle_version="3.1.3")
    GOLDEN.mkdir(exist_ok=True)
    golden = GOLDEN / "run_script.sh"
    if os.environ.get("UPDATE_GOLDEN") or not golden.exists():
        golden.write_text(script)
    assert script == golden.read_text()
    subprocess.run(["bash", "-n", "-c", script], check=True)


def test_the_log_is_cleaned_of_records_start_line_and_colours():
    from meshrun import _agent

    frame = _agent.frame_records("n0nce", "job1", 0, {"exit.json": b"{}"})
    text = "\x1b[36m(head)\x1b[0m hello\n" + f"{_task.START_MARK}job1::\n" + frame + "bye\n"
    assert _task.clean_log(text) == "(head) hello\nbye\n"
    assert mb.extract_records(text, "n0nce") == {"exit.json": b"{}"}


def records(out, sub, rank=0):
    return mb.extract_records(out, mb.records_nonce(sub.job_dir, create=False), rank)


# ---- the run script, executed here as SkyPilot would on each node ---------------------------------------


def _submission(spec, meshrun_home):
    from meshrun._scheduler import prepare
    from meshrun._store import get_store

    return prepare(spec, store=get_store(), backend="skypilot").submission


def _run_node(script: str, home: Path, rank: int, nnodes: int, cwd: Path, extra=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "MASTER_", "NODE_RANK", "NNODES"))}
    env.update(HOME=str(home), SKYPILOT_NODE_RANK=str(rank), SKYPILOT_NUM_NODES=str(nnodes),
               SKYPILOT_NODE_IPS="\n".join(f"10.9.0.{i + 1}" for i in range(nnodes)), SKYPILOT_NUM_GPUS_PER_NODE="0")
    env.update(extra or {})
    return subprocess.Popen(["bash", "-c", script], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_run_script_runs_a_two_node_command_under_the_agent(tmp_path, meshrun_home):
    spec = meshrun.JobSpec(command="echo rank=$NODE_RANK of=$NNODES addr=$MASTER_ADDR:$MASTER_PORT ws=$WORLD_SIZE "
                           "gpn=$GPUS_PER_NODE; printf '%s' \"$WEIRD\" > weird.$NODE_RANK",
                           nodes=2, env={"WEIRD": HOSTILE})
    sub = _submission(spec, meshrun_home)
    cfg = _task.launch_config(sub, python=sys.executable, master_port=29555)
    node_home, cwd = tmp_path / "node", tmp_path / "cwd"
    node_home.mkdir(), cwd.mkdir()
    procs = [_run_node(cfg["run"], node_home, r, 2, cwd) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank=0 of=2 addr=10.9.0.1:29555 ws=2 gpn=0" in outs[0]
    assert "rank=1 of=2 addr=10.9.0.1:29555 ws=2 gpn=0" in outs[1]
    assert (cwd / "weird.0").read_text() == HOSTILE and (cwd / "weird.1").read_text() == HOSTILE
    files = records(outs[0], sub)
    assert json.loads(files["exit.json"])["state"] == "succeeded"
    assert records(outs[1], sub) is None and records(outs[1], sub, rank=1) is not None  # node 0's are the job's
    assert "::meshrun-records:" not in _task.clean_log(outs[0])
    # node 0 says when the job starts (what a follower of the log waits for); the start line is not output
    assert outs[0].count(f"{_task.START_MARK}{sub.job_id}::") == 1 and _task.START_MARK not in outs[1]
    assert _task.START_MARK not in _task.clean_log(outs[0])


def test_log_follower_reads_start_and_records_across_chunk_boundaries(tmp_path, meshrun_home):
    """The follower on the real output of the run script, streamed in odd-sized chunks as SkyPilot's log
    stream may cut it (the transport is a stand-in; the end-to-end tests follow real SkyPilot logs)."""
    from meshrun_skypilot._follow import LogFollower

    sub = _submission(meshrun.JobSpec(command="echo working; exit 3"), meshrun_home)
    cfg = _task.launch_config(sub, python=sys.executable)
    node_home = tmp_path / "node"
    node_home.mkdir()
    p = _run_node(cfg["run"], node_home, 0, 1, tmp_path)
    out = p.communicate(timeout=120)[0]
    assert p.returncode != 0, out
    gate = __import__("threading").Event()

    class Stream:  # sdk.get(request) -> (job id, handle); sdk.tail_logs(...) -> the log in pieces
        def get(self, request_id):
            assert request_id == "req-1"
            return (7, None)

        def tail_logs(self, cluster, job, follow, preload_content):
            assert (cluster, job, follow, preload_content) == ("c1", 7, True, False)
            start = out.index(_task.START_MARK) + 5
            yield "\x1b[36m(task, pid=1)\x1b[0m " + out[:start]
            line_end = out.index("\n", start) + 1
            yield out[start:line_end - 3]
            yield out[line_end - 3:line_end]
            gate.wait(30)  # the job runs: started, not ended
            for i in range(line_end, len(out), 37):
                yield out[i:i + 37]
            yield None

    kept = {}
    f = LogFollower(Stream(), cluster="c1", job_id=sub.job_id, nonce=mb.records_nonce(sub.job_dir), request_id="req-1",
                    on_records=kept.update)
    end = time.monotonic() + 30
    while f.started_at is None and time.monotonic() < end:
        time.sleep(0.01)
    assert f.sky_job == 7 and f.started_at is not None and f.alive and f.files is None
    gate.set()
    assert f.done.wait(30) and f.error is None
    assert json.loads(f.files["exit.json"])["exit_code"] == 3 and kept == f.files
    log = f.files["output.log"].decode()
    assert "working" in log and "::meshrun-records:" not in log and _task.START_MARK not in log and "\x1b" not in log


def test_run_script_returns_a_function_result_and_uses_shipped_cloudpickle(tmp_path, meshrun_home):
    def f(x):
        import cloudpickle
        return {"x": x * 3, "cp": cloudpickle.__file__}

    spec = meshrun.JobSpec(function=f, args=(14,))
    sub = _submission(spec, meshrun_home)
    cfg = _task.launch_config(sub, python=sys.executable)
    _task.build_task(cfg)  # SkyPilot accepts the task meshrun launches
    node_home, cwd = tmp_path / "node", tmp_path / "cwd"
    node_home.mkdir(), cwd.mkdir()
    # a Python without cloudpickle on its path, as on a fresh cluster (and none of this machine's paths):
    # the bundle's copy is used
    sub.launch["sys_path"] = []
    shim = tmp_path / "py"
    shim.write_text(f"#!/bin/bash\nexec {sys.executable} -S \"$@\"\n")
    shim.chmod(0o755)
    cfg = _task.launch_config(sub, python=str(shim))
    p = _run_node(cfg["run"], node_home, 0, 1, cwd)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    files = records(out, sub)
    import pickle

    result = pickle.loads(files["result.pkl"])
    assert result["x"] == 42 and ".meshrun-lib" in result["cp"]


def test_run_script_reports_a_failing_function(tmp_path, meshrun_home):
    def boom():
        raise KeyError("no such thing")

    sub = _submission(meshrun.JobSpec(function=boom), meshrun_home)
    cfg = _task.launch_config(sub, python=sys.executable)
    node_home = tmp_path / "node"
    node_home.mkdir()
    p = _run_node(cfg["run"], node_home, 0, 1, tmp_path)
    out = p.communicate(timeout=120)[0]
    assert p.returncode != 0
    files = records(out, sub)
    assert json.loads(files["error.json"])["type"] == "KeyError"
    assert json.loads(files["exit.json"])["state"] == "failed"


def test_too_large_a_job_is_refused(tmp_path, meshrun_home):
    sub = _submission(meshrun.JobSpec(function=len, args=(os.urandom(64 * 1024),)), meshrun_home)
    with pytest.raises(meshrun.SpecError) as e:
        _task.launch_config(sub, max_inline_bytes=32 * 1024)
    assert "files=" in str(e.value)


def test_show_native_prints_the_task_skypilot_would_get(sky_home, tmp_path, monkeypatch, capsys):
    import yaml

    from meshrun._cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text("resources: {accelerators: {L4: 1, A10G: 1}, memory: 32GB+}\n"
                                     "secrets: {TOK: s3cr3t-value}\nrun: echo hi\n")
    assert main(["show", "--native", "-b", "skypilot", "t.yaml"]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t-value" not in out
    task = yaml.safe_load(out)
    assert task["secrets"] == {"TOK": "<redacted>"}
    assert sorted(json.dumps(r["accelerators"]) for r in task["resources"]["any_of"]) == ['{"A10G": 1}', '{"L4": 1}']


# ---- object-store inputs/outputs: the stager on the node, its variables as SkyPilot secrets ----------------

DATA_VALUES = {"AWS_ACCESS_KEY_ID": "AKIDmeshrundata", "AWS_SECRET_ACCESS_KEY": "data-secret-key-value",
               "AWS_ENDPOINT_URL": "http://s3.example.internal:7777", "AWS_REGION": "auto"}


def _bundle_of(run: str) -> dict[str, bytes]:
    import base64
    import io
    import re
    import tarfile

    b64 = re.search(r"printf '%s' '([A-Za-z0-9+/=]*)'", run).group(1)
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(b64)), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_a_job_with_data_gets_the_stagers_variables_as_secrets_written_nowhere(sky_home, meshrun_home,
                                                                               monkeypatch):
    from meshrun.testing import files_holding
    from meshrun_skypilot import SkyPilotBackend

    for k in _task.DATA_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in DATA_VALUES.items():
        monkeypatch.setenv(k, v)
    spec = meshrun.JobSpec(command="true", inputs={"s3://lab-data/in/": "data/"},
                           outputs={"out/": "s3://lab-data/out/"}, env={"AWS_REGION": "eu-west-1"},
                           secrets={"TOKEN": "tok-secret-value"})
    sub = _submission(spec, meshrun_home)
    cfg = _task.launch_config(sub)
    # the variables that are set, as SkyPilot secrets; the spec's own env wins (AWS_REGION stays an env)
    assert cfg["secrets"] == {"AWS_ACCESS_KEY_ID": "AKIDmeshrundata", "AWS_SECRET_ACCESS_KEY": "data-secret-key-value",
                              "AWS_ENDPOINT_URL": "http://s3.example.internal:7777", "TOKEN": "tok-secret-value"}
    assert cfg["envs"] == {"AWS_REGION": "eu-west-1"}
    # the stager travels in the bundle, with launch.json's data section (URLs and paths only)
    files = _bundle_of(cfg["run"])
    assert files["stage.py"] == (Path(meshrun.__file__).parent / "_stage.py").read_bytes()
    assert json.loads(files["launch.json"])["data"]["inputs"] == [{"source": "s3://lab-data/in/", "path": "data/"}]
    needles = ["AKIDmeshrundata", "data-secret-key-value", "s3.example.internal", "tok-secret-value"]
    assert [n for n in needles if n.encode() in b"".join(files.values()) or n in cfg["run"]] == []
    # SkyPilot's redacted view and the task `meshrun show --native` prints hold none of the values
    shown = _task.build_task(cfg)._to_yaml_config(redact_secrets=True)
    assert set(shown["secrets"].values()) == {"<redacted>"} and len(shown["secrets"]) == 4
    native = SkyPilotBackend({}).native(sub)
    assert [n for n in needles if n in native] == []
    # nothing in the job store (the job folder: spec.json, launch.json, stage.py, ...)
    assert files_holding(meshrun_home, needles) == []

    # the setting names the variables: none forwarded with []; a job that moves no data gets none
    assert _task.launch_config(sub, data_env=[])["secrets"] == {"TOKEN": "tok-secret-value"}
    assert _task.launch_config(sub, data_env=["AWS_REGION", "AWS_PROFILE"])["secrets"] == {"TOKEN": "tok-secret-value"}
    plain = _task.launch_config(_submission(meshrun.JobSpec(command="true"), meshrun_home))
    assert "secrets" not in plain and "stage.py" not in _bundle_of(plain["run"])


def test_data_env_setting_takes_names_only():
    from meshrun_skypilot._backend import SkyPilotSettings

    assert SkyPilotSettings().data_env == list(_task.DATA_ENV)
    got = SkyPilotSettings.load("skypilot", {"data_env": "AWS_PROFILE, AWS_CONFIG_FILE"})  # MESHRUN_SKYPILOT_DATA_ENV
    assert got.data_env == ["AWS_PROFILE", "AWS_CONFIG_FILE"]
    assert SkyPilotSettings.load("skypilot", {"data_env": ""}).data_env == []
    with pytest.raises(meshrun.ConfigError) as e:
        SkyPilotSettings.load("skypilot", {"data_env": ["AWS_PROFILE=x"]})
    assert "data_env" in str(e.value) and "AWS_PROFILE=x" in str(e.value)


def test_the_portable_task_has_no_field_for_inputs_and_outputs():
    spec = meshrun.JobSpec(command="true", outputs={"out/": "s3://lab-data/out/"})
    with pytest.raises(meshrun.SpecError) as e:
        _task.task_config(spec)
    assert e.value.field == "outputs" and "stager" in str(e.value)
