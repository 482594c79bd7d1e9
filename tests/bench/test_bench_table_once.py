"""`meshrun bench` prints its result table once: the progress shown while the job runs leaves the table to
the final report."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest


def test_progress_passes_start_up_and_errors_but_not_the_table():
    from meshrun.bench._cli import _Progress

    out = io.StringIO()
    p = _Progress(out)
    for chunk in ["[bench] node 0/1 on vm: start", "ing 2 CPU rank(s) of 2\n# meshrun bench: 2 rank(s)\n",
                  "#\n# all_reduce\n#       size         count\n", "           8             2     float     sum",
                  "      -1   1.0\n          16             4     float     sum      -1   1.0\n",
                  "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom"]:
        p(chunk)
    p.close()
    assert out.getvalue().splitlines() == [
        "[bench] node 0/1 on vm: starting 2 CPU rank(s) of 2",
        "Traceback (most recent call last):", '  File "x.py", line 1', "RuntimeError: boom"]


def test_progress_on_a_terminal_is_one_status_line_that_is_cleared():
    from meshrun.bench._cli import _Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    p = _Progress(out)
    p("# all_reduce\n           8             2     float\n          16             4     float\n")
    p.close()
    text = out.getvalue()
    assert "\n" not in text  # nothing stays on the screen
    assert "[bench] all_reduce 8 B" in text and "[bench] all_reduce 16 B" in text and text.endswith("\r\x1b[K")


@pytest.mark.slow
def test_bench_cli_prints_the_table_once(tmp_path):
    pytest.importorskip("torch")
    env = {**os.environ, "MESHRUN_HOME": str(tmp_path / "home"), "MESHRUN_CONFIG": os.devnull}
    out = subprocess.run([sys.executable, "-m", "meshrun", "bench", "--device", "cpu", "-e", "64", "-w", "1",
                          "-n", "2", "--no-plot", "--backend", "local", "--out", str(tmp_path / "out")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout
    lines = out.stdout.splitlines()
    rows = [line for line in lines if line.split()[:1] == ["64"]]
    assert len(rows) == 1, out.stdout  # the 64-byte row, once
    assert lines.count("# all_reduce") == 1, out.stdout
    assert sum(line.startswith("# meshrun bench:") for line in lines) == 1, out.stdout
    assert any(line.startswith("[bench] node 0/1") for line in lines)  # the progress still shows start-up
