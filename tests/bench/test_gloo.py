"""The harness end to end with gloo: several CPU ranks on this machine, submitted through the local backend.

Small sizes and few iterations (CI machines have two cores): these tests check correctness and the
arithmetic, never speed.
"""

from __future__ import annotations

import json

import pytest

import meshrun
import meshrun.bench as bench
from meshrun.bench import _math

pytest.importorskip("torch")

pytestmark = pytest.mark.slow


def _check_arithmetic(res: bench.BenchResult, nranks: int) -> None:
    """Every measured row: algbw = size / time (GB = 1e9 B), busbw = algbw x nccl-tests' factor."""
    measured = [r for r in res.rows if r["time_us"] is not None]
    assert measured
    for r in measured:
        sec = r["time_us"] / 1e6
        assert r["algbw"] == pytest.approx(r["size"] / 1e9 / sec, rel=1e-9)
        assert r["busbw"] == pytest.approx(r["algbw"] * _math.busbw_factor(r["collective"], nranks), rel=1e-9)
        assert r["time_us_min"] <= r["time_us"] <= r["time_us_max"]


def _expected_sizes(coll: str, sizes: list[int], elt: int, n: int) -> list[int]:
    out: list[int] = []
    for s in sizes:
        c = _math.counts(coll, s, elt, n)
        if c.param and c.size not in out:
            out.append(c.size)
    return out


def test_every_collective_two_ranks(tmp_path):
    res = bench.run("all", backend="local", device="cpu", procs_per_node=2, min_bytes=8, max_bytes="16K",
                    warmup=1, iters=2, out_dir=tmp_path)
    assert res.meta["ranks"] == 2 and res.meta["nodes"] == 1 and res.meta["backend"] == "gloo"
    assert res.collectives == list(_math.COLLECTIVES)
    sizes = _math.sweep(8, 16384, 2)
    for coll in _math.COLLECTIVES:
        got = sorted({r["size"] for r in res.rows if r["collective"] == coll})
        assert got == _expected_sizes(coll, sizes, 4, 2), coll
    # every checked output was right; in-place alltoall and sendrecv are not checkable (N/A, as nccl-tests)
    for r in res.rows:
        if r["time_us"] is None:
            assert r["mode"] == "out-of-place" and r["collective"] in ("all_reduce", "broadcast")
            assert "no out-of-place" in r["note"]
        elif r["mode"] == "in-place" and r["collective"] in ("alltoall", "sendrecv"):
            assert r["wrong"] is None
        else:
            assert r["wrong"] == 0, r
    assert res.ok and res.wrong == 0
    _check_arithmetic(res, 2)
    assert {"jsonl", "table", "png"} <= set(res.files)
    assert res.files["png"].read_bytes()[:4] == b"\x89PNG"
    back = bench.load(res.files["jsonl"])
    assert back.rows == res.rows and back.meta["ranks"] == 2


def test_three_ranks_bfloat16_and_pairwise(tmp_path):
    """Three ranks (not a power of two: all_gather/reduce_scatter/alltoall sizes round down), bf16, and the
    pairwise sendrecv between every pair of ranks."""
    res = bench.run(["all_reduce", "all_gather", "reduce_scatter", "alltoall"], backend="local", device="cpu",
                    procs_per_node=3, min_bytes=64, max_bytes=4096, dtype="bfloat16", warmup=1, iters=2,
                    pairwise="gpus", pairwise_bytes="64K", pairwise_threshold=0.5, plot=False, out_dir=tmp_path)
    assert res.meta["ranks"] == 3
    ag = [r for r in res.rows if r["collective"] == "all_gather" and r["mode"] == "in-place"]
    # 64 B of bf16 = 32 elements, 32 // 3 = 10, rounded down to a multiple of 8 -> 8 per rank, 48 B in all
    assert ag[0]["size"] == 48 and ag[0]["count"] == 8
    assert all(r["wrong"] == 0 for r in res.rows if r["wrong"] is not None)
    assert res.wrong == 0
    _check_arithmetic(res, 3)
    assert [(p["a"], p["b"]) for p in res.pairs] == [(0, 1), (0, 2), (1, 2)]
    for p in res.pairs:
        assert p["wrong"] == 0 and p["size"] == 65536
        assert p["busbw"] == pytest.approx(65536 / 1e9 / (p["time_us"] / 1e6))
        assert p["ratio"] is not None and p["slow"] == (p["ratio"] < 0.5)
    assert "pairwise sendrecv between gpus" in res.report()


def test_cli_json_and_files(tmp_path, capsys):
    from meshrun._cli import main

    rc = main(["bench", "--backend", "local", "--device", "cpu", "-c", "all_reduce,sendrecv", "-b", "1K", "-e", "4K",
               "-w", "1", "-n", "2", "--json", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert recs[0]["record"] == "run" and recs[0]["options"]["collectives"] == ["all_reduce", "sendrecv"]
    results = [r for r in recs if r["record"] == "result"]
    assert {(r["collective"], r["size"]) for r in results} == {
        (c, s) for c in ("all_reduce", "sendrecv") for s in (1024, 2048, 4096)}
    assert all(r["ranks"] == 2 and r["backend"] == "gloo" for r in results)
    assert (tmp_path / "out" / "bench.jsonl").exists() and (tmp_path / "out" / "bench.png").exists()
    assert "# sendrecv" in (tmp_path / "out" / "bench.txt").read_text()


def test_a_size_that_cannot_fit_is_refused_with_its_size(tmp_path):
    with pytest.raises(meshrun.JobFailed) as ei:
        bench.run("all_reduce", backend="local", device="cpu", procs_per_node=2, min_bytes="1T", max_bytes="1T",
                  warmup=1, iters=1, plot=False, out_dir=tmp_path)
    msg = str(ei.value)
    assert "refusing to allocate" in msg and "all_reduce at 1TiB" in msg and "--max-bytes" not in msg.split("needs")[0]
    assert "no size of this sweep fits" in msg


def test_bad_options_fail_before_submitting():
    with pytest.raises(bench.BenchError, match="unknown collective"):
        bench.run("gather", backend="local", device="cpu")
    with pytest.raises(bench.BenchError, match="smallest size"):
        bench.run("all_reduce", backend="local", device="cpu", min_bytes=0)
    with pytest.raises(bench.BenchError, match="dtype"):
        bench.run("all_reduce", backend="local", device="cpu", dtype="float128")
    assert meshrun.bench.busbw_factor("all_reduce", 4) == 1.5  # meshrun.bench resolves to the package


def test_cli_help(capsys):
    from meshrun._cli import main

    with pytest.raises(SystemExit) as ei:
        main(["bench", "--help"])
    assert ei.value.code == 0
    assert "--compare-nccl-tests" in capsys.readouterr().out
