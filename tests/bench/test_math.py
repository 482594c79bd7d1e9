"""The benchmark's arithmetic against values worked out by hand (and against nccl-tests' own formulas)."""

from __future__ import annotations

import pytest

from meshrun.bench import _math
from meshrun.bench._math import algbw, busbw, busbw_factor, counts, float_str, parse_bytes, sweep


def test_busbw_factors_are_nccl_tests_ones():
    # all_reduce 2(n-1)/n; all_gather, reduce_scatter, alltoall (n-1)/n; broadcast and sendrecv 1
    assert busbw_factor("all_reduce", 2) == 1.0
    assert busbw_factor("all_reduce", 8) == 1.75
    assert busbw_factor("all_reduce", 1) == 0.0
    assert busbw_factor("all_gather", 8) == 0.875
    assert busbw_factor("reduce_scatter", 4) == 0.75
    assert busbw_factor("alltoall", 16) == 0.9375
    assert busbw_factor("broadcast", 8) == 1.0
    assert busbw_factor("sendrecv", 8) == 1.0
    assert busbw_factor("allreduce", 4) == 1.5  # nccl-tests' spelling works too


def test_algbw_and_busbw_by_hand():
    # 1 GiB in 10 ms: 1073741824 / 1e9 / 0.01 = 107.3741824 GB/s (GB = 1e9 bytes)
    assert algbw(1 << 30, 0.01) == pytest.approx(107.3741824)
    # all_reduce on 8 ranks: x 1.75
    assert busbw("all_reduce", 1 << 30, 0.01, 8) == pytest.approx(187.9048192)
    # the reference: 4 GiB all_reduce on 2 GPUs at 344.8 GB/s busbw (factor 1) takes 12.457 ms
    t = (4 << 30) / 344.8e9
    assert busbw("all_reduce", 4 << 30, t, 2) == pytest.approx(344.8)
    assert algbw(0, 1e-6) == 0.0


def test_counts_follow_nccl_tests_rounding():
    # all_reduce, broadcast, sendrecv: count = size / element size
    c = counts("all_reduce", 10, 4, 2)
    assert (c.send, c.recv, c.param, c.size) == (2, 2, 2, 8)
    # all_gather on 3 ranks, 1024 B of float: 256 elements, 256 // 3 = 85, rounded down to a multiple of
    # 16 bytes (4 floats) = 84 per rank; the reported size is the receive buffer, 3 x 84 x 4 = 1008 B
    c = counts("all_gather", 1024, 4, 3)
    assert (c.send, c.recv, c.param, c.send_inplace_offset, c.size) == (84, 252, 84, 84, 1008)
    # reduce_scatter: the send buffer is the big one; in-place receives at recvbuff + rank x 84
    c = counts("reduce_scatter", 1024, 4, 3)
    assert (c.send, c.recv, c.param, c.recv_inplace_offset, c.size) == (252, 84, 84, 84, 1008)
    # 8 B of float on 2 ranks: 1 element per rank, rounded down to 0 (nccl-tests prints size 0)
    assert counts("reduce_scatter", 8, 4, 2).param == 0
    # alltoall, bf16 on 8 ranks: 2048 elements, 256 per rank (multiple of 8) -> 4096 B
    c = counts("alltoall", 4096, 2, 8)
    assert (c.send, c.recv, c.param, c.size) == (2048, 2048, 256, 4096)
    # int8: 16-byte alignment is 16 elements
    assert counts("all_gather", 100, 1, 2).param == 48


def test_sweeps():
    assert sweep(8, 64, 2) == [8, 16, 32, 64]
    assert sweep(8, 100, 3) == [8, 24, 72]
    assert sweep(100, 400, 1, 100) == [100, 200, 300, 400]
    assert len(sweep(8, 8 << 30, 2)) == 31  # -b 8 -e 8G -f 2
    with pytest.raises(ValueError):
        sweep(0, 8, 2)
    with pytest.raises(ValueError):
        sweep(64, 8, 2)
    with pytest.raises(ValueError):
        sweep(8, 64, 1)  # neither a factor nor a step


def test_sizes_read_like_nccl_tests():
    assert parse_bytes("8G") == 8 * 1024**3
    assert parse_bytes("64K") == 65536
    assert parse_bytes("128M") == 128 * 1024**2
    assert parse_bytes("512MiB") == 512 * 1024**2
    assert parse_bytes("1GB") == 10**9
    assert parse_bytes("1.5K") == 1536
    assert parse_bytes(8) == 8
    for bad in ("", "8X", "-1", True):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_float_formatting_is_nccl_tests_getfloatstr():
    assert float_str(10.45, 7) == "  10.45"
    assert float_str(1234.567, 7) == "1234.57"
    assert float_str(12345.678, 7) == "12345.7"
    assert float_str(1234567.8, 7) == "1234568"
    assert float_str(12345678.9, 7) == "1.2e+07"
    assert float_str(344.8, 6) == "344.80"
    assert float_str(1000.0, 6) == "1000.0"
    assert float_str(0.001, 6) == "  0.00"


def test_table_line_matches_nccl_tests_layout():
    line = _math.line_preamble(8, 2, "float", "sum", -1) + _math.line_body(10.45, 0.0, 0.0, 0) + \
        _math.line_body(10.21, 0.0, 0.0, 0)
    assert line == ("           8             2     float     sum      -1"
                    "    10.45    0.00    0.00       0    10.21    0.00    0.00       0")
    assert _math.line_body(5.0, 1.0, 1.0, None).endswith("    N/A")
    hdr = _math.table_header()
    assert hdr[1].startswith("#       size         count      type   redop    root     time   algbw   busbw  #wrong")


def test_check_pattern_sums_are_exact():
    # value(rank, i) = (i + 3 rank) mod m; T[c] = sum over ranks -> worked out for 2 ranks, m = 4:
    # c=0: 0+3, c=1: 1+0, c=2: 2+1, c=3: 3+2
    assert _math.sum_table(2, 4) == [3, 1, 3, 5]
    # the modulus keeps every sum within the dtype's exact integers
    assert _math.pattern_modulus("bfloat16", 64) == 5  # 64 x 4 = 256 = 2^8
    assert _math.pattern_modulus("bfloat16", 2) == 16
    assert _math.pattern_modulus("int8", 16) == 8  # 16 x 7 = 112 <= 127
    assert _math.pattern_modulus("uint8", 300) == 1
    for dtype in _math.DTYPES:
        for n in (1, 2, 3, 8, 64, 1024):
            m = _math.pattern_modulus(dtype, n)
            assert n * (m - 1) <= _math.EXACT_LIMIT[dtype]
    assert _math.poison_value("uint8") == 255 and _math.poison_value("float32") == -1


def test_time_reduction_like_nccl_tests_average_flag():
    assert _math.reduce_times([1.0, 2.0, 3.0], "avg") == 2.0
    assert _math.reduce_times([1.0, 2.0, 3.0], "max") == 3.0
    assert _math.reduce_times([1.0, 2.0, 3.0], "min") == 1.0
    assert _math.reduce_times([4.0, 2.0], "rank0") == 4.0


def test_names():
    assert _math.parse_collectives("all") == _math.COLLECTIVES
    assert _math.parse_collectives("allreduce, all_gather,allreduce") == ("all_reduce", "all_gather")
    assert _math.canonical_dtype("bf16") == "bfloat16"
    with pytest.raises(ValueError, match="choose from"):
        _math.parse_collectives("gather")
    assert _math.redop_and_root("broadcast") == ("none", 0)
    assert _math.redop_and_root("sendrecv") == ("sum", -1)
