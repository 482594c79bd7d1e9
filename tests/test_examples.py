"""The examples run as documented: quickstart with no GPU, and with declared GPUs (a masked GPU job)."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    """These tests are about the local backend: pin it, whatever other backends are installed."""
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_cpu_only():
    env = {k: v for k, v in os.environ.items() if k != "MESHRUN_GPUS"}
    p = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True,
                       timeout=300, env={**env, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert "final loss" in p.stdout and "hello from" in p.stdout and "no GPUs here" in p.stdout


def test_quickstart_with_declared_gpus():
    p = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "MESHRUN_GPUS": "0,1"})
    assert p.returncode == 0, p.stderr
    assert "GPU job" in p.stdout and "CUDA_VISIBLE_DEVICES=0 " in p.stdout
