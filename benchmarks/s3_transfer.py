"""Object-store transfers: meshrun's stager (meshrun/_stage.py) beside boto3's own transfer manager, in one run.

Against a real S3 server (SeaweedFS, started here by meshrun.testing.seaweedfs) on this machine:

  * a prefix of many files (``--files`` files making up ``--size`` in all) and one large file of ``--size``;
  * upload: ``_stage.upload`` (s3transfer's TransferManager, 64 MiB parts, ``--workers`` threads, CRC32 request
    checksums) vs the plain boto3 way: one ``TransferManager`` (boto3's default TransferConfig: 8 MiB parts, 10
    threads) given every file, as ``aws s3 cp --recursive`` does;
  * download: ``_stage.list_input`` + ``_stage.download`` into an empty cache (listing, ranged parallel GETs on the
    object's part boundaries, MD5/ETag verified, resumable journal, the cache, a hard link to the job's path) vs
    the plain boto3 way: list the prefix, then one ``TransferManager.download`` per object (no verification
    beyond botocore's own);
  * the cache hit: the same download again with the cache warm (a second job on the node).

Rounds are interleaved (meshrun first in odd rounds, boto3 first in even ones); the ratio is meshrun's throughput
over boto3's (target >= 0.9 for every transfer). Medians are reported, every sample is kept.

    PYTHONPATH=. .venv/bin/python benchmarks/s3_transfer.py [--size 2GiB] [--files 512] [--rounds 2]
        [--workers 16] [--dir /var/tmp/meshrun-s3-bench] [--out benchmarks/results/s3_transfer.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meshrun import _stage  # noqa: E402
from meshrun._units import format_size, parse_size  # noqa: E402
from meshrun.testing import seaweedfs  # noqa: E402


def make_files(root: Path, total: int, files: int) -> None:
    (root / "many").mkdir(parents=True, exist_ok=True)
    each = total // files
    block = os.urandom(1 << 20)
    for i in range(files):  # distinct contents, cheap to make: a counter stamped into random blocks
        with open(root / "many" / f"part-{i:05d}.bin", "wb") as f:
            left = each
            while left:
                n = min(left, len(block))
                f.write(i.to_bytes(8, "little") + block[8:n] if n > 8 else block[:n])
                left -= n
    with open(root / "big.bin", "wb") as f:
        for j in range(total >> 20):
            f.write(j.to_bytes(8, "little") + block[8:])


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--files", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--dir", default="/var/tmp/meshrun-s3-bench")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "s3_transfer.json"))
    a = ap.parse_args()
    total = parse_size(a.size)
    import boto3
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    work = Path(a.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "src"
    t0 = time.perf_counter()
    make_files(src, total, a.files)
    sys.stderr.write(f"made {format_size(total)} x 2 of test data in {time.perf_counter() - t0:.1f}s\n")
    samples: dict[str, dict[str, list[float]]] = {}

    def add(what: str, who: str, seconds: float) -> None:
        samples.setdefault(what, {}).setdefault(who, []).append(seconds)
        sys.stderr.write(f"  {what:14s} {who:8s} {seconds:7.2f}s  {total / seconds / (1 << 20):8.1f} MiB/s\n")

    with seaweedfs(work / "server") as srv:
        for k, v in {"AWS_ACCESS_KEY_ID": srv["access_key"], "AWS_SECRET_ACCESS_KEY": srv["secret_key"],
                     "AWS_ENDPOINT_URL": srv["endpoint"], "AWS_REGION": "us-east-1"}.items():
            os.environ[k] = v
        os.environ["MESHRUN_DATA_PROGRESS_EVERY"] = "0"
        client = _stage.make_client(a.workers)
        plain = boto3.client("s3")
        bucket = "bench"
        client.create_bucket(Bucket=bucket)

        def ours_up(what: str, prefix: str) -> None:
            path = src / "many" if what == "many" else src / "big.bin"
            _stage.upload(client, _stage.upload_items(str(path), f"s3://{bucket}/{prefix}/"), workers=a.workers)

        def boto_up(what: str, prefix: str) -> None:
            path = src / "many" if what == "many" else src / "big.bin"
            with create_transfer_manager(plain, TransferConfig()) as tm:
                futs = [tm.upload(f, bucket, f"{prefix}/{os.path.relpath(f, path) if what == 'many' else 'big.bin'}")
                        for f in ([str(p) for p in sorted(path.iterdir())] if what == "many" else [str(path)])]
                for fu in futs:
                    fu.result()

        def ours_down(what: str, dest: Path, cache: Path) -> None:
            c = _stage.Cache(str(cache), endpoint=_stage.endpoint_of(client))
            items = _stage.list_input(client, f"s3://{bucket}/data/{what}/", str(dest) + "/")
            _stage.download(client, items, c, workers=a.workers)

        def boto_down(what: str, dest: Path) -> None:
            keys = [o["Key"] for pg in plain.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"data/{what}/") for o in pg.get("Contents", [])]
            dest.mkdir(parents=True, exist_ok=True)
            with create_transfer_manager(plain, TransferConfig()) as tm:
                futs = [tm.download(bucket, k, str(dest / os.path.basename(k))) for k in keys]
                for fu in futs:
                    fu.result()

        # the objects both download from (uploaded once, as meshrun uploads)
        ours_up("many", "data/many")
        ours_up("big", "data/big")
        for r in range(a.rounds):
            order = ["meshrun", "boto3"] if r % 2 == 0 else ["boto3", "meshrun"]
            for what in ("many", "big"):
                for who in order:
                    prefix = f"up/{who}-{r}-{what}"
                    add(f"upload {what}", who, timed(lambda: (ours_up if who == "meshrun" else boto_up)(what, prefix)))
                    objs = [o["Key"] for o in plain.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
                    for i in range(0, len(objs), 1000):
                        plain.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in objs[i:i + 1000]]})
                for who in order:
                    dest, cache = work / f"dst-{who}", work / f"cache-{r}"
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.rmtree(cache, ignore_errors=True)
                    if who == "meshrun":
                        add(f"download {what}", who, timed(lambda: ours_down(what, dest, cache)))
                        shutil.rmtree(dest)
                        add(f"cache hit {what}", who, timed(lambda: ours_down(what, dest, cache)))
                    else:
                        add(f"download {what}", who, timed(lambda: boto_down(what, dest)))
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.rmtree(cache, ignore_errors=True)

    shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {}
    for what, by in samples.items():
        med = {who: statistics.median(v) for who, v in by.items()}
        row: dict[str, Any] = {f"{who}_s": round(s, 3) for who, s in med.items()}
        row.update({f"{who}_MiB_s": round(total / s / (1 << 20), 1) for who, s in med.items()})
        if "boto3" in med:
            row["ratio"] = round(med["boto3"] / med["meshrun"], 3)  # meshrun's throughput over boto3's
        summary[what] = row
    result = {
        "benchmark": "s3_transfer",
        "command": "PYTHONPATH=. " + " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(
            str(REPO)) else sys.executable, "benchmarks/s3_transfer.py"] + sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "server": "SeaweedFS (weed server -s3) on this machine, 127.0.0.1",
        "size": format_size(total), "files": a.files, "file_size": format_size(total // a.files),
        "workers": a.workers, "rounds": a.rounds,
        "versions": {"boto3": boto3.__version__, "botocore": __import__("botocore").__version__,
                     "s3transfer": __import__("s3transfer").__version__},
        "target": "meshrun >= 0.9x boto3's TransferManager throughput for every transfer",
        "summary": summary, "samples_s": samples,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
