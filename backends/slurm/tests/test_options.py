"""backend_options["slurm"] and [backends.slurm] are validated: errors name the field and what is allowed."""

from __future__ import annotations

import pytest

import meshrun
from meshrun_slurm._options import job_options, load_settings


def test_unknown_job_option_lists_the_valid_ones():
    with pytest.raises(meshrun.SpecError) as e:
        job_options({"partiton": "gpu"})
    assert e.value.field == "backend_options.slurm.partiton"
    assert "partition" in str(e.value) and "account" in str(e.value)


@pytest.mark.parametrize("key,value,word", [
    ("partition", "gpu; rm -rf /", "Slurm name"),
    ("partition", "a b", "Slurm name"),
    ("account", "$(id)", "Slurm name"),
    ("qos", "", "Slurm name"),
    ("constraint", "a\nb", "one line"),
    ("constraint", "x hetjob y", "hetjob"),
    ("sbatch", "--exclusive", "list"),
    ("sbatch", ["--job-name=evil"], "meshrun sets itself"),
    ("sbatch", ["--out=/tmp/x"], "meshrun sets itself"),
    ("sbatch", ["-J", "x"], "meshrun sets itself"),
    ("sbatch", ["-Jx"], "meshrun sets itself"),
    ("sbatch", ["--array=1-3"], "meshrun sets itself"),
    ("sbatch", ["exclusive"], "starting with '-'"),
    ("sbatch", ["--comment=a\nb"], "one line"),
    ("sbatch", ["--comment=packjob"], "packjob"),
    ("array_parallelism", 0, "at least 1"),
    ("array_parallelism", True, "at least 1"),
    ("time", "soon", "duration"),
    ("time", 30, "unit"),
    ("time", "30", "unit"),
    ("exclusive", "yes", "true or false"),
    ("nodelist", "node1;reboot", "node list"),
    ("gpus_flag", "gpus", "gres"),
])
def test_bad_values_name_the_field(key, value, word):
    with pytest.raises(meshrun.SpecError) as e:
        job_options({key: value})
    assert e.value.field == f"backend_options.slurm.{key}"
    assert word in str(e.value)


def test_good_options():
    o = job_options({"partition": "gpu,gpu-long", "account": "lab", "qos": "normal", "constraint": "a100&ib",
                     "reservation": "r1", "sbatch": ["--exclusive", "--mail-type=END"], "array_parallelism": "4",
                     "time": "1h30m", "exclusive": True, "nodelist": "node[1-2]", "gpus_flag": "gpus-per-node"})
    assert o.partition == "gpu,gpu-long" and o.array_parallelism == 4 and o.time == "01:30:00"
    assert o.sbatch == ("--exclusive", "--mail-type=END")


def test_settings_defaults_merge_under_job_options():
    s = load_settings({"partition": "cpu", "account": "lab", "sbatch": ["--mail-type=END"]})
    o = job_options({"partition": "gpu", "sbatch": ["--exclusive"]}, s)
    assert o.partition == "gpu" and o.account == "lab"
    assert o.sbatch == ("--mail-type=END", "--exclusive")


def test_unknown_setting_lists_the_valid_ones():
    with pytest.raises(meshrun.ConfigError) as e:
        load_settings({"partion": "x"})
    assert "backends.slurm.partion" in str(e.value) and "partition" in str(e.value)


@pytest.mark.parametrize("key,value", [("api", "grpc"), ("partition", "a b"), ("query_interval", -1),
                                       ("price_per_gpu_hour", "cheap"), ("endpoint", "ftp://x"),
                                       ("sbatch", ["--wrap=x"])])
def test_bad_settings(key, value):
    with pytest.raises(meshrun.ConfigError) as e:
        load_settings({key: value})
    assert f"backends.slurm.{key}" in str(e.value)


def test_token_never_in_repr():
    s = load_settings({"api": "rest", "endpoint": "http://127.0.0.1:6820", "token": "sekret-token"})
    assert "sekret" not in repr(s) and "sekret" not in str(s)


def test_old_setting_names_warn_and_still_work():
    with pytest.warns(DeprecationWarning) as got:
        s = load_settings({"api": "rest", "rest_url": "http://h:6820", "rest_token": "t", "command_timeout": 5})
    assert len(got) == 3 and any("'rest_url' of SlurmSettings is now called 'endpoint'" in str(w.message) for w in got)
    assert (s.endpoint, s.token.get_secret_value(), s.request_timeout) == ("http://h:6820", "t", 5.0)


@pytest.mark.parametrize("item, word", [
    ("-p debug", "-pdebug"),
    ("--mail-type END", "--mail-type=END"),
    ("--comment my run", "--comment=my run"),
    ("--exclusive", "--exclusive"),
    ("--comment=a b", "--comment=a b"),
])
def test_an_option_and_its_value_in_one_item_become_one_word(item, word):
    """As sbatch reads a command line: `-p debug` is the partition "debug", not " debug"."""
    assert job_options({"sbatch": [item]}).sbatch == (word,)


def test_gpu_options_point_to_gpus():
    for item in ("--gres=gpu:2", "--gpus=2", "--gpus-per-node 2", "-G 2", "--gres gpu:a100:1"):
        with pytest.raises(meshrun.SpecError, match="gpus="):
            job_options({"sbatch": [item]})


@pytest.mark.parametrize("fields, sbatch, word", [
    ({"memory": "8GiB"}, ["--mem-per-gpu=16G"], "memory="),
    ({"memory": "8GiB"}, ["--mem=4G"], "memory="),
    ({"memory": "8GiB"}, ["--mem-per-c=1G"], "memory="),
    ({}, ["--mem=4G", "--mem-per-cpu=1G"], "mutually exclusive"),
    ({"time_limit": "1h"}, ["--time=2:00:00"], "time_limit"),
    ({"time_limit": "1h"}, ["-t 60"], "time_limit"),
])
def test_what_sbatch_would_refuse_or_write_twice_is_refused_with_the_spec(fields, sbatch, word):
    spec = meshrun.JobSpec(command="true", backend_options={"slurm": {"sbatch": sbatch}}, **fields)
    with pytest.raises(meshrun.SpecError) as e:
        job_options(spec.options_for("slurm"), spec=spec)
    assert e.value.field == "backend_options.slurm.sbatch" and word in str(e.value)
    job_options(spec.options_for("slurm"))  # alone, each option is fine


def test_one_time_line_and_the_users_comment_kept():
    from meshrun_slurm._options import user_comment
    from meshrun_slurm._script import BatchJob, directives

    spec = meshrun.JobSpec(command="true", backend_options={"slurm": {"time": "2h", "sbatch": ["--comment", "mine"]}})
    with pytest.raises(meshrun.SpecError):
        job_options(spec.options_for("slurm"), spec=spec)  # "--comment" alone is not an option with a value
    spec = meshrun.JobSpec(command="true", time_limit="1h",
                           backend_options={"slurm": {"sbatch": ["--comment my run", "--mem-per-gpu=8G"]}})
    opts = job_options(spec.options_for("slurm"), spec=spec)
    assert user_comment(opts)
    lines = directives(BatchJob(job_name="meshrun-x", workdir="/w", python="python3", agent="a.py",
                                time_limit=3600, options=opts))
    assert [x for x in lines if x.startswith("--time")] == ["--time=01:00:00"]
    assert "--comment=my run" in lines


# ---- real #SBATCH headers (tests/data/jobfiles/sbatch, see its README): what meshrun takes as options ------

_SBATCH_DIR = __import__("pathlib").Path(__file__).resolve().parents[3] / "tests" / "data" / "jobfiles" / "sbatch"


def _header_options(path):
    import shlex

    out = []
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH"):
            out.extend(shlex.split(line[len("#SBATCH"):], comments=True))
    return out


@pytest.mark.parametrize("path", sorted(_SBATCH_DIR.iterdir()), ids=lambda p: p.name)
def test_real_sbatch_headers(path):
    """Each option of a real header is taken as is, or refused with the JobSpec field that says it: GPUs go
    through gpus=, nodes/job name/output through the spec, never silently."""
    options = _header_options(path)
    assert options
    for opt in options:
        try:
            job_options({"sbatch": [opt]})
        except meshrun.SpecError as e:
            name = opt.split("=")[0]
            if name.startswith(("--gres", "--gpus")):
                assert "gpus=" in str(e), opt
            else:
                assert "meshrun sets itself" in str(e), opt
            continue
        assert not opt.startswith(("--gres", "--gpus")), opt
