"""Fixtures of the Slurm suite: the real cluster of scripts/slurm-cluster.sh, started once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
CLUSTER = SCRIPTS / "slurm-cluster.sh"


def cluster_env() -> dict[str, str]:
    p = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True)
    facts = {}
    for line in p.stdout.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            facts[k] = v.replace("\\ ", " ")
    return facts


@pytest.fixture(scope="session")
def slurm_cluster(session_services) -> dict[str, str]:
    """Start (or reuse) the test cluster: at least 2 nodes x 4 CPUs x 4 fake GPUs, slurmdbd, slurmrestd; stopped
    when the test run ends if this run started it (conftest.py's session_services)."""
    if os.geteuid() != 0:
        if subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode != 0:
            pytest.skip("the Slurm test cluster needs root to start (bash backends/slurm/scripts/slurm-cluster.sh up)")
    else:
        t0 = time.monotonic()
        p = session_services.up("slurm-cluster", CLUSTER, users=("slurmrest",), timeout=600)
        if p.returncode != 0:
            pytest.fail(f"slurm-cluster.sh up failed:\n{p.stdout}\n{p.stderr}")
        sys.stderr.write(f"[slurm] cluster up in {time.monotonic() - t0:.1f}s\n")
    return cluster_env()


@pytest.fixture
def slurm(slurm_cluster, meshrun_home, monkeypatch, tmp_path):
    """The slurm backend on the test cluster, in this test's own MESHRUN_HOME; the working directory is a
    fresh folder every node sees."""
    import meshrun

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    meshrun.configure({"backends": {"slurm": {"query_interval": 0.3}}})
    b = meshrun.get_backend("slurm")
    yield b
    # cancel whatever the test left behind
    ids = set()
    for p in (meshrun_home / "jobs").glob("*/slurm.json"):
        try:
            ids.add(json.loads(p.read_text())["slurm_job_id"])
        except (OSError, ValueError, KeyError):
            pass
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True)
