"""Everyday commands take the lean path: ``ls``, ``status``, ``logs``, ``cancel``, ``wait``, ``gpus`` and a
repeated ``backends`` neither import pydantic nor load a backend plugin; the job-reading ones load neither
argparse, dataclasses, typing nor the backend machinery either (speed itself is measured in
benchmarks/cli_latency.py, never timed here). Each shortcut is checked against the full path it stands in for:
the command-line parser against argparse, the retry count against the spec model, local logs against the
local backend."""

from __future__ import annotations

import os
import subprocess
import sys

import meshrun
from meshrun._cli import _fast_args, build_parser
from meshrun.testing import wait_until


def _imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _imports(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """The command's run and the modules it imported beyond what a bare interpreter imports here (a site's
    startup hooks, e.g. a .pth file that imports typing, are the machine's, not meshrun's)."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "meshrun", *args], capture_output=True,
                       text=True, timeout=120, env=full_env)
    bare = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                          timeout=120, env=full_env)
    return p, _imported(p.stderr) - _imported(bare.stderr)


HEAVY = {"pydantic", "cloudpickle", "meshrun._settings", "meshrun._spec", "meshrun_slurm", "meshrun_ssh",
         "meshrun_skypilot", "meshrun_dstack", "meshrun_kubernetes"}


# what reading a job from the store needs none of (ls, status, logs, cancel and wait of a job that has ended)
MACHINERY = {"argparse", "dataclasses", "typing", "typing_extensions", "tomllib", "meshrun._backend",
             "meshrun._registry", "meshrun._local", "meshrun._attempts"}


def test_reading_commands_load_no_models_and_no_plugins():
    job = meshrun.run(["echo", "hello"])
    assert job.result(timeout=60) == 0
    for args in (["ls"], ["status", job.id], ["logs", job.id], ["gpus"], ["wait", job.id], ["cancel", job.id],
                 ["logs", "--tail", "1", job.id], ["ls", "--json"]):
        p, mods = _imports(*args, env={"MESHRUN_GPUS": "0,1"})
        assert p.returncode == 0, (args, p.stdout, p.stderr[-2000:])
        assert not HEAVY & mods, (args, sorted(HEAVY & mods))
        if args[0] != "gpus":
            assert not MACHINERY & mods, (args, sorted(MACHINERY & mods))
    assert _imports("logs", job.id)[0].stdout == "hello\n"
    assert f"{job.id}: already succeeded" in _imports("cancel", job.id)[0].stdout
    p, _ = _imports("gpus", env={"MESHRUN_GPUS": "0,1"})
    assert "GPU" in p.stdout or "gpu" in p.stdout.lower(), p.stdout


def test_backends_shows_a_recent_check_with_its_age_and_fresh_checks_again(tmp_path):
    # every backend must answer for the check to be kept: Slurm's tools here answer at once that there is no
    # cluster (the machine's test cluster may be up, restarting or stopped by other tests)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sinfo", "squeue", "scontrol", "sbatch"):
        (bin_dir / tool).write_text("#!/bin/sh\necho 'no Slurm cluster here' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    p, mods = _imports("backends", env=env)
    assert p.returncode == 0 and "local" in p.stdout and "ago" not in p.stdout, p.stdout
    p, mods = _imports("backends", env=env)
    assert p.returncode == 0 and "local" in p.stdout and "ago (meshrun backends --fresh checks again)" in p.stdout
    assert not (HEAVY | MACHINERY | {"meshrun._agent"}) & mods, sorted((HEAVY | MACHINERY | {"meshrun._agent"}) & mods)
    p, mods = _imports("backends", "--fresh", env=env)
    assert p.returncode == 0 and "ago" not in p.stdout


def test_a_job_that_ends_while_ls_reads_it_is_recorded_without_the_spec_model(tmp_path):
    """``ls`` sees a job end (its retries read from spec.json, not through JobSpec) and records it."""
    job = meshrun.run(["bash", "-c", "sleep 0.5; exit 3"], retries=0)
    job.wait(timeout=60)  # ended, but another process's ls may be the first to record it: make this one that
    store = job._store
    store.update(job.id, state=meshrun.JobState.RUNNING, ended_at=None)
    p, mods = _imports("ls", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert not {"pydantic", "meshrun._spec", "meshrun._attempts"} & mods
    assert store.get(job.id).state is meshrun.JobState.FAILED


def test_ls_records_a_local_job_s_end_from_its_exit_record_as_the_backend_would():
    """A local job that just ended is recorded by ``ls`` from its agent's exit record, without the backend
    machinery (dataclasses, meshrun._backend), and the record is what the full path records: state, exit code,
    reason, times, where, and a history with its start and its end."""
    recorded = {}
    for how in ("lean", "full"):
        job = meshrun.run(["bash", "-c", "echo out; exit 3"], retries=0)
        exit_json = job.job_dir / "exit.json"
        wait_until(exit_json.exists, 60, 0.01, "the job's exit record")
        assert not job._store.get(job.id).terminal  # nobody has recorded the end yet
        if how == "lean":
            p, mods = _imports("ls", "--json")
            assert p.returncode == 0, p.stderr[-2000:]
            assert not {"meshrun._backend", "dataclasses", "meshrun._local"} & mods, sorted(mods & MACHINERY)
        else:
            import meshrun._job as mj

            real = mj._plain_local_backend
            mj._plain_local_backend = lambda: False  # the local backend's own status()
            try:
                mj.refresh([job])
            finally:
                mj._plain_local_backend = real
        r = job._store.get(job.id)
        recorded[how] = (r.state, r.exit_code, r.reason, r.where, bool(r.started_at), bool(r.ended_at),
                         [h["event"] for h in r.history])
    assert recorded["lean"] == recorded["full"], recorded
    assert recorded["lean"][0] is meshrun.JobState.FAILED and recorded["lean"][1] == 3
    assert recorded["lean"][-1][-2:] == ["running", "failed"], recorded


def test_retry_counts_read_from_the_spec_file_agree_with_the_spec_model(tmp_path):
    from meshrun._errors import SpecError
    from meshrun._retries import spec_retries
    from meshrun._spec import JobSpec

    for retries in (0, 1, 7, 100):
        (tmp_path / "spec.json").write_text(JobSpec(command=["true"], retries=retries).to_json())
        assert spec_retries(tmp_path) == JobSpec.from_json((tmp_path / "spec.json").read_text()).retries == retries
    (tmp_path / "spec.json").write_text(JobSpec(command=["true"]).to_json())
    assert spec_retries(tmp_path) == 0
    # values the model refuses count as no retries, as an unreadable spec did before
    for bad in ("true", "-1", "101", "2.5", '"3"'):
        text = '{"command": ["true"], "retries": %s}' % bad
        try:
            JobSpec.from_json(text)
        except SpecError:
            pass
        else:
            raise AssertionError(f"the model accepted retries={bad}")
        (tmp_path / "spec.json").write_text(text)
        assert spec_retries(tmp_path) == 0, bad
    (tmp_path / "spec.json").write_text("not json")
    assert spec_retries(tmp_path) == 0
    (tmp_path / "spec.json").unlink()
    assert spec_retries(tmp_path) == 0


def test_the_local_logs_shortcut_reads_what_the_local_backend_reads():
    from meshrun import _agent
    from meshrun._job import _plain_local_backend
    from meshrun._logfile import EXIT, LOG
    from meshrun._registry import get_backend

    assert (LOG, EXIT) == (_agent.LOG, _agent.EXIT)
    job = meshrun.run(["bash", "-c", "for i in 1 2 3 4 5; do echo line $i; done"])
    job.wait(timeout=60)
    assert _plain_local_backend()
    backend = "".join(get_backend("local").logs(job._ref(), tail=2))
    assert job.logs(tail=2) == backend == "line 4\nline 5\n"
    assert job.logs(max_bytes=7) == "line 5\n"


FAST_ARGV = [
    ["ls"], ["ls", "--limit", "5"], ["ls", "-l", "0", "--json"], ["ls", "-s", "failed", "--state", "running"],
    ["ls", "--json", "-l", "7", "-l", "3"], ["status", "abc"], ["status", "--json", "abc"], ["status", "abc", "--json"],
    ["status", ""], ["logs", "abc"], ["logs", "abc", "-f", "-n", "5", "--max-bytes", "1MiB"],
    ["logs", "--follow", "--tail", "0", "abc"], ["cancel", "a"], ["cancel", "a", "b", "c"],
    ["wait", "a", "b", "--timeout", "2.5"], ["wait", "--timeout", "2", "a"], ["wait", "a"], ["gpus"],
    ["gpus", "-b", "ssh", "--json"], ["gpus", "--backend", "local"], ["backends"], ["backends", "--fresh", "--json"],
]
# command lines the shortcut leaves to argparse (most of them are errors, or help, that argparse words)
ARGPARSE_ARGV = [
    [], ["ls", "--lim", "5"], ["ls", "-l5"], ["ls", "--limit=5"], ["ls", "-l", "x"], ["ls", "x"], ["ls", "-h"],
    ["status"], ["status", "a", "b"], ["status", "--help"], ["logs", "abc", "--tail", "-5"], ["logs", "--", "abc"],
    ["cancel"], ["wait", "a", "--timeout", "2", "b"], ["wait", "a", "--timeout"], ["backends", "x"],
    ["gpus", "-bssh"], ["run", "--", "true"], ["offers"], ["nope"],
]


def test_the_reading_commands_parse_their_command_lines_as_argparse_does():
    for argv in FAST_ARGV:
        fast = _fast_args(argv)
        assert fast is not None, argv
        assert vars(fast) == vars(build_parser().parse_args(argv)) == vars(build_parser(argv[0]).parse_args(argv)), argv
    for argv in ARGPARSE_ARGV:
        assert _fast_args(argv) is None, argv


def test_a_parser_of_one_subcommand_parses_and_refuses_as_the_full_one(capsys):
    import pytest

    for argv in [*FAST_ARGV, ["run", "-d", "--gpus", "1", "--", "echo", "hi"], ["offers", "--gpus", "H100:8", "--spot"],
                 ["catalog", "update", "--clouds", "aws"], ["doctor", "--json"], ["show", "--native", "x.yaml"]]:
        assert vars(build_parser(argv[0]).parse_args(argv)) == vars(build_parser().parse_args(argv)), argv
    for argv in (["ls", "--limit", "x"], ["status"], ["run", "--objective", "fastest", "--", "true"], ["ls", "extra"]):
        said = []
        for parser in (build_parser(argv[0]), build_parser()):
            with pytest.raises(SystemExit):
                parser.parse_args(argv)
            said.append(capsys.readouterr().err)
        assert said[0] == said[1] and "error:" in said[0], (argv, said)
