"""The harness across 2 Slurm nodes with gloo, through the slurm backend and its test cluster.

Runs when the slurm backend is installed and its cluster is up (started with the backend's public script,
``backends/slurm/scripts/slurm-cluster.sh up``, when this runs as root); skips with the reason otherwise.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import meshrun

pytestmark = [pytest.mark.service, pytest.mark.slow, pytest.mark.slurm_cluster]

CLUSTER = Path(__file__).resolve().parents[2] / "backends" / "slurm" / "scripts" / "slurm-cluster.sh"


@pytest.fixture
def slurm_backend(meshrun_home, monkeypatch, tmp_path, session_services):
    pytest.importorskip("torch")
    try:
        meshrun.get_backend("slurm")
    except meshrun.BackendUnavailable as e:
        pytest.skip(f"the slurm backend is not installed: {e}")
    if not CLUSTER.exists():
        pytest.skip(f"no Slurm test cluster script at {CLUSTER}")
    if os.geteuid() == 0:
        p = session_services.up("slurm-cluster", CLUSTER, users=("slurmrest",), timeout=900)
        if p.returncode != 0:
            pytest.skip(f"the Slurm test cluster did not start: {(p.stderr or p.stdout).strip()[-500:]}")
    elif subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode != 0:
        pytest.skip("the Slurm test cluster is not up (bash backends/slurm/scripts/slurm-cluster.sh up, as root)")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    meshrun.configure({"backends": {"slurm": {"query_interval": 0.3}}})
    b = meshrun.get_backend("slurm")
    av = b.check()
    if not av.ok:
        pytest.skip(f"the slurm backend cannot be used: {av.reason} {av.hint}".strip())
    return b


def test_gloo_across_two_slurm_nodes(slurm_backend, tmp_path):
    import meshrun.bench as bench
    from meshrun.bench import _math

    res = bench.run(["all_reduce", "all_gather", "sendrecv"], backend="slurm", nodes=2, device="cpu",
                    procs_per_node=2, min_bytes=64, max_bytes="16K", warmup=1, iters=2, pairwise="nodes",
                    pairwise_bytes="64K", time_limit="10m", timeout=300, plot=False, out_dir=tmp_path / "out")
    m = res.meta
    assert (m["nodes"], m["ranks"], m["procs_per_node"], m["backend"]) == (2, 4, 2, "gloo")
    assert sorted({r["node_rank"] for r in m["rank_list"]}) == [0, 1]
    assert [r["rank"] for r in m["rank_list"]] == [0, 1, 2, 3]
    assert res.wrong == 0
    for r in res.rows:
        if r["time_us"] is None:
            continue
        sec = r["time_us"] / 1e6
        assert r["algbw"] == pytest.approx(r["size"] / 1e9 / sec)
        assert r["busbw"] == pytest.approx(r["algbw"] * _math.busbw_factor(r["collective"], 4))
    # node-level pairwise: one pair of nodes, local rank k on node 0 with local rank k on node 1
    assert len(res.pairs) == 1 and res.pairs[0]["level"] == "nodes" and res.pairs[0]["rank_pairs"] == 2
    assert res.pairs[0]["wrong"] == 0
    assert res.meta["job"]["backend"] == "slurm"
