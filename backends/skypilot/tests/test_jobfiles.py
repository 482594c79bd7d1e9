"""The vendored SkyPilot task YAMLs (tests/data/jobfiles/skypilot): SkyPilot accepts each offline, meshrun
imports each, no GPU request is lost, and the task meshrun's backend builds from the spec equals SkyPilot's
own parse of the original (resources, nodes, envs, secrets, run, setup)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshrun.testing import load_script

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data" / "jobfiles" / "skypilot"


def _script():
    return load_script("import_corpus.py")


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.yaml")))
def test_a_skypilot_file_translates_to_what_skypilot_reads(name, sky_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _script().check_file(DATA / name)
    assert r is not None and r["sky"] == "accepted" and r["meshrun"] == "imported", r
    assert not r.get("gpus_lost"), r
    assert r["translation"] == "equal", r


def test_secrets_given_a_value_in_the_file_translate_to_what_skypilot_reads(sky_home, tmp_path, monkeypatch):
    # a secret with a value written in the file (even an empty one) is a secret of the task SkyPilot builds
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "t.yaml"
    f.write_text('secrets:\n  HF_TOKEN: ""\n  API_KEY: abc\n  LATER: null\nrun: echo hi\n')
    r = _script().check_file(f)
    assert r["sky"] == "accepted" and r["meshrun"] == "imported", r
    assert r["translation"] == "equal", r


def test_gpus_only_an_instance_type_names_translate_to_what_skypilot_reads(sky_home, tmp_path, monkeypatch):
    # SkyPilot reads the instance's GPUs from its catalog; meshrun's spec asks for the same GPUs (from the
    # catalog it reads prices from), and the task its backend builds is SkyPilot's own parse of the file
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "t.yaml"
    f.write_text("resources:\n  infra: lambda\n  instance_type: gpu_1x_a100_sxm4\nrun: nvidia-smi\n")
    r = _script().check_file(f)
    assert r["sky"] == "accepted" and r["meshrun"] == "imported" and r["gpus"] == ["A100:1"], r
    assert not r.get("gpus_lost") and not r.get("skypilot_only"), r
    assert r["translation"] == "equal", r


def test_a_job_group_skypilot_accepts_is_refused_naming_execution(sky_home, tmp_path, monkeypatch):
    # SkyPilot's loader reads a job group by execution: parallel, whatever else its header holds
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "g.yaml"
    f.write_text("name: g\nexecution: parallel\nprimary_tasks: [a]\ntermination_delay: 10s\n---\n"
                 "name: a\nrun: echo a\n---\nname: b\nresources:\n  accelerators: L4:1\nrun: echo b\n")
    r = _script().check_file(f)
    assert r["kind"] == "skypilot" and r["tasks"] == 2 and r["sky"] == "accepted", r
    assert r["meshrun"] == "refused: execution" and "sky jobs launch" in r["reason"], r
