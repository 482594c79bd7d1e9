"""The batch script is a pure function of the job: golden files, and sbatch's own quoting rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshrun_slurm._options import JobOptions, job_options
from meshrun_slurm._script import ArrayPart, BatchJob, directives, output_pattern, render_script, sbatch_quote

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

PY = "/opt/venv/bin/python"
AGENT = "/opt/meshrun/_agent.py"


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden file (UPDATE_GOLDEN=1 rewrites it)"


CASES = {
    "cpu.sbatch": BatchJob(job_name="meshrun-16a0000abcd", workdir="/home/u/.meshrun/jobs/16a0000abcd",
                           job_dir="/home/u/.meshrun/jobs/16a0000abcd", python=PY, agent=AGENT),
    "command.sbatch": BatchJob(job_name="meshrun-16a0000cmd1", workdir="/home/u/.meshrun/jobs/16a0000cmd1",
                               job_dir="/home/u/.meshrun/jobs/16a0000cmd1", python=PY, agent=AGENT, nodes=2,
                               python_flags=("-S",)),
    "gpu.sbatch": BatchJob(
        job_name="meshrun-16a0000gpu1", workdir="/scratch/me/jobs/16a0000gpu1", job_dir="/scratch/me/jobs/16a0000gpu1",
        python=PY, agent=AGENT, gpus=2, gpu_type="a100", cpus=7.5, memory=64 * 2**30, disk=10**9,
        time_limit=5400,
        options=JobOptions(partition="gpu", account="lab", qos="high", constraint="ib&(a100|h100)",
                           reservation="maint", sbatch=("--mail-type=END", "--exclusive")),
    ),
    "multinode.sbatch": BatchJob(
        job_name="meshrun-16a0000mn01", workdir="/shared/jobs/16a0000mn01", job_dir="/shared/jobs/16a0000mn01",
        python=PY, agent=AGENT, nodes=4, gpus=8, cpus=32, memory=512 * 2**30, time_limit=86400 * 2,
        options=JobOptions(partition="big", gpus_flag="gpus-per-node"),
    ),
    "array.sbatch": BatchJob(
        job_name="meshrun-array-16a0000arr1-20", workdir="/home/u/.meshrun/slurm/arrays/16a0000arr1-20", python=PY,
        agent=AGENT, gpus=1, time_limit=600, options=JobOptions(partition="debug"),
        array=ArrayPart(count=20, tasks_file="/home/u/.meshrun/slurm/arrays/16a0000arr1-20/tasks", parallelism=4),
    ),
    "hostile-paths.sbatch": BatchJob(
        job_name="meshrun-16a0000host", workdir="/tmp/it's a \"dir\" $(touch x); #1 %j",
        job_dir="/tmp/it's a \"dir\" $(touch x); #1 %j", python="/opt/my python/bin/python3",
        agent="/opt/a`b`/_agent.py",
        options=JobOptions(sbatch=("--comment=$(id) 'q' \"dq\" #hash \\back ünï",)),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    golden(name, render_script(CASES[name]))


def test_rendering_is_pure():
    job = CASES["gpu.sbatch"]
    assert render_script(job) == render_script(job)


def test_directives_from_resources():
    d = directives(CASES["gpu.sbatch"])
    assert "--gres=gpu:a100:2" in d
    assert "--cpus-per-task=8" in d  # 7.5 CPUs round up
    assert "--mem=65536M" in d
    assert "--time=01:30:00" in d
    assert "--nodes=1" in d and "--ntasks-per-node=1" in d
    d = directives(CASES["multinode.sbatch"])
    assert "--gpus-per-node=8" in d and "--nodes=4" in d and "--time=2-00:00:00" in d
    assert "--array=0-19%4" in directives(CASES["array.sbatch"])


def sbatch_parse(line: str) -> list[str]:
    """sbatch's #SBATCH argument reader (src/sbatch/opt.c, _get_argument), for checking our quoting."""
    args, i, n = [], 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            return args
        arg, quoted, q, esc, got = [], False, "", False, False
        while i < n and (quoted or not line[i].isspace()):
            c = line[i]
            if esc:
                esc = False
            elif c == "\\":
                esc = True
                i += 1
                continue
            elif quoted:
                if c == q:
                    quoted = False
                    i += 1
                    continue
            elif c in "\"'":
                quoted, q = True, c
                i += 1
                continue
            elif c == "#":
                return args + (["".join(arg)] if got else [])
            arg.append(c)
            got = True
            i += 1
        assert not quoted
        if got:
            args.append("".join(arg))


@pytest.mark.parametrize("value", [
    "plain", "with space", "it's", 'say "hi"', "back\\slash", "#hash", "a#b", "$(rm -rf ~)", "`id`", "ünïcödé ✓",
    "tab\there", "--comment=x y", "'", '"', "\\", "%j%%",
])
def test_sbatch_quote_round_trips(value):
    assert sbatch_parse(sbatch_quote(value)) == [value]


def test_python_flags_are_checked():
    with pytest.raises(ValueError, match="short options"):
        render_script(BatchJob(job_name="meshrun-x", workdir="/w", job_dir="/w", python=PY, agent=AGENT,
                               python_flags=("-c 'import os'",)))


@pytest.mark.parametrize("bad", ["", "two\nlines", "cr\rhere"])
def test_sbatch_quote_refuses(bad):
    with pytest.raises(ValueError):
        sbatch_quote(bad)


def test_every_sbatch_line_parses_back_to_its_directive():
    for job in CASES.values():
        text = render_script(job)
        lines = [line[len("#SBATCH"):] for line in text.splitlines() if line.startswith("#SBATCH")]
        assert [a for line in lines for a in sbatch_parse(line)] == directives(job)


def test_output_pattern_escapes_percent():
    assert output_pattern("/a/100%/b", "slurm-%j.out") == "/a/100%%/b/slurm-%j.out"
    with pytest.raises(ValueError, match="backslash"):
        output_pattern("/a\\b", "x")


def test_options_flow_into_directives():
    opts = job_options({"partition": "gpu,gpu-long", "sbatch": {"mail-type": "END", "exclusive": True}, "time": "2h"})
    job = BatchJob(job_name="meshrun-x", workdir="/w", job_dir="/w", python=PY, agent=AGENT, time_limit=60,
                   options=opts)
    d = directives(job)
    assert "--partition=gpu,gpu-long" in d and "--mail-type=END" in d and "--exclusive" in d
    assert "--time=02:00:00" in d and "--time=00:01:00" not in d  # Slurm's own limit wins when given


def test_show_native_prints_the_batch_script(tmp_path, monkeypatch, capsys):
    from meshrun._cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text("resources: {accelerators: {L4: 1, A10G: 1}, memory: 32GB+}\nrun: echo hi\n")
    assert main(["show", "--native", "-b", "slurm", "t.yaml"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gres=gpu:L4:1" in out and "#SBATCH --mem=32768M" in out  # the first alternative
