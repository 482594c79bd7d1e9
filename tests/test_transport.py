"""The job transport: one record format the agent writes, one reader in the core. Framed records in a log
(nonce, parts, checksum), a real agent run that emits them, the agent's ``records`` command, and a cut or
altered result in a real job folder reported as JobLost, never unpickled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import meshrun
import meshrun.backend as mb
from meshrun import _agent

AGENT = str(Path(_agent.__file__))


@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


def test_the_agent_and_the_core_name_the_same_records():
    assert tuple(mb.RESULT_FILES) == _agent.RECORDS


FILES = {"exit.json": b"{\"state\": \"succeeded\"}", "result.pkl": os.urandom(3000)}


def test_framed_records_round_trip_through_prefixed_coloured_lines():
    frame = _agent.frame_records("n0nce", "job1", 0, FILES)
    assert len(frame.splitlines()) > 2  # several parts and the checksum line
    noisy = "".join(f"(head, rid=1) \x1b[32m{line}\x1b[0m\n" for line in frame.splitlines())
    text = "hello\n" + noisy + "bye\n"
    assert mb.extract_records(text, "n0nce") == FILES
    assert mb.extract_records(text, "other") is None  # another job's nonce: not these records
    assert mb.extract_records(text, "n0nce", rank=1) is None
    assert mb.strip_records("hello\n" + frame + "bye\n") == "hello\nbye\n"


def test_a_later_frame_wins_and_unknown_names_are_dropped():
    first = _agent.frame_records("n", "j", 0, {"exit.json": b"1"})
    second = _agent.frame_records("n", "j", 0, {"exit.json": b"2", "../../etc/passwd": b"x"})
    assert mb.extract_records(first + second, "n") == {"exit.json": b"2"}


@pytest.mark.parametrize("damage", ["drop_part", "drop_checksum", "flip_data", "wrong_checksum"])
def test_a_cut_or_altered_frame_is_an_error_that_says_so(damage):
    lines = _agent.frame_records("n", "j", 0, FILES).splitlines()
    if damage == "drop_part":
        del lines[1]
    elif damage == "drop_checksum":
        del lines[-1]
    elif damage == "flip_data":
        data = lines[0].rsplit(":", 3)[1]
        lines[0] = lines[0].replace(data, data[:40] + ("A" if data[40] != "A" else "B") + data[41:])
    else:
        lines[-1] = lines[-1][:-6] + ("0000::" if not lines[-1].endswith("0000::") else "1111::")
    with pytest.raises(mb.RecordError, match="cut short|checksum|decoded"):
        mb.extract_records("\n".join(lines) + "\n", "n")


def test_the_log_filter_hides_frames_across_chunk_boundaries():
    text = "partial line without newline" + "\n" + _agent.frame_records("n", "j", 0, FILES) + "tail"
    for size in (1, 7, 64, 5000):
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        assert "".join(mb.LogFilter().feed_all(chunks)) == "partial line without newline\ntail"


def test_write_records_takes_only_record_names(tmp_path):
    mb.write_records(tmp_path, {"exit.json": b"{}"}, also=["output.log"])
    assert (tmp_path / "exit.json").read_bytes() == b"{}"
    assert oct((tmp_path / "exit.json").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(mb.RecordError, match="not a record"):
        mb.write_records(tmp_path, {"../evil": b"x"})
    assert not (tmp_path.parent / "evil").exists()


def test_emit_records_runs_the_job_streams_its_output_and_frames_its_records(tmp_path):
    job = meshrun.submit(lambda: print("working") or 6 * 7)
    assert job.result(timeout=120) == 42
    src = job.job_dir
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "payload.pkl").write_bytes((src / "payload.pkl").read_bytes())
    launch = json.loads((src / "launch.json").read_text())
    (inputs / "launch.json").write_text(json.dumps(dict(launch, cwd=None)))  # the node's cwd is the job's
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.run(mb.agent_command(sys.executable, AGENT, str(tmp_path / "pod"), "n0nce1", inputs=str(inputs)),
                       capture_output=True, text=True, cwd=work, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "working\n" in p.stdout
    files = mb.extract_records(p.stdout, "n0nce1")
    assert files is not None and set(files) >= {"exit.json", "state.json", "result.pkl"}
    mb.write_records(tmp_path / "back", files)
    from meshrun._transport import load_result

    assert load_result(tmp_path / "back", "j") == 42
    assert json.loads((tmp_path / "pod" / "launch.json").read_text())["cwd"] == str(work)
    assert mb.strip_records(p.stdout).strip() == "working"


def test_emit_records_replaces_a_too_large_result_and_exits_no_retry(tmp_path):
    job = meshrun.submit(lambda: b"x" * 5000)
    job.result(timeout=120)
    p = subprocess.run(mb.agent_command(sys.executable, AGENT, str(tmp_path / "pod"), "n", inputs=str(job.job_dir),
                                        max_result=1000), capture_output=True, text=True, timeout=120)
    assert p.returncode == mb.NO_RETRY_EXIT
    files = mb.extract_records(p.stdout, "n")
    assert files is not None and "result.pkl" not in files
    assert json.loads(files["error.json"])["type"] == "ResultTooLarge"
    assert json.loads(files["exit.json"])["state"] == "failed"


def test_the_records_command_reads_several_job_folders(tmp_path):
    a, b = meshrun.submit(lambda: 1), meshrun.submit(lambda: 2)
    meshrun.wait([a, b], timeout=120)
    p = subprocess.run([sys.executable, AGENT, "records", str(a.job_dir), str(b.job_dir), str(tmp_path / "none")],
                       capture_output=True, text=True, check=True)
    recs = mb.parse_exit_records(p.stdout)
    assert recs[str(a.job_dir)][0]["state"] == "succeeded"
    assert recs[str(b.job_dir)][0]["result_sha256"]
    assert recs[str(tmp_path / "none")] == [None]
    assert mb.exit_records([str(a.job_dir)]) == {str(a.job_dir): recs[str(a.job_dir)]}


# ---- a damaged result in a real job folder ----------------------------------------------------------


@pytest.mark.parametrize("damage, match", [("truncate", "truncated"), ("alter", "checksum")])
def test_a_damaged_result_is_joblost_and_never_unpickled(tmp_path, damage, match):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):  # unpickling this would create the marker file
            return (open, (str(marker), "w"))

    job = meshrun.submit(lambda: ["padding" * 50, 1])
    job.wait(timeout=120)
    p = job.job_dir / "result.pkl"
    data = p.read_bytes()
    import pickle

    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    else:  # same size, a different (and dangerous) pickle
        evil = pickle.dumps(Boom())
        p.write_bytes(evil + b" " * (len(data) - len(evil)) if len(evil) <= len(data) else evil)
    with pytest.raises(meshrun.JobLost, match=match) as e:
        job.result()
    assert "not unpickled" in str(e.value)
    assert not marker.exists()


def test_records_from_log_turns_a_damaged_frame_into_a_lost_exit_record():
    lines = _agent.frame_records("n", "j", 0, FILES).splitlines()
    files = mb.records_from_log("\n".join(lines[:-1]) + "\n", "n")
    st = mb.map_agent_status(json.loads(files["exit.json"]))
    assert st.state is meshrun.JobState.LOST and "cut short" in st.reason
    assert set(files) == {"exit.json"}  # nothing of the damaged frame is kept
    assert mb.records_from_log("no frame here\n", "n") is None
