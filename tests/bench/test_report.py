"""Result tables, files, comparison with nccl-tests, pairwise flagging, and the log/output parsers."""

from __future__ import annotations

import json

import pytest

from meshrun.bench import BenchResult, _ncclt, flag_slow
from meshrun.bench._math import busbw
from meshrun.bench._nccl import nccl_version_from_log, parse_tuning, tuning_key
from meshrun.bench._worker import attach_nccl_choices

NCCL_TESTS_OUTPUT = """\
# nccl-tests version 2.17.6 nccl-headers=22707 nccl-library=22707
# Collective test starting: all_reduce_perf
# nThread 1 nGpus 2 minBytes 8 maxBytes 134217728 step: 2(factor) warmup iters: 5 iters: 20 agg iters: 1 validation: 1 graph: 0
#
# Using devices
#  Rank  0 Group  0 Pid  12345 on       host device  0 [0000:18:00] NVIDIA H200
#  Rank  1 Group  0 Pid  12345 on       host device  1 [0000:2a:00] NVIDIA H200
#
#                                                              out-of-place                       in-place          
#       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw   busbw  #wrong 
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)  (GB/s)  (GB/s)         
           8             2     float     sum      -1     9.05    0.00    0.00       0     8.87    0.00    0.00       0
   134217728      33554432     float     sum      -1   449.50  298.59  298.59       0   448.10  299.52  299.52       0
# Out of bounds values : 0 OK
# Avg bus bandwidth    : 149.3 
#
# Collective test concluded: all_reduce_perf
"""

NCCL_LOG = """\
host:1:1 [0] NCCL INFO NCCL version 2.27.7+cuda13.0
host:1:1 [0] NCCL INFO Channel 00/24 : 0 1
host:1:1 [0] NCCL INFO AllReduce: 8 Bytes -> Algo RING proto LL channel{Lo..Hi}={0..0}
host:1:1 [0] NCCL INFO AllReduce: 8 Bytes -> Algo RING proto LL channel{Lo..Hi}={0..0}
host:1:1 [0] NCCL INFO AllReduce: 134217728 Bytes -> Algo RING proto SIMPLE channel{Lo..Hi}={0..23} comm 0x55
host:1:1 [0] NCCL INFO AllGather: 4096 Bytes -> Algo RING proto LL128 channel{Lo..Hi}={0..1}
"""


def _row(coll, size, mode, t_us, n=2, wrong=0, **extra):
    sec = t_us / 1e6
    return {"collective": coll, "size": size, "count": size // 4, "dtype": "float32", "type": "float",
            "redop": "sum", "root": -1, "mode": mode, "time_us": t_us, "algbw": size / 1e9 / sec,
            "busbw": busbw(coll, size, sec, n), "wrong": wrong, **extra}


def _result(**kw):
    rows = [
        _row("all_reduce", 8, "out-of-place", 9.5, api="nccl"),
        _row("all_reduce", 8, "in-place", 9.0),
        _row("all_reduce", 134217728, "out-of-place", 450.0, nccl_algo="RING", nccl_proto="SIMPLE"),
        _row("all_reduce", 134217728, "in-place", 449.0, nccl_algo="RING", nccl_proto="SIMPLE"),
    ]
    meta = {"ranks": 2, "nodes": 1, "gpus_per_node": 2, "procs_per_node": 2, "device": "cuda",
            "gpu_model": "NVIDIA H200", "nccl_version": "2.27.7", "torch_version": "2.11.0", "backend": "nccl",
            "node_info": {"0": {"host": "h", "topology": "\tGPU0\tGPU1\nGPU0\t X \tNV18\nGPU1\tNV18\t X \n"}}}
    return BenchResult(rows=rows, meta=meta, options={"warmup": 5, "iters": 20, "dtype": "float32"}, **kw)


def test_nccl_tests_output_is_read():
    info = _ncclt.parse(NCCL_TESTS_OUTPUT, "all_reduce")
    assert info["version"] == "2.17.6" and info["nccl_library"] == 22707
    assert info["avg_busbw"] == 149.3 and info["out_of_bounds"] == 0
    assert len(info["devices"]) == 2
    rows = info["rows"]
    assert [(r["size"], r["mode"]) for r in rows] == [(8, "out-of-place"), (8, "in-place"),
                                                       (134217728, "out-of-place"), (134217728, "in-place")]
    assert rows[2]["busbw"] == 298.59 and rows[3]["time_us"] == 448.10 and rows[3]["wrong"] == 0
    a2a = _ncclt.parse("        1024           128     float    none      -1    20.00    0.05    0.03       0"
                       "    21.00    0.05    0.02    N/A\n", "alltoall")["rows"]
    assert a2a[1]["wrong"] is None and a2a[0]["wrong"] == 0


def test_nccl_tests_argv_mirrors_the_sweep(tmp_path):
    b = tmp_path / "all_reduce_perf"
    b.write_text("#!/bin/sh\n")
    b.chmod(0o755)
    assert _ncclt.find_binary(str(tmp_path), "all_reduce") == str(b)
    assert _ncclt.find_binary(str(tmp_path), "alltoall") is None
    assert _ncclt.find_binary(str(b), "all_reduce") == str(b)
    a = _ncclt.argv(str(b), "all_reduce", min_bytes=8, max_bytes=8 << 30, factor=2, step_bytes=None, gpus=2,
                    warmup=5, iters=20, dtype="bfloat16", check=True, average="avg")
    assert a[1:] == ["-b", "8", "-e", str(8 << 30), "-f", "2", "-g", "2", "-w", "5", "-n", "20", "-d", "bfloat16",
                     "-c", "1", "-a", "1", "-o", "sum"]


def test_nccl_debug_log_gives_algorithm_and_protocol():
    t = parse_tuning(NCCL_LOG)
    assert t[("AllReduce", 8)] == {"algo": "RING", "proto": "LL", "channels": 1}
    assert t[("AllReduce", 134217728)]["proto"] == "SIMPLE" and t[("AllReduce", 134217728)]["channels"] == 24
    assert nccl_version_from_log(NCCL_LOG) == "2.27.7+cuda13.0"
    # all_gather logs its per-rank bytes
    assert tuning_key("all_gather", 1024, 4) == ("AllGather", 4096)
    assert tuning_key("sendrecv", 10, 4) is None
    res = {"meta": {}, "rows": [_row("all_reduce", 8, "in-place", 9.0), _row("all_gather", 8192, "in-place", 9.0)]}
    res["rows"][1]["count"] = 1024
    attach_nccl_choices(res, NCCL_LOG, 4)
    assert res["rows"][0]["nccl_algo"] == "RING" and res["rows"][0]["nccl_proto"] == "LL"
    assert res["rows"][1]["nccl_proto"] == "LL128"
    assert res["meta"]["nccl_version_log"] == "2.27.7+cuda13.0"


def test_table_comparison_and_files(tmp_path):
    nt = {"path": "/x", "runs": [{"collective": "all_reduce", "command": ["all_reduce_perf", "-b", "8"],
                                  "output": NCCL_TESTS_OUTPUT, **_ncclt.parse(NCCL_TESTS_OUTPUT, "all_reduce")}]}
    res = _result(nccl_tests=nt)
    text = res.table()
    assert "# all_reduce" in text
    assert ("   134217728      33554432     float     sum      -1   450.00  298.26  298.26       0"
            "   449.00  298.93  298.93       0  RING/SIMPLE") in text
    assert "# Out of bounds values : 0 OK" in text
    comp = {(c["size"], c["mode"]): c for c in res.comparison()}
    c = comp[(134217728, "in-place")]
    assert c["busbw_ratio"] == pytest.approx(298.93 / 299.52, rel=1e-3)
    assert c["time_ratio"] == pytest.approx(449.0 / 448.10)
    assert "meshrun vs nccl-tests" in res.comparison_table()

    files = res.write(tmp_path)
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "nccl-tests version" in files["nccl_tests"].read_text()
    txt = files["table"].read_text()
    assert "nvidia-smi topo -m" in txt and "NV18" in txt
    recs = [json.loads(line) for line in files["jsonl"].read_text().splitlines()]
    assert recs[0]["record"] == "run" and recs[0]["meta"]["gpu_model"] == "NVIDIA H200"
    results = [r for r in recs if r["record"] == "result"]
    assert len(results) == 4
    # each result says what ran
    assert all(r["ranks"] == 2 and r["gpu_model"] == "NVIDIA H200" and r["nccl_version"] == "2.27.7"
               for r in results)
    assert sum(r["record"] == "comparison" for r in recs) == 4

    back = BenchResult.load(files["jsonl"])
    assert back.rows == res.rows
    assert back.nccl_tests_rows() == res.nccl_tests_rows()
    assert back.busbw("all_reduce", 134217728) == res.busbw("all_reduce", 134217728)
    assert back.ok


def test_slow_pairs_are_flagged_against_the_median():
    pairs = [{"a": 0, "b": 1, "busbw": 100.0}, {"a": 0, "b": 2, "busbw": 98.0}, {"a": 1, "b": 2, "busbw": 50.0},
             {"a": 0, "b": 3, "busbw": 101.0}]
    flag_slow(pairs, 0.8)  # median 99
    assert [p["slow"] for p in pairs] == [False, False, True, False]
    assert pairs[2]["ratio"] == pytest.approx(50 / 99)
    flag_slow(pairs, 1.0)
    assert [p["slow"] for p in pairs] == [False, True, True, False]


def test_pairs_table_and_heatmap(tmp_path):
    pairs = [{"level": "gpus", "a": 0, "b": 1, "size": 1 << 26, "time_us": 200.0, "busbw": 335.5, "wrong": 0,
              "where_a": "h GPU 0", "where_b": "h GPU 1"},
             {"level": "gpus", "a": 0, "b": 2, "size": 1 << 26, "time_us": 400.0, "busbw": 167.7, "wrong": 0,
              "where_a": "h GPU 0", "where_b": "h GPU 2"},
             {"level": "gpus", "a": 1, "b": 2, "size": 1 << 26, "time_us": 201.0, "busbw": 333.8, "wrong": 0,
              "where_a": "h GPU 1", "where_b": "h GPU 2"}]
    res = _result(pairs=pairs)
    res.options["pairwise_threshold"] = 0.8
    res.__post_init__()
    assert [p["a"] for p in res.slow_pairs] == [0] and res.slow_pairs[0]["b"] == 2
    assert "SLOW" in res.pairs_table() and "1 slow pair(s) of 3" in res.pairs_table()
    files = res.write(tmp_path)
    assert files["pairs_png"].read_bytes()[:4] == b"\x89PNG"
