"""`meshrun bench` checks for PyTorch before it submits anything."""

from __future__ import annotations

import importlib.util

from meshrun.bench._cli import main


def test_bench_without_torch_says_what_to_install_and_submits_nothing(monkeypatch, capsys, meshrun_home):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["-c", "all_reduce", "--backend", "local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install torch" in err
    assert not (meshrun_home / "jobs").exists() or not list((meshrun_home / "jobs").iterdir())
