"""Object-store data of a job: ``inputs`` (an ``s3://`` object or prefix -> a path the job sees) and
``outputs`` (a path the job writes -> an ``s3://`` prefix, uploaded when the job ends and, if asked,
periodically). The spec's side only: what the job folder's ``launch.json`` carries (URLs and paths, never an
endpoint or a credential); the transfers happen on the node (``_stage.py``, docs/data.md)."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from ._units import parse_duration

#: when an output is uploaded, by the job's end: succeeded, failed (a time limit too), cancelled
WHEN = ("success", "failure", "cancel")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MIN_EVERY = 10.0


class DataError(ValueError):
    """A bad inputs/outputs entry: ``field`` (e.g. ``outputs[0].on``) and what is allowed."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(message)


class DataInput(BaseModel):
    """``source``: ``s3://bucket/key`` (one object) or ``s3://bucket/prefix/`` (every object under it);
    ``path``: where the job sees it (relative to the job's working directory)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: str
    path: str


class DataOutput(BaseModel):
    """``path``: a file or folder the job writes (relative to its working directory); ``destination``:
    ``s3://bucket/prefix/``; ``on``: the job's ends that upload it; ``every``: seconds between uploads
    while the job runs (checkpoints), or None."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    destination: str
    on: tuple[str, ...] = ("success",)
    every: float | None = None


def _url(v: Any, field: str, *, prefix_only: bool = False) -> str:
    if not isinstance(v, str) or not v.startswith("s3://"):
        raise DataError(field, f"expected an object-store URL s3://bucket/key or s3://bucket/prefix/, got {v!r} "
                               "(R2, GCS, MinIO, SeaweedFS ... through their S3 API: the endpoint comes from "
                               "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)")
    bucket, _, key = v[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket):
        raise DataError(field, f"{bucket!r} is not a valid bucket name (3 to 63 of a-z, 0-9, '.', '-'), in {v!r}")
    if "\x00" in key or any(ord(c) < 32 for c in key):
        raise DataError(field, f"the key must not contain control characters, got {v!r}")
    if prefix_only and key and not key.endswith("/"):
        v += "/"
    return v


def _path(v: Any, field: str) -> str:
    import os

    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str) or not v.strip():
        raise DataError(field, f"expected a path the job sees, got {v!r}")
    if "\x00" in v:
        raise DataError(field, "a path must not contain NUL characters")
    if ".." in v.replace("\\", "/").split("/"):
        raise DataError(field, f"must not go up with '..', got {v!r}")
    return v


def _entries(v: Any, field: str, key_name: str, value_name: str) -> list[tuple[str, Any]]:
    """{a: b} or [{key_name: a, value_name: b, ...}] -> [(field of the entry, mapping)]."""
    if v is None:
        return []
    if isinstance(v, Mapping):
        return [(f"{field}[{k!r}]", {key_name: k, **v2} if isinstance(v2, Mapping) else {key_name: k, value_name: v2})
                for k, v2 in v.items()]
    if isinstance(v, (list, tuple)):
        out = []
        for i, e in enumerate(v):
            if isinstance(e, BaseModel):
                e = e.model_dump()
            if not isinstance(e, Mapping):
                raise DataError(f"{field}[{i}]", f"expected a mapping with {key_name!r} and {value_name!r}, "
                                                  f"got {type(e).__name__}")
            out.append((f"{field}[{i}]", e))
        return out
    raise DataError(field, f"expected {{{key_name}: {value_name}}} or a list of such mappings, got {type(v).__name__}")


def _check_keys(e: Mapping[str, Any], where: str, allowed: tuple[str, ...]) -> None:
    for k in e:
        if k not in allowed:
            raise DataError(f"{where}.{k}", f"unknown key; an entry has: {', '.join(allowed)}")
    for k in allowed[:2]:
        if k not in e:
            raise DataError(f"{where}.{k}", "is missing")


def parse_inputs(v: Any) -> tuple[DataInput, ...]:
    """``{"s3://bucket/prefix/": "data/"}`` or ``[{"source": ..., "path": ...}]``."""
    out: list[DataInput] = []
    seen: dict[str, str] = {}
    for where, e in _entries(v, "inputs", "source", "path"):
        _check_keys(e, where, ("source", "path"))
        src = _url(e["source"], f"{where}.source")
        path = _path(e["path"], f"{where}.path")
        norm = path.rstrip("/")
        if norm in seen:
            raise DataError(f"{where}.path", f"{path!r} is the path of {seen[norm]} too")
        seen[norm] = src
        out.append(DataInput(source=src, path=path))
    return tuple(out)


def parse_outputs(v: Any) -> tuple[DataOutput, ...]:
    """``{"ckpt/": "s3://bucket/run1/"}``, ``{"ckpt/": {"destination": ..., "on": [...], "every": "10m"}}`` or
    ``[{"path": ..., "destination": ..., "on": [...], "every": ...}]``."""
    out: list[DataOutput] = []
    for where, e in _entries(v, "outputs", "path", "destination"):
        _check_keys(e, where, ("path", "destination", "on", "every"))
        path = _path(e["path"], f"{where}.path")
        dest = _url(e["destination"], f"{where}.destination", prefix_only=_is_dir(path))
        on = e.get("on", ("success",))
        if isinstance(on, str):
            on = [w.strip() for w in on.split(",")]
        if not isinstance(on, (list, tuple)) or not on or any(w not in WHEN for w in on):
            raise DataError(f"{where}.on", f"expected a non-empty list of {', '.join(WHEN)}, got {on!r}")
        every = e.get("every")
        if every is not None:
            try:
                every = parse_duration(every)
            except ValueError as err:
                raise DataError(f"{where}.every", str(err)) from None
            if every < MIN_EVERY:
                raise DataError(f"{where}.every", f"must be at least {MIN_EVERY:g} seconds, got {every:g}")
        out.append(DataOutput(path=path, destination=dest, on=tuple(dict.fromkeys(on)), every=every))
    return tuple(out)


#: what each part of an entry is called in a command-line flag's error
_FLAG_PART = {"source": "the URL", "path": "the path", "destination": "the URL", "on": "on=", "every": "every="}
_OUTPUT_OPTIONS = ("on", "every")


def parse_flags(inputs: Sequence[str] = (), outputs: Sequence[str] = ()) -> tuple[tuple[DataInput, ...],
                                                                                    tuple[DataOutput, ...]]:
    """``meshrun run``'s ``--input URL=PATH`` and ``--output PATH=URL[;on=WHEN,...][;every=DURATION]`` (each
    repeatable), validated exactly as the spec's fields are. A DataError's field names the flag and the entry as
    given (``--input 's3://Lab/x=data/'``), its message the part that is wrong. An input's URL and path are
    split at the last ``=`` (keys may hold one: ``s3://b/year=2024/=data/``), an output's at the ``=`` before
    its ``s3://``; an output's options follow its URL, each after a ``;``."""
    ins: list[dict[str, Any]] = []
    for item in inputs:
        url, sep, path = item.rpartition("=")
        if not sep or not url:
            raise DataError(f"--input {item!r}", "expected URL=PATH, e.g. --input s3://lab-data/imagenet/=data/")
        ins.append({"source": url, "path": path})
    outs: list[dict[str, Any]] = []
    for item in outputs:
        at = item.find("=s3://")
        at = item.find("=") if at < 0 else at
        if at <= 0:
            raise DataError(f"--output {item!r}", "expected PATH=URL[;on=WHEN,...][;every=DURATION], e.g. "
                                                  "--output 'ckpt/=s3://lab-ckpt/run-17/;on=success,failure;every=15m'")
        url, *options = item[at + 1:].split(";")
        entry: dict[str, Any] = {"path": item[:at], "destination": url}
        for opt in options:
            k, sep, v = opt.partition("=")
            k = k.strip()
            if not sep or k not in _OUTPUT_OPTIONS or k in entry:
                why = "given twice:" if sep and k in _OUTPUT_OPTIONS else "unknown option"
                raise DataError(f"--output {item!r}", f"{why} {opt!r}; after the URL an output takes "
                                                      ";on=WHEN[,WHEN] (success, failure, cancel) and ;every=DURATION")
            entry[k] = v.strip()
        outs.append(entry)
    try:
        return parse_inputs(ins), parse_outputs(outs)
    except DataError as e:
        m = re.match(r"^(inputs|outputs)\[(\d+)\]\.(\w+)$", e.field)
        if not m:
            raise
        flag, i, part = m.group(1)[:-1], int(m.group(2)), m.group(3)
        item = (inputs if flag == "input" else outputs)[i]
        raise DataError(f"--{flag} {item!r}", f"{_FLAG_PART.get(part, part)}: {e.message}") from None


def _is_dir(path: str) -> bool:
    return path.endswith("/")


def launch_data(inputs: tuple[DataInput, ...], outputs: tuple[DataOutput, ...]) -> dict[str, Any] | None:
    """``launch.json``'s ``data``: plain JSON for the stager, or None when the job moves no data."""
    if not inputs and not outputs:
        return None
    return {"inputs": [i.model_dump() for i in inputs],
            "outputs": [{**o.model_dump(), "on": list(o.on)} for o in outputs]}


def stage_source() -> bytes:
    """The stager (``_stage.py``) the job folder carries as ``stage.py``."""
    from pathlib import Path

    return (Path(__file__).with_name("_stage.py")).read_bytes()
