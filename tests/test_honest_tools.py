"""Tools that tell the truth: rejections name every violated constraint, `meshrun offers` prints what the
docs show, `meshrun bench` prints its table once, a command job's notebook cell shows its output, and the
docs' log-following examples print something."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import meshrun
from meshrun import JobSpec

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _snapshot() -> Path | None:
    """The catalog snapshot (``shared/catalogs/v8`` beside the checkout), or ``$MESHRUN_CATALOG_DIR``."""
    env = os.environ.get("MESHRUN_CATALOG_DIR")
    cands = [Path(env)] if env else []
    cands += [p / "shared" / "catalogs" / "v8" for p in REPO.parents]
    return next((c for c in cands if (c / "lambda" / "vms.csv").is_file()), None)


SNAP = _snapshot()
needs_snapshot = pytest.mark.skipif(SNAP is None, reason="the catalog snapshot (shared/catalogs/v8) is not here")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshrun", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# ---- a rejected catalog offer names every violated constraint ---------------------------------------------


@needs_snapshot
def test_uninstalled_launcher_rejection_also_names_price_and_spot(fake_gpus):
    fake_gpus(0)
    meshrun.configure({"placement": {"catalog_dir": str(SNAP), "cloud_launcher": "skyless"}})
    p = meshrun.plan(JobSpec(command=["true"], gpus="H100:1"), backends=["local", "skyless"],
                     max_price_per_hour=2, raise_on_empty=False)
    assert p.chosen is None
    sky = [(o, r) for o, r in p.rejected if o.backend == "skyless"]
    assert sky
    for o, why in sky:
        assert "skyless backend, which is not installed" in why, why
        if o.total_price_per_hour > 2:
            assert f"${o.total_price_per_hour:.2f}/h is above max_price_per_hour $2.00/h" in why, why
        else:
            assert "above max_price_per_hour" not in why, why
        assert ("spot is not allowed" in why) == o.spot, why
    # the $3.29 lambda H100 named in the docs is among them, with both reasons
    assert any(abs(o.total_price_per_hour - 3.29) < 1e-9 and "above max_price_per_hour" in why for o, why in sky)
    # an offer that cannot run for a reason of its own keeps that reason first
    local = [why for o, why in p.rejected if o.backend == "local"]
    assert local and all("GPU" in why.split(";")[0] for why in local)
