"""JobSpec.secrets: they reach the job's environment and are written nowhere (job store, plan, status, logs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import meshrun
from meshrun.testing import run_cli

INLINE = "inline-s3cr3t-'$(id)`x`"
FROM_ENV = "env-s3cr3t-\u00fcnic\u00f8de"


def _files_holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_secrets_reach_the_job_and_are_written_nowhere(tmp_path, meshrun_home, monkeypatch):
    monkeypatch.setenv("SUBMITTER_TOKEN", FROM_ENV)
    out = tmp_path / "digests"
    spec = meshrun.JobSpec(
        command=f'printf %s "$API_KEY" | sha256sum > {out}; printf %s "$SUBMITTER_TOKEN" | sha256sum >> {out}; '
                'echo "the job ran; PLAIN=$PLAIN"',
        env={"PLAIN": "visible"},
        secrets={"API_KEY": INLINE, "SUBMITTER_TOKEN": None},
    )
    assert INLINE not in repr(spec) and INLINE not in spec.to_json() and INLINE not in spec.summary()
    job = meshrun.submit(spec, backends=["local"])  # placement chooses: a plan is written too
    assert job.result(timeout=60) == 0
    digests = [line.split()[0] for line in out.read_text().splitlines()]
    assert digests == [hashlib.sha256(s.encode()).hexdigest() for s in (INLINE, FROM_ENV)]
    assert "PLAIN=visible" in job.logs()
    assert (job.job_dir / "plan.json").exists() or any(job.job_dir.glob("plan*"))
    shown = "".join(run_cli(*args).stdout for args in (("status", job.id), ("status", "--json", job.id),
                                                        ("ls", "--json"), ("logs", job.id)))
    for secret in (INLINE, FROM_ENV):
        assert _files_holding(meshrun_home, secret) == []
        assert secret not in shown
    assert json.loads((job.job_dir / "spec.json").read_text())["secrets"] == {"API_KEY": None,
                                                                              "SUBMITTER_TOKEN": None}


def test_a_null_secret_missing_from_the_environment_is_refused_at_submit(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    spec = meshrun.JobSpec(command="true", secrets=["NOT_SET_ANYWHERE"])
    with pytest.raises(meshrun.SpecError) as e:
        meshrun.submit(spec, backend="local")
    assert e.value.field == "secrets.NOT_SET_ANYWHERE" and "export" in str(e.value)


def test_a_backend_that_cannot_carry_secrets_is_passed_over_with_the_reason():
    from meshrun._registry import get_backend
    from meshrun.backend import Feature

    spec = meshrun.JobSpec(command="true", secrets={"K": "v"})
    assert Feature.SECRETS in get_backend("local").features
    assert Feature.SECRETS not in get_backend("ssh").features
    p = meshrun.plan(spec, backends=["local", "ssh"])
    assert p.chosen is not None and p.chosen.backend == "local"
    why = [r.offer.reason for r in p.rejected if r.offer.backend == "ssh"]
    assert why and "cannot pass secrets" in why[0]


@pytest.mark.parametrize("value, field", [
    ({"1BAD": "x"}, "secrets"),
    ({"K": ["x"]}, "secrets"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "secrets"),
])
def test_bad_secrets_name_the_field(value, field):
    with pytest.raises(meshrun.SpecError) as e:
        meshrun.JobSpec(command="true", secrets=value)
    assert e.value.field == field


def test_a_name_in_env_and_secrets_is_refused():
    with pytest.raises(meshrun.SpecError) as e:
        meshrun.JobSpec(command="true", env={"K": "1"}, secrets={"K": "2"})
    assert e.value.field == "secrets.K"
