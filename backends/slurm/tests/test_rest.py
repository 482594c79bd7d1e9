"""api = "rest": the same jobs through the real slurmrestd of the test cluster (JWT over TCP)."""

from __future__ import annotations

import pytest

import meshrun

pytestmark = pytest.mark.service
JS = meshrun.JobState


@pytest.fixture
def rest(slurm, slurm_cluster):
    if not slurm_cluster.get("SLURM_REST_URL"):
        pytest.skip("the test cluster runs without slurmrestd (SLURM_REST=0)")
    meshrun.configure({"backends": {"slurm": {"api": "rest", "endpoint": slurm_cluster["SLURM_REST_URL"],
                                              "query_interval": 0.3}}})
    b = meshrun.get_backend("slurm")
    assert b.check().ok, b.check()
    return b


def gpus_and_args(*args):
    import os

    return args, os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("MESHRUN_JOB_NAME")


def test_rest_submit_status_result(rest):
    name = "rest \"job\" $(id) 'x' ü"
    job = meshrun.submit(meshrun.JobSpec(function=gpus_and_args, args=("a b", "$HOME"), gpus=2, name=name,
                                         backend="slurm"))
    args, cuda, got_name = job.result(timeout=90)
    assert args == ("a b", "$HOME") and len(cuda.split(",")) == 2 and got_name == name
    assert rest.calls.get("sbatch", 0) == 0 and rest.calls.get("squeue", 0) == 0  # all through slurmrestd


def test_rest_exit_code_and_held_job(rest):
    job = meshrun.run(["bash", "-c", "exit 3"], backend="slurm")
    assert job.wait(timeout=60) is JS.FAILED and job.record.exit_code == 3
    held = meshrun.run(["true"], backend="slurm", backend_options={"slurm": {"sbatch": ["--hold"]}})
    assert held.status() is JS.PENDING and held.reason.startswith("JobHeldUser")
    held.cancel()
    assert held.record.state is JS.CANCELLED


def cube(x):
    return x ** 3


def test_rest_map_is_one_array(rest):
    jobs = meshrun.job(backend="slurm", backend_options={"slurm": {"array_parallelism": 3}})(cube).map(range(6))
    assert len({j.backend_id.split("_")[0] for j in jobs}) == 1
    assert meshrun.gather(jobs, timeout=120) == [x ** 3 for x in range(6)]


def test_rest_node_groups_match_sinfo(rest):
    from_rest = rest.rest.node_groups()
    from_cli = rest._node_groups()
    key = lambda g: (g.partition, g.cpus, g.memory, g.gres)  # noqa: E731
    assert {key(g) for g in from_rest} == {key(g) for g in from_cli}
    assert sum(g.count for g in from_rest) == sum(g.count for g in from_cli)


def test_rest_options_without_a_field_are_refused(rest):
    with pytest.raises(meshrun.SpecError, match="slurmrestd"):
        meshrun.run(["true"], backend="slurm", backend_options={"slurm": {"sbatch": ["--spread-job"]}})


def test_bad_token_is_a_clear_error_that_hides_the_token(slurm, slurm_cluster):
    if not slurm_cluster.get("SLURM_REST_URL"):
        pytest.skip("no slurmrestd")
    meshrun.configure({"backends": {"slurm": {"api": "rest", "endpoint": slurm_cluster["SLURM_REST_URL"],
                                              "token": "not-a-real-token-sekrit"}}})
    b = meshrun.get_backend("slurm")
    av = b.check()
    assert not av.ok and "sekrit" not in av.reason and "token" in av.reason
    assert "sekrit" not in repr(b.settings) and "sekrit" not in repr(b.rest)
