"""scripts/slurm-cluster.sh itself, from nothing: in private mount and network namespaces, so the cluster the
other tests (and other suites) share is not touched. up, a no-op up, a smaller request that keeps the
cluster, growing, reset, up again, down."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.service
HARNESS = Path(__file__).with_name("isolated_cluster.sh")


def test_cluster_script_lifecycle(slurm_cluster):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    p = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "bash", str(HARNESS)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ALL OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    steps = dict(line.split()[1:3] for line in p.stdout.splitlines() if line.startswith("STEP "))
    assert set(steps) >= {"fresh-up", "noop-up", "grow", "reset", "up-after-reset", "down"}
