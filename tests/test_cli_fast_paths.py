"""Everyday commands take the lean path: ``ls``, ``status``, ``logs``, ``gpus`` and a repeated ``backends``
neither import pydantic nor load a backend plugin (speed itself is measured in benchmarks/cli_latency.py,
never timed here)."""

from __future__ import annotations

import os
import subprocess
import sys

import meshrun


def _imports(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "meshrun", *args], capture_output=True,
                       text=True, timeout=120, env={**os.environ, **(env or {})})
    mods = {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    return p, mods


HEAVY = {"pydantic", "cloudpickle", "meshrun._settings", "meshrun._spec", "meshrun_slurm", "meshrun_ssh",
         "meshrun_skypilot", "meshrun_dstack", "meshrun_kubernetes"}


def test_reading_commands_load_no_models_and_no_plugins():
    job = meshrun.run(["echo", "hello"])
    assert job.result(timeout=60) == 0
    for args in (["ls"], ["status", job.id], ["logs", job.id], ["gpus"], ["wait", job.id]):
        p, mods = _imports(*args, env={"MESHRUN_GPUS": "0,1"})
        assert p.returncode == 0, (args, p.stdout, p.stderr[-2000:])
        assert not HEAVY & mods, (args, sorted(HEAVY & mods))
    p, _ = _imports("gpus", env={"MESHRUN_GPUS": "0,1"})
    assert "GPU" in p.stdout or "gpu" in p.stdout.lower(), p.stdout


def test_backends_shows_a_recent_check_with_its_age_and_fresh_checks_again():
    p, mods = _imports("backends")
    assert p.returncode == 0 and "local" in p.stdout and "ago" not in p.stdout, p.stdout
    p, mods = _imports("backends")
    assert p.returncode == 0 and "local" in p.stdout and "ago (meshrun backends --fresh checks again)" in p.stdout
    assert not HEAVY & mods, sorted(HEAVY & mods)
    p, mods = _imports("backends", "--fresh")
    assert p.returncode == 0 and "ago" not in p.stdout
