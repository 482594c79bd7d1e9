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
