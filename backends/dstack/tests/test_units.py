"""Status mapping, records through the log, settings and token resolution, API version negotiation."""

from __future__ import annotations

import io
import tarfile

import pytest

import meshrun
import meshrun.backend as mb
from meshrun_dstack import _client, _settings, _status, _task

S = meshrun.JobState
runs_models = pytest.importorskip("dstack._internal.core.models.runs")


# ---- every dstack status and reason is in the table ----------------------------------------------------


def test_every_dstack_status_and_termination_reason_is_mapped():
    assert {s.value for s in runs_models.RunStatus} == set(_status.RUN_STATES)
    assert {s.value for s in runs_models.JobStatus} == set(_status.JOB_STATES)
    assert {r.value for r in runs_models.RunTerminationReason} == set(_status.RUN_TERMINATION)
    assert {r.value for r in runs_models.JobTerminationReason} == set(_status.JOB_TERMINATION)


def run(status, *, reason=None, msg=None, job=None, jreason=None, jmsg=None, exit_status=None, provisioned=False):
    sub = {"id": "00000000-0000-0000-0000-000000000001", "status": job or status,
           "termination_reason": jreason, "termination_reason_message": jmsg, "exit_status": exit_status,
           "submitted_at": "2026-01-01T00:00:00Z", "finished_at": None,
           "job_provisioning_data": {"backend": "aws", "region": "us-east-1", "instance_type": {"name": "g5.xlarge"},
                                     "hostname": "10.0.0.1"} if provisioned else None}
    return {"status": status, "status_message": msg or status, "termination_reason": reason,
            "last_processed_at": "2026-01-01T00:01:00Z", "jobs": [{"job_submissions": [sub]}]}


@pytest.mark.parametrize("r,state", [
    (run("pending", msg="retrying", job="failed", jreason="failed_to_start_due_to_no_capacity",
         jmsg="No matching fleet found"), S.PENDING),
    (run("submitted"), S.PENDING),
    (run("submitted", job="terminating", jreason="failed_to_start_due_to_no_capacity"), S.PENDING),
    (run("provisioning", job="failed", jreason="failed_to_start_due_to_no_capacity"), S.PENDING),
    (run("provisioning"), S.PENDING),
    (run("running", job="pulling", provisioned=True), S.PENDING),
    (run("running", provisioned=True), S.RUNNING),
    (run("terminating", reason="stopped_by_user", provisioned=True), S.RUNNING),
    (run("terminating", reason="stopped_by_user"), S.PENDING),
    (run("terminated", reason="stopped_by_user", job="failed", jreason="failed_to_start_due_to_no_capacity"),
     S.CANCELLED),
    (run("terminated", reason="aborted_by_user", job="aborted", jreason="aborted_by_user"), S.CANCELLED),
    (run("failed", reason="job_failed", job="failed", jreason="failed_to_start_due_to_no_capacity",
         jmsg="No matching fleet found"), S.FAILED),
    (run("failed", reason="job_failed", job="failed", jreason="container_exited_with_error", exit_status=3,
         provisioned=True), S.FAILED),
    (run("failed", reason="job_failed", job="failed", jreason="interrupted_by_no_capacity", provisioned=True),
     S.PREEMPTED),
    (run("terminated", reason="job_failed", job="terminated", jreason="max_duration_exceeded", provisioned=True),
     S.TIMEOUT),
    (run("done", reason="all_jobs_done", job="done", jreason="done_by_runner", exit_status=0, provisioned=True),
     S.SUCCEEDED),
    (run("failed", reason="retry_limit_exceeded"), S.FAILED),
    (run("failed", reason="server_error"), S.FAILED),
    (run("something_new"), S.UNKNOWN),
])
def test_status_mapping(r, state):
    st = _status.map_run(r)
    assert st.state is state, st


def test_no_capacity_reason_and_where_and_exit_code():
    st = _status.map_run(run("failed", reason="job_failed", job="failed",
                             jreason="failed_to_start_due_to_no_capacity", jmsg="No matching fleet found. Possible"))
    assert "no capacity: No matching fleet found" in st.reason and st.where is None
    st = _status.map_run(run("failed", reason="job_failed", job="failed", jreason="container_exited_with_error",
                             exit_status=3, provisioned=True))
    assert st.exit_code == 3 and st.where == "aws/us-east-1 g5.xlarge (10.0.0.1)" and "exit status 3" in st.reason
    st = _status.map_run(run("pending", msg="retrying", job="failed", jreason="failed_to_start_due_to_no_capacity",
                             jmsg="No matching fleet found"))
    assert st.reason.startswith("retrying") and "last attempt: no capacity" in st.reason


# ---- the function job's command ------------------------------------------------------------------------------


def test_the_function_command_runs_the_agent_with_the_jobs_nonce():
    cmd = _task.function_command("/work dir/j1", cloudpickle_version=None, nonce="n0nce")
    assert cmd == '"${MESHRUN_PYTHON:-python3}" \'/work dir/j1/_agent.py\' run \'/work dir/j1\' --emit-records n0nce'
    assert "${{" not in cmd  # nothing for dstack's interpolation


def test_tar_members_are_rooted_at_the_base_name(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / "sub" / "b.txt").write_text("b")
    (tmp_path / "outside.txt").write_text("o")
    (tmp_path / "d" / "link").symlink_to(tmp_path / "outside.txt")
    data = _task.tar_tree(tmp_path / "d", "d")
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        names = t.getnames()
        assert names == ["d", "d/sub", "d/a.txt", "d/link", "d/sub/b.txt"]
        assert t.extractfile("d/link").read() == b"o"  # a link out of the tree travels as the file
    assert _task.tar_tree(tmp_path / "d", "d") == data  # stable, so its hash is too
    data = mb.pack_job({"launch.json": b"{}"}, root="job1")
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert t.getnames() == ["job1", "job1/_agent.py", "job1/launch.json"]
    assert mb.pack_job({"launch.json": b"{}"}, root="job1") == data


# ---- settings and where the token comes from ----------------------------------------------------------


def write_config(path, projects):
    import yaml

    path.write_text(yaml.safe_dump({"projects": projects}))


def test_token_from_dstacks_config(tmp_path):
    cfg = tmp_path / "config.yml"
    write_config(cfg, [{"name": "other", "url": "http://o:3000", "token": "t-other"},
                       {"name": "lab", "url": "http://lab:3000/", "token": "t-lab", "default": True}])
    s = _settings.load_settings({"dstack_config": str(cfg)})
    c = _settings.resolve(s)
    assert (c.url, c.project, c.token.get_secret_value()) == ("http://lab:3000", "lab", "t-lab")
    assert "t-lab" not in repr(c) and "t-lab" not in str(c)
    c = _settings.resolve(_settings.load_settings({"dstack_config": str(cfg), "project": "other"}))
    assert (c.url, c.token.get_secret_value()) == ("http://o:3000", "t-other")


def test_meshrun_settings_win_and_a_token_never_goes_to_another_server(tmp_path):
    cfg = tmp_path / "config.yml"
    write_config(cfg, [{"name": "main", "url": "http://lab:3000", "token": "t-lab", "default": True}])
    c = _settings.resolve(_settings.load_settings({"dstack_config": str(cfg), "token": "mine"}))
    assert c.token.get_secret_value() == "mine" and c.url == "http://lab:3000"
    c = _settings.resolve(_settings.load_settings({"dstack_config": str(cfg), "endpoint": "http://elsewhere:3000"}))
    assert c.url == "http://elsewhere:3000" and c.token is None


def test_no_server_anywhere(tmp_path):
    assert _settings.resolve(_settings.load_settings({"dstack_config": str(tmp_path / "none.yml")})) is None


def test_settings_errors_name_the_key_and_hide_the_token():
    with pytest.raises(meshrun.ConfigError) as e:
        _settings.load_settings({"tokn": "x"})
    assert e.value.field == "backends.dstack.tokn" and "token" in str(e.value) and "endpoint" in str(e.value)
    with pytest.raises(meshrun.ConfigError) as e:
        _settings.load_settings({"token": 123456789})
    assert "123456789" not in str(e.value)
    with pytest.raises(meshrun.ConfigError) as e:
        _settings.load_settings({"endpoint": "localhost:3000"})
    assert e.value.field == "backends.dstack.endpoint"


def test_backend_repr_and_config_hide_the_token(monkeypatch):
    monkeypatch.setenv("MESHRUN_DSTACK_TOKEN", "sekrit-token-value")
    meshrun.configure()
    b = meshrun.get_backend("dstack")
    for text in (repr(b), str(b.config), repr(b.settings), str(b.settings.model_dump())):
        assert "sekrit-token-value" not in text


def test_env_settings_are_typed(monkeypatch):
    monkeypatch.setenv("MESHRUN_DSTACK_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MESHRUN_DSTACK_INSTALL_CLOUDPICKLE", "false")
    meshrun.configure()
    b = meshrun.get_backend("dstack")
    assert b.settings.request_timeout == 5.0 and b.settings.install_cloudpickle is False


def test_old_setting_names_warn_and_still_work():
    with pytest.warns(DeprecationWarning) as got:
        s = _settings.load_settings({"url": "http://h:3000", "timeout": 5})
    assert len(got) == 2 and any("'url' of DstackSettings is now called 'endpoint'" in str(w.message) for w in got)
    assert (s.endpoint, s.request_timeout) == ("http://h:3000", 5.0)


# ---- API version negotiation ---------------------------------------------------------------------------


@pytest.mark.parametrize("server,sent", [
    ("0.22.5", "0.22.5"),
    ("0.22.9", "0.22.5"),
    ("0.23.1", "0.22.5"),  # a newer server answers older clients in their dialect
    ("1.0.0", "0.22.5"),
    ("0.21.3", "0.21.3"),  # an older one is spoken to in its own version
    ("0.20.0", "0.20.0"),
    ("0.0.0", None),  # a development build: no header (dstack's "latest")
    (None, None),
])
def test_negotiation(server, sent):
    assert _client.negotiate(server) == sent


def test_too_old_server_is_refused_clearly():
    with pytest.raises(_client.DstackIncompatible) as e:
        _client.negotiate("0.19.30")
    assert "0.19.30" in str(e.value) and "upgrade" in str(e.value)


def test_scrub():
    c = _client.DstackClient("http://x", "main", _settings.DstackSettings(token="abc-123").token)
    assert c.scrub("token abc-123 and Bearer zzz") == "token *** and Bearer ***"
