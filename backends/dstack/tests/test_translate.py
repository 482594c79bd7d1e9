"""The JobSpec -> dstack task translation, checked against dstack's own models (the `dstack` package):
what dstack would reject is caught here, before a submit, and what it accepts means what the spec says.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshrun
from meshrun_dstack import _translate as tr

RunSpec = pytest.importorskip("dstack._internal.core.models.runs").RunSpec
from dstack._internal.utils.interpolator import VariablesInterpolator  # noqa: E402

HOSTILE = [
    "plain",
    "",
    "it's \"quoted\" and `backticked`",
    "$HOME and ${HOME} and $(id) and $((1+1))",
    "$$ double dollars $$$",
    "${{ secrets.token }}",
    "${{ groups[0].nodes[0].IP_ADDRESS }}",
    "$${{ already escaped }}",
    "trailing dollar $",
    "new\nline\tand tab",
    "ends with &",
    "; rm -rf / #",
    "&& false",
    "ünïcödé ✓ 名前",
    "-n",
    "*",
    "a\\b\\\\c",
]


def spec(**kw):
    kw.setdefault("command", ["python", "train.py"])
    return meshrun.JobSpec(**kw)


def translate(s, *, function_command=None, offer=None, job_id="abc123"):
    opts = tr.parse_options(s)
    conf = tr.task_configuration(s, job_id=job_id, name=tr.run_name(job_id), options=opts,
                                 function_command=function_command, offer=offer)
    return conf, RunSpec.model_validate(tr.run_spec(conf))


def dstack_joined(commands):
    """How dstack's server turns a task's commands into one shell script (JobConfigurator._commands)."""
    out = []
    for c in commands:
        c = c.strip()
        if c.endswith("&"):
            c = "{ %s }" % c
        out.append(c)
    return " && ".join(out)


def interpolated_env(env):
    """The environment as dstack's server hands it to the job (secrets interpolation, no secrets)."""
    interp = VariablesInterpolator({"secrets": {}})
    return {k: interp.interpolate_or_error(v) for k, v in env.items()}


# ---- run names ------------------------------------------------------------------------------------


def test_run_name_of_a_meshrun_job_id_is_plain():
    assert tr.run_name("16802as03m3g") == "meshrun-16802as03m3g"
    assert tr.run_name("16802as03m3g", 2) == "meshrun-16802as03m3g-r2"


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=80), st.integers(min_value=1, max_value=1000))
def test_run_names_are_always_valid_and_deterministic(job_id, attempt):
    name = tr.run_name(job_id, attempt)
    assert tr.RUN_NAME_RE.match(name), name
    assert name == tr.run_name(job_id, attempt)


def test_different_odd_ids_get_different_names():
    names = {tr.run_name(x) for x in ["A_B", "a-b", "a b", "a.b", "A.B", "x" * 60, "x" * 61]}
    assert len(names) == 7


# ---- resources --------------------------------------------------------------------------------------


def test_cpu_job_asks_for_no_gpu_and_at_least_its_cpus_memory_disk():
    conf, rs = translate(spec(cpus=2.5, memory="16GiB", disk="100GiB"))
    res = rs.configuration.resources
    assert (res.gpu.count.min, res.gpu.count.max) == (0, 0)
    assert res.cpu.count.min == 3 and res.cpu.count.max is None
    assert res.memory.min == 16.0 and res.memory.max is None
    assert res.disk.size.min == 100.0
    assert rs.configuration.nodes is None


def test_gpu_type_count_and_memory():
    _, rs = translate(spec(gpus="H100:8", gpu_memory="80GiB", nodes=4))
    gpu = rs.configuration.resources.gpu
    assert gpu.name == ["H100"] and (gpu.count.min, gpu.count.max) == (8, 8)
    assert gpu.memory.min == 80.0
    assert rs.configuration.nodes == 4


def test_gpu_type_with_memory_in_its_name():
    _, rs = translate(spec(gpus="A100-80GB:2"))
    gpu = rs.configuration.resources.gpu
    assert gpu.name == ["A100"] and gpu.memory.min == 80.0


def test_gpu_without_type():
    _, rs = translate(spec(gpus=1))
    gpu = rs.configuration.resources.gpu
    assert gpu.name is None and (gpu.count.min, gpu.count.max) == (1, 1)


def test_time_limit_spot_price_retry_and_placement_options():
    _, rs = translate(spec(time_limit="2h", backend_options={"dstack": {
        "spot_policy": "auto", "max_price": 2.5, "retry": "4h", "regions": ["us-east-1"],
        "backends": ["aws"], "fleets": ["my-fleet"], "shm_size": "8GB", "priority": 50,
        "working_dir": "/workspace", "idle_duration": "1h", "image": "python:3.12-slim",
    }}))
    c, p = rs.configuration, rs.merged_profile
    assert c.max_duration == 7200
    assert p.spot_policy.value == "auto" and p.max_price == 2.5
    assert [e.value for e in p.retry.on_events] == ["no-capacity"] and p.retry.duration == 4 * 3600
    assert c.regions == ["us-east-1"] and [b.value for b in c.backends] == ["aws"]
    assert c.resources.shm_size == 8.0 and c.priority == 50
    assert c.working_dir == "/workspace" and c.image == "python:3.12-slim"


def test_retry_true_means_retry_on_no_capacity_without_a_limit():
    _, rs = translate(spec(backend_options={"dstack": {"retry": True}}))
    assert [e.value for e in rs.merged_profile.retry.on_events] == ["no-capacity"]
    _, rs = translate(spec(backend_options={"dstack": {"retry": True, "retry_on": ["no-capacity", "interruption"]}}))
    assert [e.value for e in rs.merged_profile.retry.on_events] == ["no-capacity", "interruption"]


def test_chosen_offer_pins_spot_backend_and_region():
    offer = meshrun.Offer(backend="dstack", where="aws/us-west-2", spot=True, region="us-west-2",
                          instance_type="g5.xlarge", detail={"dstack_backend": "aws"})
    conf, rs = translate(spec(gpus=1), offer=offer)
    assert conf["spot_policy"] == "spot" and conf["backends"] == ["aws"] and conf["regions"] == ["us-west-2"]
    conf, _ = translate(spec(gpus=1, backend_options={"dstack": {"pin_offer": False}}), offer=offer)
    assert "backends" not in conf and "spot_policy" not in conf


def test_function_job_gets_the_submitters_python():
    fn_spec = meshrun.JobSpec(function="os:getcwd")
    conf, rs = translate(fn_spec, function_command="sh -c 'true' meshrun-task /tmp/x")
    assert rs.configuration.python.value == "%d.%d" % sys.version_info[:2]
    assert conf["commands"][-1] == "sh -c 'true' meshrun-task /tmp/x"


# ---- options are checked, naming the field ------------------------------------------------------------


def test_unknown_option_is_named_with_the_valid_ones():
    with pytest.raises(meshrun.SpecError) as e:
        translate(spec(backend_options={"dstack": {"spot": True}}))
    assert e.value.field == "backend_options.dstack.spot"
    assert "spot_policy" in str(e.value) and "max_price" in str(e.value)


@pytest.mark.parametrize("opts,field", [
    ({"spot_policy": "cheap"}, "spot_policy"),
    ({"max_price": -1}, "max_price"),
    ({"retry": "soon"}, "retry"),
    ({"retry_on": ["fire"]}, "retry_on"),
    ({"python": "2.7"}, "python"),
    ({"working_dir": "relative"}, "working_dir"),
    ({"priority": 1000}, "priority"),
])
def test_bad_option_values_name_the_field(opts, field):
    with pytest.raises(meshrun.SpecError) as e:
        translate(spec(backend_options={"dstack": opts}))
    assert e.value.field == f"backend_options.dstack.{field}"


@pytest.mark.parametrize("opts,where", [
    ({"shm_size": "lots"}, "shm_size"),
    ({"volumes": [{"name": "v"}]}, "volumes"),
    ({"user": "a:b:c"}, "user"),
    ({"image": "python:3.12", "python": "3.12"}, "python"),
])
def test_what_dstack_rejects_is_caught_before_submit(opts, where, monkeypatch):
    """dstack's own models reject these; the backend says so before sending anything (the server
    configured here does not exist: nothing is sent)."""
    monkeypatch.setenv("MESHRUN_DSTACK_ENDPOINT", "http://127.0.0.1:9")
    meshrun.configure()
    b = meshrun.get_backend("dstack")
    with pytest.raises(meshrun.SpecError) as e:
        b.offers(spec(backend_options={"dstack": opts}))
    assert where in e.value.field or where in str(e.value)


def test_unconfigured_backend_offers_nothing_and_says_why():
    [o] = meshrun.get_backend("dstack").offers(spec())
    assert not o.fits and "no dstack server configured" in o.reason


def test_validate_with_dstack_names_dstacks_field():
    conf, _ = translate(spec())
    conf["resources"]["gpu"] = {"count": {"min": 3, "max": 1}}
    with pytest.raises(meshrun.SpecError) as e:
        tr.validate_with_dstack(tr.run_spec(conf))
    assert e.value.field.startswith("dstack.configuration") and "range" in str(e.value).lower()
    conf, _ = translate(spec())
    conf["name"] = "Not_Valid"
    with pytest.raises(meshrun.SpecError) as e:
        tr.validate_with_dstack(tr.run_spec(conf))
    assert e.value.field == "dstack.run_name"


# ---- hostile text reaches the task unchanged ------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE)
def test_env_values_survive_dstacks_interpolation(value):
    s = spec(env={"V": value})
    conf, rs = translate(s)
    assert interpolated_env(rs.configuration.env.as_dict())["V"] == value


def test_name_and_job_id_reach_the_task():
    s = spec(name="my 'job' $x ${{ secrets.y }}")
    conf, rs = translate(s)
    env = interpolated_env(rs.configuration.env.as_dict())
    assert env["MESHRUN_JOB_NAME"] == "my 'job' $x ${{ secrets.y }}" and env["MESHRUN_JOB_ID"] == "abc123"


def _run_task_locally(conf, shell, tmp_path):
    """Run a task's commands the way dstack's container does: ``<shell> -i -c <joined>`` with the job's env."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    env.update(interpolated_env(conf["env"]))
    p = subprocess.run([shell, "-i", "-c", dstack_joined(conf["commands"])], env=env, capture_output=True,
                       text=True, cwd=tmp_path, timeout=60)
    return p


PRINT_ARGV = [sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))"]


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_argv_reaches_the_program_unchanged(shell, tmp_path):
    s = spec(command=PRINT_ARGV + HOSTILE)
    conf, _ = translate(s)
    p = _run_task_locally(conf, shell, tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == HOSTILE


def test_a_command_string_is_run_by_bash_and_setup_runs_first(tmp_path):
    s = spec(command='echo "string: $V" && printf "%s\\n" "$NODE_RANK/$NNODES/$WORLD_SIZE"',
             setup=["echo setup one > order.txt", "echo 'setup two' >> order.txt"],
             env={"V": "${{ secrets.nope }} $$"})
    conf, _ = translate(s)
    p = _run_task_locally(conf, "/bin/sh", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "string: ${{ secrets.nope }} $$" in p.stdout
    assert "0/1/1" in p.stdout
    assert (tmp_path / "order.txt").read_text() == "setup one\nsetup two\n"


def test_a_failing_setup_stops_the_task(tmp_path):
    conf, _ = translate(spec(command=["sh", "-c", "echo ran"], setup=["exit 3"]))
    p = _run_task_locally(conf, "/bin/bash", tmp_path)
    assert p.returncode == 3 and "ran" not in p.stdout


def test_commands_with_dstack_references_travel_in_the_environment(tmp_path):
    args = ["${{ groups[0].nodes[1].IP_ADDRESS }}", "${{ secrets.x }}"]
    conf, rs = translate(spec(command=PRINT_ARGV + args))
    assert not any("${{" in c for c in conf["commands"])
    assert tr.COMMAND_ENV in conf["env"]
    p = _run_task_locally(conf, "/bin/sh", tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == args


def test_exit_code_of_the_command_is_the_tasks(tmp_path):
    conf, _ = translate(spec(command=["sh", "-c", "exit 7"]))
    assert _run_task_locally(conf, "/bin/bash", tmp_path).returncode == 7


def test_multi_node_contract_from_dstacks_variables(tmp_path):
    conf, _ = translate(spec(command=["sh", "-c", 'echo "$MASTER_ADDR $NNODES $NODE_RANK $GPUS_PER_NODE $NPROC_PER_NODE $WORLD_SIZE"'],
                             nodes=2, gpus=4))
    conf["env"].update({"DSTACK_NODES_NUM": "2", "DSTACK_NODE_RANK": "1", "DSTACK_MASTER_NODE_IP": "10.0.0.5",
                        "DSTACK_GPUS_PER_NODE": "4"})
    p = _run_task_locally(conf, "/bin/sh", tmp_path)
    assert p.stdout.strip().splitlines()[-1] == "10.0.0.5 2 1 4 4 8"
    from meshrun import check_dist_env  # the same contract as every other backend

    env = dict(zip(["MASTER_ADDR", "NNODES", "NODE_RANK", "GPUS_PER_NODE", "NPROC_PER_NODE", "WORLD_SIZE"],
                   p.stdout.strip().splitlines()[-1].split()))
    assert check_dist_env({**env, "MASTER_PORT": "29500"}) == []


def test_shlex_quoting_is_what_is_sent():
    conf, _ = translate(spec(command=["echo", "a b"]))
    assert conf["commands"][-1] == shlex.join(["echo", "a b"])


# ---- dstack task files read by meshrun (tests/data/jobfiles/dstack) go back to dstack intact -------------

_JOBFILES = __import__("pathlib").Path(__file__).resolve().parents[3] / "tests" / "data" / "jobfiles" / "dstack"


@pytest.mark.parametrize("path", sorted(_JOBFILES.glob("*.dstack.y*ml")), ids=lambda p: p.name)
def test_an_imported_dstack_task_translates_back_into_a_valid_run_spec(path, monkeypatch):
    import yaml

    from meshrun._dstackyaml import spec_from_dstack_config

    doc = yaml.safe_load(path.read_text())
    names = [e for e in doc.get("env") or [] if isinstance(e, str) and "=" not in e]
    try:
        s = spec_from_dstack_config(doc, base_dir=str(path.parent), env={n: "x" for n in names})
    except meshrun.SpecError as e:
        assert e.field in ("ports", "nvcc", "resources.gpu"), e  # refused by name: tests/test_jobfiles.py
        return
    conf, rs = translate(s)
    assert conf["commands"][-1] == tr.user_commands(s)[-1]
    ours = {k: v for k, v in rs.configuration.model_dump().items() if k in ("python", "spot_policy", "image")}
    theirs = RunSpec.model_validate({"configuration": doc}).configuration.model_dump()
    for k, v in ours.items():
        assert v == theirs[k], k
    assert rs.configuration.resources == RunSpec.model_validate(
        {"configuration": {**doc, "env": {}}}).configuration.resources  # dstack reads its own section back


def test_show_native_prints_the_run_spec(tmp_path, monkeypatch, capsys):
    import yaml

    from meshrun._cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dstack.yml").write_text("type: task\ncommands: [python train.py]\nresources: {gpu: A100:2}\n")
    assert main(["show", "--native", "-b", "dstack", ".dstack.yml"]) == 0
    rs = RunSpec.model_validate(yaml.safe_load(capsys.readouterr().out))
    assert rs.configuration.resources.gpu.count.min == 2 and rs.configuration.resources.gpu.name == ["A100"]


def test_an_imported_retry_is_what_dstack_reads():
    from meshrun._dstackyaml import spec_from_dstack_config

    doc = {"type": "task", "commands": ["x"], "retry": {"on_events": ["no-capacity", "error"], "duration": "1h"}}
    conf, rs = translate(spec_from_dstack_config(doc))
    theirs = RunSpec.model_validate({"configuration": doc}).configuration.retry
    assert rs.configuration.retry == theirs


# ---- a job with object-store inputs/outputs ---------------------------------------------------------------

DATA_SECRETS = {"AWS_ACCESS_KEY_ID": "s3_key", "AWS_SECRET_ACCESS_KEY": "s3_secret", "AWS_ENDPOINT_URL": "s3_endpoint"}
GOLDEN = __import__("pathlib").Path(__file__).resolve().parent / "golden"


def data_conf(s, **cfg):
    from meshrun_dstack import DstackBackend

    b = DstackBackend({"remote_dir": "/tmp/meshrun", "data_secrets": DATA_SECRETS, **cfg})
    conf = b._configuration(s, job_id="abc123", name=tr.run_name("abc123"), options=tr.parse_options(s),
                            nonce="n0nce")
    return conf, RunSpec.model_validate(tr.run_spec(conf))


def test_a_data_job_runs_under_the_agent_with_its_credentials_as_dstack_secret_references():
    s = spec(command=["python", "train.py"], time_limit=600, env={"V": "${{ secrets.s3_key }} $x"},
             inputs={"s3://lab-data/imagenet/": "data/"}, outputs={"ckpt/": "s3://lab-ckpt/run-17/"})
    conf, rs = data_conf(s)
    path = GOLDEN / "task-data.json"
    got = {"commands": conf["commands"], "env": conf["env"]}
    if os.environ.get("MESHRUN_UPDATE_GOLDEN") or not path.exists():
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert json.loads(path.read_text()) == got
    # the references are dstack's, filled in from the project's secrets when the job starts; the spec's own
    # value that looks like one reaches the task as written
    assert conf["env"]["AWS_SECRET_ACCESS_KEY"] == "${{ secrets.s3_secret }}"
    interp = VariablesInterpolator({"secrets": {"s3_key": "AK", "s3_secret": "SK", "s3_endpoint": "http://s3:9"}})
    env = {k: interp.interpolate_or_error(v) for k, v in rs.configuration.env.as_dict().items()}
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_ENDPOINT_URL"]) == ("AK", "SK",
                                                                                                   "http://s3:9")
    assert env["V"] == "${{ secrets.s3_key }} $x"
    # the agent keeps the time limit from when the inputs are in place: no max_duration; no Python pinned
    assert "max_duration" not in conf and "python" not in conf
    assert len(conf["commands"]) == 1 and "_agent.py" in conf["commands"][0] and "import boto3" in conf["commands"][0]
    # a job without data gets no references, and install_boto3 = false leaves the install out
    plain, _ = data_conf(spec(command=["true"]))
    assert not [v for v in plain["env"].values() if "secrets." in v and "$$" not in v]
    conf2, _ = data_conf(s, install_boto3=False)
    assert "boto3" not in conf2["commands"][0]


@pytest.mark.parametrize("table, words", [
    ({"AWS-KEY": "s3_key"}, "not an environment variable name"),
    ({"AWS_ACCESS_KEY_ID": "s3-key"}, "not a secret name"),
    ({"AWS_ACCESS_KEY_ID": "}} ${{ x"}, "not a secret name"),
    ("[1]", "table"),
])
def test_data_secrets_are_checked(table, words):
    from meshrun_dstack import DstackBackend

    with pytest.raises(meshrun.ConfigError) as e:
        DstackBackend({"data_secrets": table}).settings
    assert "data_secrets" in str(e.value) and words in str(e.value)
