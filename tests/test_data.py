"""Object-store inputs and outputs (docs/data.md): the spec's fields, and jobs on the local backend against a
real S3 server (SeaweedFS, started by conftest.py's s3_server): inputs staged, outputs uploaded per policy,
corruption detected, resumed downloads, the cache, and the endpoint and credentials written nowhere."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

import meshrun
from meshrun.testing import files_holding, run_cli, wait_until

# ---- the spec --------------------------------------------------------------------------------------


def test_inputs_and_outputs_in_their_short_and_long_forms():
    spec = meshrun.JobSpec(command=["true"], inputs={"s3://lab-data/imagenet/": "data/"},
                           outputs={"ckpt/": {"destination": "s3://lab-ckpt/run1", "on": "success,cancel",
                                              "every": "10m"}, "log.txt": "s3://lab-ckpt/logs/"})
    assert [(i.source, i.path) for i in spec.inputs] == [("s3://lab-data/imagenet/", "data/")]
    ck, log = spec.outputs
    assert (ck.destination, ck.on, ck.every) == ("s3://lab-ckpt/run1/", ("success", "cancel"), 600.0)
    assert (log.path, log.destination, log.on, log.every) == ("log.txt", "s3://lab-ckpt/logs/", ("success",), None)
    again = meshrun.JobSpec.from_json(spec.to_json())
    assert again.inputs == spec.inputs and again.outputs == spec.outputs


@pytest.mark.parametrize("fields, field, words", [
    ({"inputs": {"https://x/y": "d"}}, "inputs['https://x/y'].source", "s3://bucket"),
    ({"inputs": {"s3://Bad_Bucket/y": "d"}}, "inputs['s3://Bad_Bucket/y'].source", "bucket name"),
    ({"inputs": [{"source": "s3://lab-data/a"}]}, "inputs[0].path", "missing"),
    ({"inputs": [{"source": "s3://lab-data/a", "path": "d", "mode": "ro"}]}, "inputs[0].mode", "unknown key"),
    ({"inputs": {"s3://lab-data/a": "../up"}}, "inputs['s3://lab-data/a'].path", ".."),
    ({"inputs": {"s3://lab-data/a": "d", "s3://lab-data/b": "d/"}}, "inputs['s3://lab-data/b'].path", "path of"),
    ({"inputs": "s3://lab-data/a"}, "inputs", "mapping"),
    ({"outputs": {"o/": {"destination": "s3://lab-data/x", "on": ["sometimes"]}}}, "outputs['o/'].on",
     "success, failure, cancel"),
    ({"outputs": {"o/": {"destination": "s3://lab-data/x", "every": "1s"}}}, "outputs['o/'].every", "at least"),
    ({"outputs": {"o/": {"destination": "s3://lab-data/x", "every": "soon"}}}, "outputs['o/'].every", ""),
    ({"outputs": [{"path": "o/"}]}, "outputs[0].destination", "missing"),
])
def test_bad_inputs_and_outputs_name_the_field(fields, field, words):
    with pytest.raises(meshrun.SpecError) as e:
        meshrun.JobSpec(command=["true"], **fields)
    assert e.value.field == field and words in str(e.value)


def test_a_backend_that_cannot_stage_data_is_passed_over_with_its_reason():
    import meshrun.backend as mb
    from meshrun._gather import _ask

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from subprocess_backend import SubprocessBackend  # the minimal backend: no Feature.DATA

    class NoStager(SubprocessBackend):
        data_refusal = "its nodes have no Python for the stager"

    spec = meshrun.JobSpec(command=["true"], inputs={"s3://lab-data/a": "a"})
    for name, cls, why in (("nostager", NoStager, "its nodes have no Python for the stager"),
                           ("subprocess", SubprocessBackend, "it does not run the node-side stager")):
        mb.register_backend(name, cls)
        try:
            offers, _ = _ask(name, spec)
        finally:
            mb.unregister_backend(name)
        assert not offers[0].fits
        assert offers[0].reason == f"the {name} backend cannot move the job's object-store inputs/outputs: {why}"
    for name in ("kubernetes", "dstack", "skypilot"):  # every backend of this project stages data
        try:
            offers, _ = _ask(name, spec)
        except meshrun.MeshrunError:
            continue
        assert all("object-store inputs/outputs" not in (o.reason or "") for o in offers), offers


# ---- jobs against the S3 server -------------------------------------------------------------------


def _put(s3, key: str, body: bytes, **kw) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body, **kw)


def _get(s3, key: str) -> bytes:
    return s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def test_inputs_staged_outputs_uploaded_cache_hit_and_no_credentials_written(s3, tmp_path, meshrun_home):
    import io

    from boto3.s3.transfer import TransferConfig

    big = os.urandom((9 << 20) + 12345)  # a multi-part object (uploaded in 4 MiB parts)
    s3.client.upload_fileobj(io.BytesIO(big), s3.bucket, "set/big.bin",
                             Config=TransferConfig(multipart_threshold=4 << 20, multipart_chunksize=4 << 20))
    _put(s3, "set/a.txt", b"alpha\n")
    _put(s3, "set/sub/b.txt", b"beta\n")
    _put(s3, "one/config.json", b'{"lr": 0.1}')
    work = tmp_path / "work"
    work.mkdir()
    spec = meshrun.JobSpec(
        command='cat data/a.txt data/sub/b.txt conf.json > out/seen.txt && sha256sum data/big.bin >> out/seen.txt',
        workdir=str(work), setup=["mkdir -p out"],
        inputs={f"s3://{s3.bucket}/set/": "data/", f"s3://{s3.bucket}/one/config.json": "conf.json"},
        outputs={"out/": f"s3://{s3.bucket}/results/run1/"})
    job = meshrun.submit(spec, backends=["local"])  # placement chooses: a plan is written too
    assert job.result(timeout=120) == 0, job.logs()
    seen = _get(s3, "results/run1/seen.txt").decode()
    assert seen.startswith("alpha\nbeta\n{\"lr\": 0.1}") and hashlib.sha256(big).hexdigest() in seen
    log = job.logs()
    assert "inputs ready: 4 object(s)" in log and "(0 B from the cache)" in log and "outputs uploaded" in log
    assert os.stat(work / "data" / "big.bin").st_mode & 0o222 == 0  # read-only: shared with the cache
    # the second job on this node reads the same objects from the cache
    job2 = meshrun.submit(spec.replace(outputs=()), backend="local")
    assert job2.result(timeout=120) == 0
    assert "(9.0 MiB from the cache)" in job2.logs()
    cache = Path(os.environ["MESHRUN_DATA_CACHE"])
    assert oct(cache.stat().st_mode & 0o777) == "0o700" and len(list((cache / "objects").iterdir())) == 4
    # neither the endpoint nor the key pair is in any file meshrun wrote, nor in what it shows
    shown = "".join(run_cli(*a).stdout for a in (("status", job.id), ("status", "--json", job.id),
                                                  ("ls", "--json"), ("logs", job.id)))
    needles = [s3.secret, s3.access_key, s3.endpoint, f":{s3.server['port']}"]
    assert files_holding([meshrun_home, work, cache], needles) == []
    assert not [n for n in needles if n in shown]
    launch = json.loads((job.job_dir / "launch.json").read_text())
    assert launch["data"]["inputs"][0] == {"source": f"s3://{s3.bucket}/set/", "path": "data/"}


def test_outputs_follow_the_policy_on_failure_and_cancel(s3, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    outs = {"ckpt/": {"destination": f"s3://{s3.bucket}/ckpt/", "on": ["success", "failure", "cancel"]},
            "final/": f"s3://{s3.bucket}/final/"}
    failing = meshrun.JobSpec(command="mkdir -p ckpt final && echo 1 > ckpt/c1 && echo f > final/f && exit 3",
                              workdir=str(work), outputs=outs, name="fails")
    job = meshrun.submit(failing, backend="local")
    with pytest.raises(meshrun.JobFailed):
        job.result(timeout=120)
    assert s3.keys() == ["ckpt/c1"]  # the failure policy: ckpt/ yes, final/ (success only) no
    assert "no output is uploaded" not in job.logs()
    started = work / "started"
    cancelled = meshrun.JobSpec(
        command=f"mkdir -p ckpt final && echo 2 > ckpt/c2 && echo g > final/g && touch {started} && sleep 600",
        workdir=str(work), outputs=outs, name="cancelled")
    job = meshrun.submit(cancelled, backend="local")
    wait_until(started.exists, 60, what="the job to start")
    job.cancel()
    with pytest.raises(meshrun.JobCancelled):
        job.result(timeout=60)
    assert s3.keys() == ["ckpt/c1", "ckpt/c2"] and _get(s3, "ckpt/c2") == b"2\n"


def test_a_job_cancelled_while_downloading_ends_cancelled(s3, tmp_path, monkeypatch):
    """Cancel reaches the stager too: the job ends cancelled, never started."""
    monkeypatch.setenv("MESHRUN_DATA_PYTHON", str(_slow_python(tmp_path)))
    _put(s3, "x/a", b"a")
    ran = tmp_path / "ran"
    job = meshrun.submit(meshrun.JobSpec(command=f"touch {ran}", workdir=str(tmp_path),
                                         inputs={f"s3://{s3.bucket}/x/": "x/"}), backend="local")
    wait_until(lambda: "downloading" in json.dumps(json.loads((job.job_dir / "state.json").read_text())
                                                   if (job.job_dir / "state.json").exists() else {}),
               60, what="the inputs download to begin")
    job.cancel()
    with pytest.raises(meshrun.JobCancelled):
        job.result(timeout=60)
    assert not ran.exists()


def _slow_python(tmp_path: Path) -> Path:
    """A Python that waits before running the stager (to cancel a job in the middle of its download)."""
    p = tmp_path / "slow-python"
    p.write_text(f"#!/bin/sh\nsleep 600 &\nwait $!\nexec {sys.executable} \"$@\"\n")
    p.chmod(0o755)
    return p


@pytest.mark.parametrize("stored_checksum", [False, True], ids=["etag-only", "crc32-stored"])
def test_a_corrupted_object_fails_the_job_and_nothing_is_kept(s3, tmp_path, stored_checksum):
    payload = b"meshrun-corrupt-" + os.urandom(24).hex().encode() + b"-end"
    if stored_checksum:  # botocore's default: a CRC32 the server keeps, checked on a whole-object read
        _put(s3, "c/obj.bin", payload)
    else:  # an object written by a client that sends no checksum: only its ETag (MD5) can tell
        from botocore.config import Config
        import boto3

        plain = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                             aws_secret_access_key=s3.secret, region_name="us-east-1",
                             config=Config(request_checksum_calculation="when_required"))
        plain.put_object(Bucket=s3.bucket, Key="c/obj.bin", Body=payload)
    s3.corrupt(payload)
    ran = tmp_path / "ran"
    job = meshrun.submit(meshrun.JobSpec(command=f"touch {ran}", workdir=str(tmp_path),
                                         inputs={f"s3://{s3.bucket}/c/obj.bin": "obj.bin"}), backend="local")
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=120)
    assert "checksum mismatch" in str(e.value) and f"s3://{s3.bucket}/c/obj.bin" in str(e.value)
    assert not ran.exists() and not (tmp_path / "obj.bin").exists()
    cache = Path(os.environ["MESHRUN_DATA_CACHE"])
    assert list((cache / "objects").iterdir()) == []


def test_a_cut_download_resumes_with_the_parts_it_has(s3, tmp_path):
    import io
    from concurrent.futures import ThreadPoolExecutor

    from boto3.s3.transfer import TransferConfig

    from meshrun import _stage

    body = os.urandom(20 << 20)
    s3.client.upload_fileobj(io.BytesIO(body), s3.bucket, "r/big", Config=TransferConfig(
        multipart_threshold=5 << 20, multipart_chunksize=5 << 20))
    client = _stage.make_client(workers=4)
    cache = _stage.Cache(str(tmp_path / "cache"), endpoint=_stage.endpoint_of(client))
    items = _stage.list_input(client, f"s3://{s3.bucket}/r/", str(tmp_path / "dst") + "/")
    obj = items[0][0]
    assert obj["etag"].endswith("-4")
    # the first download is cut after two of its four parts
    ranges = []

    def cut(params, **kw):
        if "Range" in params:
            ranges.append(params["Range"])
            if len(ranges) > 2:
                raise ConnectionError("cut")

    client.meta.events.register("before-parameter-build.s3.GetObject", cut)
    one = ThreadPoolExecutor(1)  # the parts one after the other: the cut falls after the second
    with pytest.raises(Exception):
        _stage.fetch_object(client, cache, dict(obj), _stage.Progress("t", 0, 1), one)
    client.meta.events.unregister("before-parameter-build.s3.GetObject", cut)
    ranges.clear()
    client.meta.events.register("before-parameter-build.s3.GetObject",
                                lambda params, **kw: ranges.append(params.get("Range")))
    again = dict(obj)
    path = _stage.fetch_object(client, cache, again, _stage.Progress("t", 0, 1), one)
    assert Path(path).read_bytes() == body and again["verified"] == "crc32-composite"  # the server's CRC-32s
    assert ranges == ["bytes=%d-%d" % (10 << 20, (15 << 20) - 1), "bytes=%d-%d" % (15 << 20, (20 << 20) - 1)]
    assert [p.name for p in Path(cache.partial).iterdir() if not p.name.endswith(".lock")] == []
    # a multi-part object without a stored checksum: checked against its ETag (the MD5 of its parts' MD5s)
    import boto3
    from botocore.config import Config

    plain = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                         aws_secret_access_key=s3.secret, region_name="us-east-1",
                         config=Config(request_checksum_calculation="when_required"))
    plain.upload_fileobj(io.BytesIO(body[:12 << 20]), s3.bucket, "m/obj", Config=TransferConfig(
        multipart_threshold=5 << 20, multipart_chunksize=5 << 20))
    obj2 = _stage.list_input(client, f"s3://{s3.bucket}/m/obj", str(tmp_path / "obj"))[0][0]
    path = _stage.fetch_object(client, cache, obj2, _stage.Progress("t", 0, 1), ThreadPoolExecutor(4))
    assert Path(path).read_bytes() == body[:12 << 20] and obj2["verified"] == "md5-multipart"


def test_the_cache_refuses_a_folder_of_another_user_or_a_link(tmp_path):
    from meshrun import _stage

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(_stage.StageError, match="not a plain folder"):
        _stage.own_dir(str(link))
    if os.geteuid() == 0:
        other = tmp_path / "other"
        other.mkdir()
        os.chown(other, 65534, 65534)
        with pytest.raises(_stage.StageError, match="belongs to uid 65534"):
            _stage.own_dir(str(other))
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    _stage.own_dir(str(loose))
    assert loose.stat().st_mode & 0o777 == 0o700


def test_a_node_without_boto3_fails_the_job_with_what_to_do(s3, tmp_path, monkeypatch):
    bare = tmp_path / "bare-python"  # the same Python without its site-packages: no boto3
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")
    bare.chmod(0o755)
    monkeypatch.setenv("MESHRUN_DATA_PYTHON", str(bare))
    job = meshrun.submit(meshrun.JobSpec(command="echo never", workdir=str(tmp_path),
                                         inputs={f"s3://{s3.bucket}/x/": "x/"}), backend="local")
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    assert "boto3 is not installed" in str(e.value) and "MESHRUN_DATA_PYTHON" in str(e.value)


def _read_input(name):
    with open(name) as f:
        return f.read()


def test_a_function_job_reads_its_inputs(s3, tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _put(s3, "fn/in.txt", b"for the function")
    spec = meshrun.JobSpec(function=_read_input, args=("in.txt",), workdir=str(tmp_path),
                           inputs={f"s3://{s3.bucket}/fn/in.txt": "in.txt"})
    assert meshrun.submit(spec, backend="local").result(timeout=60) == "for the function"


def test_periodic_uploads_send_what_changed_and_the_end_skips_what_went_up(s3, tmp_path):
    """The stager's ``sync`` step as the agent runs it beside a job (here with a short interval written into
    launch.json directly; the spec allows 10 s at the least), then the ``out`` step at the end."""
    import signal
    import subprocess

    job_dir, work = tmp_path / "job", tmp_path / "work"
    (work / "ck").mkdir(parents=True)
    job_dir.mkdir()
    (job_dir / "stage.py").write_bytes(Path(meshrun.__file__).with_name("_stage.py").read_bytes())
    (job_dir / "launch.json").write_text(json.dumps({"cwd": str(work), "data": {"inputs": [], "outputs": [
        {"path": "ck/", "destination": f"s3://{s3.bucket}/ck/", "on": ["success"], "every": 0.3}]}}))
    (work / "ck" / "step1").write_text("1")
    sync = subprocess.Popen([sys.executable, str(job_dir / "stage.py"), "sync", str(job_dir)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: s3.keys("ck/") == ["ck/step1"], 60, interval=0.1, what="the first periodic upload")
        (work / "ck" / "step2").write_text("2")
        wait_until(lambda: s3.keys("ck/") == ["ck/step1", "ck/step2"], 30, interval=0.1, what="the second one")
    finally:
        sync.send_signal(signal.SIGTERM)
        err = sync.communicate(timeout=30)[1]
    assert "periodic upload: 1 object(s)" in err
    record = json.loads((job_dir / ".outputs.json").read_text())
    assert sorted(record) == [f"s3://{s3.bucket}/ck/step1", f"s3://{s3.bucket}/ck/step2"]
    assert oct((job_dir / ".outputs.json").stat().st_mode & 0o777) == "0o600"
    (work / "ck" / "step3").write_text("3")
    out = subprocess.run([sys.executable, str(job_dir / "stage.py"), "out", str(job_dir), "--state", "succeeded"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "1 object(s)" in out.stderr, out.stderr  # only step3 was new
    assert s3.keys("ck/") == ["ck/step1", "ck/step2", "ck/step3"]


# ---- the command line: meshrun run --input/--output ----------------------------------------------


def test_input_and_output_flags_give_the_spec_fields():
    from meshrun._data import parse_flags

    inputs, outputs = parse_flags(
        ["s3://lab-data/year=2024/=data/", "s3://lab-data/one/config.json=conf.json"],
        ["ckpt/=s3://lab-ckpt/run-17/;on=success,failure,cancel;every=15m", "log.txt=s3://lab-ckpt/logs/"])
    spec = meshrun.JobSpec(command=["true"],
                           inputs={"s3://lab-data/year=2024/": "data/", "s3://lab-data/one/config.json": "conf.json"},
                           outputs={"ckpt/": {"destination": "s3://lab-ckpt/run-17/", "on": ["success", "failure",
                                                                                              "cancel"],
                                              "every": "15m"}, "log.txt": "s3://lab-ckpt/logs/"})
    assert (inputs, outputs) == (spec.inputs, spec.outputs)
    assert parse_flags([], ["a=b=s3://lab-ckpt/x/"])[1][0].path == "a=b"  # an output splits before its s3://


@pytest.mark.parametrize("inputs, outputs, field, message", [
    (["nothing"], [], "--input 'nothing'", "expected URL=PATH, e.g. --input s3://lab-data/imagenet/=data/"),
    (["=data/"], [], "--input '=data/'", "expected URL=PATH, e.g. --input s3://lab-data/imagenet/=data/"),
    (["s3://Lab/x=d"], [], "--input 's3://Lab/x=d'",
     "the URL: 'Lab' is not a valid bucket name (3 to 63 of a-z, 0-9, '.', '-'), in 's3://Lab/x'"),
    (["s3://lab-data/a=../up"], [], "--input 's3://lab-data/a=../up'",
     "the path: must not go up with '..', got '../up'"),
    (["s3://lab-data/a=d", "s3://lab-data/b=d/"], [], "--input 's3://lab-data/b=d/'",
     "the path: 'd/' is the path of s3://lab-data/a too"),
    ([], ["ckpt/"], "--output 'ckpt/'", "expected PATH=URL[;on=WHEN,...][;every=DURATION], e.g. "
                                        "--output 'ckpt/=s3://lab-ckpt/run-17/;on=success,failure;every=15m'"),
    ([], ["ckpt/=gs://x/"], "--output 'ckpt/=gs://x/'",
     "the URL: expected an object-store URL s3://bucket/key or s3://bucket/prefix/, got 'gs://x/' (R2, GCS, MinIO, "
     "SeaweedFS ... through their S3 API: the endpoint comes from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)"),
    ([], ["o/=s3://lab-ckpt/r/;on=sometimes"], "--output 'o/=s3://lab-ckpt/r/;on=sometimes'",
     "on=: expected a non-empty list of success, failure, cancel, got ['sometimes']"),
    ([], ["o/=s3://lab-ckpt/r/;every=1s"], "--output 'o/=s3://lab-ckpt/r/;every=1s'",
     "every=: must be at least 10 seconds, got 1"),
    ([], ["o/=s3://lab-ckpt/r/;when=now"], "--output 'o/=s3://lab-ckpt/r/;when=now'",
     "unknown option 'when=now'; after the URL an output takes ;on=WHEN[,WHEN] (success, failure, cancel) and "
     ";every=DURATION"),
    ([], ["o/=s3://lab-ckpt/r/;on=success;on=cancel"], "--output 'o/=s3://lab-ckpt/r/;on=success;on=cancel'",
     "given twice: 'on=cancel'; after the URL an output takes ;on=WHEN[,WHEN] (success, failure, cancel) and "
     ";every=DURATION"),
])
def test_bad_input_and_output_flags_name_the_flag_and_the_entry(inputs, outputs, field, message):
    from meshrun._data import DataError, parse_flags

    with pytest.raises(DataError) as e:
        parse_flags(inputs, outputs)
    assert (e.value.field, e.value.message) == (field, message)


def test_a_bad_flag_exits_2_with_the_message_before_anything_is_submitted():
    p = run_cli("run", "--input", "s3://lab-data/a=../up", "--", "true", check=False)
    assert p.returncode == 2 and p.stderr == ("meshrun: error: --input 's3://lab-data/a=../up': the path: must not go "
                                              "up with '..', got '../up'\n")
    assert run_cli("ls", "--json").stdout.strip() == "[]"
    p = run_cli("offers", "--output", "ckpt/=s3://lab-ckpt/r/;every=soon", check=False)
    assert p.returncode == 2 and p.stderr.startswith("meshrun: error: --output 'ckpt/=s3://lab-ckpt/r/;every=soon': "
                                                     "every=: ")


def test_meshrun_run_with_input_and_output_flags_on_the_local_backend(s3, tmp_path):
    _put(s3, "cli/in/words.txt", b"hello from s3\n")
    work = tmp_path / "w"
    work.mkdir()
    p = run_cli("run", "-b", "local", "--workdir", str(work), "--input", f"s3://{s3.bucket}/cli/in/=data/",
                "--output", f"out/=s3://{s3.bucket}/cli/res/;on=success,failure",
                "--", "sh", "-c", "mkdir -p out && tr a-z A-Z < data/words.txt > out/shout.txt && echo done")
    assert "done" in p.stdout
    assert s3.keys("cli/res/") == ["cli/res/shout.txt"] and _get(s3, "cli/res/shout.txt") == b"HELLO FROM S3\n"
    # the policy given on the command line: a failure uploads too
    p = run_cli("run", "-b", "local", "--workdir", str(work),
                "--output", f"out/=s3://{s3.bucket}/cli/failed/;on=failure", "--", "sh", "-c",
                "echo partial > out/shout.txt; exit 4", check=False)
    assert p.returncode == 4 and _get(s3, "cli/failed/shout.txt") == b"partial\n"
    # a task file's job takes them too (flags after the file, as sky takes them)
    (work / "task.yaml").write_text(f"workdir: {work}\nrun: wc -c < data/words.txt > count.txt\n")
    run_cli("run", str(work / "task.yaml"), "-b", "local", "--input", f"s3://{s3.bucket}/cli/in/=data/",
            "--output", f"count.txt=s3://{s3.bucket}/cli/count.txt")
    assert _get(s3, "cli/count.txt").strip() == b"14"


# ---- the cache's eviction --------------------------------------------------------------------------


def _cache_with(tmp_path: Path, objects: dict[str, tuple[int, float]]):
    """A cache holding real files: {name: (size, last use)}; returns (cache, {name: id})."""
    from meshrun import _stage

    cache = _stage.Cache(str(tmp_path / "cache"))
    ids = {}
    for name, (size, used) in objects.items():
        ident = ids[name] = hashlib.sha256(name.encode()).hexdigest()
        p = Path(cache.path(ident))
        p.write_bytes(b"x" * size)
        p.chmod(0o444)
        lock = Path(cache.partial) / (ident + ".lock")
        lock.touch()
        os.utime(lock, (used, used))
    return cache, ids


NO_FLOOR = {"MESHRUN_DATA_CACHE_FREE": "0"}  # the file system's own free space plays no part here


def test_eviction_removes_the_least_recently_used_objects_no_job_holds(tmp_path):
    from meshrun import _stage

    cache, ids = _cache_with(tmp_path, {"linked": (1000, 100), "a": (1000, 200), "held": (1000, 300),
                                        "c": (1000, 400), "kept": (1000, 500), "new": (1000, 600)})
    (tmp_path / "job").mkdir()
    os.link(cache.path(ids["linked"]), tmp_path / "job" / "input.bin")  # a job's input links it
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"y" * 5000)
    os.symlink(outside, cache.path(hashlib.sha256(b"link").hexdigest()))  # a link: neither counted nor followed
    held = cache.lock(ids["held"])  # another stager places or downloads it now
    try:
        r = _stage.evict(cache, keep={ids["kept"]}, env={"MESHRUN_DATA_CACHE_MAX": "4000", **NO_FLOOR})
    finally:
        os.close(held)
    assert r == {"objects": 2, "bytes": 2000, "short": 0}  # 6000 held, 4000 allowed: a, then c (oldest first)
    left = {n for n, i in ids.items() if os.path.exists(cache.path(i))}
    assert left == {"linked", "held", "kept", "new"}
    assert not (Path(cache.partial) / (ids["a"] + ".lock")).exists()  # its lock file goes with it
    assert outside.read_bytes() == b"y" * 5000 and os.path.islink(cache.path(hashlib.sha256(b"link").hexdigest()))
    # room for a download of 2500 bytes under the same limit: "held" (now free) and "new" go; not enough yet
    r = _stage.evict(cache, need=2500, keep={ids["kept"]}, env={"MESHRUN_DATA_CACHE_MAX": "4000", **NO_FLOOR})
    assert r == {"objects": 2, "bytes": 2000, "short": 500}
    assert {n for n, i in ids.items() if os.path.exists(cache.path(i))} == {"linked", "kept"}
    assert (tmp_path / "job" / "input.bin").read_bytes() == b"x" * 1000
    # a stager places a cached object through its lock again, taking the new lock file
    fd = cache.lock(ids["a"], exclusive=False)
    os.close(fd)


def test_the_free_space_floor_evicts_and_a_stamped_use_keeps_an_object(tmp_path):
    from meshrun import _stage

    cache, ids = _cache_with(tmp_path, {"old": (100, 100), "recent": (100, 200)})
    # a floor the file system cannot meet: everything that may go goes
    r = _stage.evict(cache, env={"MESHRUN_DATA_CACHE_FREE": "100%"})
    assert r["objects"] == 2 and r["short"] > 0
    cache, ids = _cache_with(tmp_path, {"old": (100, 100), "recent": (100, 200)})
    lock = cache.lock(ids["old"], exclusive=False)  # what a stager does when it uses an object: stamps its lock
    os.utime(lock)
    os.close(lock)
    r = _stage.evict(cache, env={"MESHRUN_DATA_CACHE_MAX": "150", **NO_FLOOR})
    assert r["objects"] == 1 and os.path.exists(cache.path(ids["old"]))
    assert not os.path.exists(cache.path(ids["recent"]))


def test_eviction_removes_partial_downloads_left_for_a_day(tmp_path):
    import time

    from meshrun import _stage

    cache, ids = _cache_with(tmp_path, {"cached": (10, time.time() - 2 * _stage.PARTIAL_AGE)})
    old, fresh, busy, failed = (hashlib.sha256(n).hexdigest() for n in (b"old", b"fresh", b"busy", b"failed"))
    lock = Path(cache.partial) / (failed + ".lock")  # left by a download that failed its check: no object
    lock.touch()
    os.utime(lock, (time.time() - 2 * _stage.PARTIAL_AGE,) * 2)
    day_ago = time.time() - _stage.PARTIAL_AGE - 60
    for ident, when in ((old, day_ago), (fresh, None), (busy, day_ago)):
        for name in (ident, ident + ".json"):
            f = Path(cache.partial) / name
            f.write_bytes(b"p" * 10)
            if when:
                os.utime(f, (when, when))
    held = cache.lock(busy)  # its download goes on (resumed by a job now)
    try:
        assert _stage.evict(cache, env=NO_FLOOR)["bytes"] == 0  # within its limits: the stager reads nothing
        r = _stage.evict(cache, env=NO_FLOOR, scan=True)  # meshrun data cache --prune
    finally:
        os.close(held)
    names = sorted(p.name for p in Path(cache.partial).iterdir() if not p.name.endswith(".lock"))
    assert names == sorted([fresh, fresh + ".json", busy, busy + ".json"]) and r["bytes"] == 20
    assert not lock.exists() and (Path(cache.partial) / (ids["cached"] + ".lock")).exists()
    assert r["objects"] == 0 and os.path.exists(cache.path(ids["cached"]))


@pytest.mark.parametrize("value, got", [("200G", 200 * 10**9), ("1.5TiB", int(1.5 * 2**40)), ("50%", 500),
                                        ("1000000", 1000000), ("64 MiB", 64 << 20), ("none", None), ("0", 0)])
def test_cache_limits_are_sizes_or_shares_of_the_file_system(value, got):
    from meshrun import _stage

    assert _stage.parse_limit(value, 1000, "MESHRUN_DATA_CACHE_MAX") == got


@pytest.mark.parametrize("value", ["lots", "150%", "-1", "5 parsecs"])
def test_a_bad_cache_limit_names_the_variable(value):
    from meshrun import _stage

    with pytest.raises(_stage.StageError) as e:
        _stage.parse_limit(value, 1000, "MESHRUN_DATA_CACHE_MAX")
    assert str(e.value) == ("MESHRUN_DATA_CACHE_MAX: expected a size such as 200G, 1.5TiB or 1000000 (bytes), a share "
                            f"of the cache's file system such as 50%, or none; got {value!r}")


def test_meshrun_data_cache_shows_and_prunes_this_machines_cache(tmp_path, monkeypatch):
    cache, ids = _cache_with(tmp_path, {"a": (1000, 100), "b": (2000, 200), "linked": (4000, 300)})
    os.link(cache.path(ids["linked"]), tmp_path / "input.bin")
    monkeypatch.setenv("MESHRUN_DATA_CACHE", cache.root)
    r = json.loads(run_cli("data", "cache", "--json").stdout)
    assert (r["root"], r["objects"], r["bytes"], r["linked_objects"], r["linked_bytes"], r["oldest_use"]) == \
        (cache.root, 3, 7000, 1, 4000, 100)
    shown = run_cli("data", "cache").stdout
    assert f"{cache.root} (this machine's)" in shown and "3, 6.8KiB" in shown
    p = run_cli("data", "cache", "--prune", "6000")
    assert p.stdout.startswith("removed 1 object(s), 1000B\n")  # a, the least recently used
    p = run_cli("data", "cache", "--prune", "0")
    assert p.stdout.startswith("removed 1 object(s), 2.0KiB; 3.9KiB more is in use")
    assert [p.name for p in Path(cache.objects).iterdir()] == [ids["linked"]]
    p = run_cli("data", "cache", "--prune", "lots", check=False)
    assert p.returncode == 2 and "--prune: expected a size such as 200G" in p.stderr
    monkeypatch.setenv("MESHRUN_DATA_CACHE", str(tmp_path / "none-yet"))
    assert run_cli("data", "cache").stdout == f"no data cache at {tmp_path / 'none-yet'} on this machine yet\n"


def test_a_job_evicts_the_least_recently_used_object_and_the_next_job_downloads_it_again(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHRUN_DATA_CACHE_FREE", "0")
    for key, size in (("a", 3000), ("b", 5000), ("c", 4000)):
        _put(s3, f"ev/{key}.bin", key.encode() * size)

    def stage(work: str, *keys: str, **env: str):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        (tmp_path / work).mkdir()
        job = meshrun.submit(meshrun.JobSpec(command="cat *.bin | wc -c", workdir=str(tmp_path / work),
                                             inputs={f"s3://{s3.bucket}/ev/{k}.bin": f"{k}.bin" for k in keys}),
                             backend="local")
        assert job.result(timeout=120) == 0, job.logs()
        for k in env:
            monkeypatch.delenv(k)
        return job.logs()

    stage("w0", "a")
    stage("w1", "c")  # used after a
    for k, w in (("a", "w0"), ("c", "w1")):
        (tmp_path / w / f"{k}.bin").unlink()  # the jobs' copies are gone: nobody uses the cache's now
    # 7000 bytes cached, 5000 to come, at most 9500 allowed: the least recently used (a) goes, c stays
    log = stage("w2", "b", MESHRUN_DATA_CACHE_MAX="9500")
    assert "data cache: removed 1 least recently used object(s)" in log and "2.9 KiB" in log
    log = stage("w3", "a", "c")
    assert "inputs ready: 2 object(s), 6.8 KiB (3.9 KiB from the cache)" in log  # c reused, a downloaded again
    assert (tmp_path / "w3" / "a.bin").read_bytes() == b"a" * 3000


def test_a_bad_cache_limit_on_the_node_fails_the_staging_with_what_is_allowed(s3, tmp_path, monkeypatch):
    _put(s3, "lim/a", b"a")
    monkeypatch.setenv("MESHRUN_DATA_CACHE_FREE", "plenty")
    job = meshrun.submit(meshrun.JobSpec(command="echo never", workdir=str(tmp_path),
                                         inputs={f"s3://{s3.bucket}/lim/a": "a"}), backend="local")
    with pytest.raises(meshrun.JobFailed) as e:
        job.result(timeout=60)
    assert "MESHRUN_DATA_CACHE_FREE: expected a size such as 200G" in str(e.value) and "'plenty'" in str(e.value)
    assert not (tmp_path / "a").exists()
