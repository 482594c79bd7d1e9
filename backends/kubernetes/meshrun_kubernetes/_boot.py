"""The container entry point of a meshrun function job on Kubernetes.

Standard library only (Python 3.8 or newer): this file travels to the cluster in the job's Secret and
runs with the image's ``python3``:

    python3 /meshrun/in/boot.py /meshrun/in /meshrun/job

1. copies the job's inputs (``_agent.py``, ``launch.json``, ``payload.pkl``, ``boot.json``) from the
   read-only Secret volume into a writable job folder (an ``emptyDir``);
2. runs meshrun's host agent on that folder (``python3 _agent.py run JOB``), which loads the payload,
   calls the function and writes ``exit.json``, ``result.pkl`` or ``error.json``/``error.pkl``;
3. streams the job's output (the agent writes it to ``output.log``) to its own stdout, so it is the
   pod's log and ``kubectl logs`` / meshrun's ``logs(follow=True)`` show it live;
4. at the end prints the agent's records as one base64 block between two marker lines that carry the
   job's nonce (a random token only the submitter and the Secret know, so output of the job cannot forge
   a result by accident) and a SHA-256 of the block's content (so a truncated log is detected);
5. exits 0 on success, 3 on failures a retry cannot fix (payload or version mismatch, result too large:
   the Job's podFailurePolicy fails the Job at once on exit code 3), else 1.

SIGTERM (pod deletion, activeDeadlineSeconds) is forwarded to the agent, which stops the job's whole
process tree and records the outcome before the block is printed.
"""

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

MARK = "==== meshrun-result"
INPUTS = ("_agent.py", "launch.json", "payload.pkl", "boot.json")
RECORDS = ("exit.json", "result.pkl", "error.json", "error.pkl")
NO_RETRY = ("VersionMismatch", "PayloadError", "ResultTooLarge")
EXIT_NO_RETRY = 3


def rank_name(name, rank):
    if not rank:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot:
        return "%s.rank%d" % (name, rank)
    return "%s.rank%d.%s" % (stem, rank, ext)


def read_json(path, default=None):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):
        return default


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def pump(path, pos, out):
    """Copy what was appended to ``path`` since ``pos`` to ``out``; returns the new position."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            while True:
                chunk = f.read(65536)
                if not chunk:
                    break
                pos += len(chunk)
                out.write(chunk)
    except FileNotFoundError:
        pass
    out.flush()
    return pos


def collect(job, rank, limit):
    """The agent's records for this node, base64-encoded, with oversized results replaced by an error."""
    files = {}
    for name in RECORDS:
        path = os.path.join(job, rank_name(name, rank))
        try:
            with open(path, "rb") as f:
                files[name] = f.read()
        except OSError:
            pass
    result = files.get("result.pkl")
    if result is not None and len(result) > limit:
        msg = ("the function's return value takes %d bytes pickled, more than the %d bytes a result may take "
               "through the pod log; write large results to storage and return their location instead"
               % (len(result), limit))
        del files["result.pkl"]
        files["error.json"] = json.dumps({"type": "ResultTooLarge", "message": msg, "traceback": ""}).encode()
        ex = json.loads(files.get("exit.json", b"{}").decode() or "{}")
        ex.update({"state": "failed", "exit_code": 1, "reason": "ResultTooLarge: " + msg})
        files["exit.json"] = json.dumps(ex, sort_keys=True).encode()
        sys.stderr.write("[meshrun] %s\n" % msg)
    if len(files.get("error.pkl", b"")) > limit:
        del files["error.pkl"]  # the error.json text still says what went wrong
    return dict((k, base64.b64encode(v).decode("ascii")) for k, v in files.items())


def emit(out, nonce, job_id, rank, files):
    body = json.dumps({"version": 1, "job_id": job_id, "rank": rank, "files": files}, sort_keys=True).encode()
    digest = hashlib.sha256(body).hexdigest()
    text = base64.b64encode(body).decode("ascii")
    out.write(("\n%s begin %s\n" % (MARK, nonce)).encode())
    for i in range(0, len(text), 76):
        out.write((text[i : i + 76] + "\n").encode())
    out.write(("%s end %s sha256=%s\n" % (MARK, nonce, digest)).encode())
    out.flush()


def main(argv):
    src = argv[1] if len(argv) > 1 else "/meshrun/in"
    job = argv[2] if len(argv) > 2 else "/meshrun/job"
    out = getattr(sys.stdout, "buffer", sys.stdout)
    if not os.path.isdir(job):
        os.makedirs(job)
    for name in INPUTS:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(job, name))
    boot = read_json(os.path.join(job, "boot.json"), {})
    launch = read_json(os.path.join(job, "launch.json"), {})
    if not launch.get("cwd"):
        launch["cwd"] = os.getcwd()  # the image's working directory
        write_json(os.path.join(job, "launch.json"), launch)
    rank = 0
    if int(launch.get("nodes") or 1) > 1:
        try:
            rank = int(os.environ.get("NODE_RANK") or 0)
        except ValueError:
            rank = 0
    log = os.path.join(job, rank_name("output.log", rank))
    agent = subprocess.Popen([sys.executable, os.path.join(job, "_agent.py"), "run", job],
                             stdin=subprocess.DEVNULL)

    def forward(signum, frame):
        try:
            agent.send_signal(signum)
        except OSError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    pos = 0
    while agent.poll() is None:
        pos = pump(log, pos, out)
        time.sleep(0.1)
    pos = pump(log, pos, out)
    files = collect(job, rank, int(boot.get("result_max_bytes") or 4 * 1024 * 1024))
    emit(out, boot.get("nonce", ""), launch.get("job_id"), rank, files)
    ex = read_json(os.path.join(job, rank_name("exit.json", rank)), {}) or {}
    err = json.loads(base64.b64decode(files["error.json"]).decode()) if "error.json" in files else {}
    if err.get("type") in NO_RETRY:
        return EXIT_NO_RETRY
    return 0 if ex.get("state") == "succeeded" and "error.json" not in files else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
