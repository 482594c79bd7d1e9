"""Kubernetes naming rules, and turning arbitrary text into names Kubernetes accepts.

The rules are those of the Kubernetes API machinery (``k8s.io/apimachinery/pkg/util/validation``):

* DNS-1123 label: at most 63 characters of ``[a-z0-9-]``, starting and ending with an alphanumeric
  (object names of Services, and of Jobs whose pods need stable host names);
* DNS-1123 subdomain: at most 253 characters, dot-separated labels (names of most other objects);
* label value: empty, or at most 63 characters of ``[A-Za-z0-9._-]`` starting and ending alphanumeric;
* label / annotation key: an optional DNS-1123 subdomain prefix and ``/``, then a name of at most 63
  characters of ``[A-Za-z0-9._-]`` starting and ending alphanumeric;
* annotations: keys as above, all values of one object together at most 256 KiB.

Sanitising is deterministic: the same text always gives the same name, and text that had to change gets
a short hash of the original appended, so two different originals never collapse onto one name.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any, Mapping

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")

ANNOTATIONS_MAX_BYTES = 256 * 1024


def _hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def _ascii_fold(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def dns1123_label(text: str, max_len: int = 63, *, fallback: str = "job") -> str:
    """A valid DNS-1123 label made from ``text``: lower case, runs of other characters become one ``-``,
    trimmed to ``max_len``; if anything had to change, ``-<hash of the original>`` is appended."""
    if max_len < 8:
        raise ValueError("max_len must leave room for the hash suffix")
    if isinstance(text, str) and len(text) <= max_len and DNS1123_LABEL.match(text):
        return text
    base = re.sub(r"[^a-z0-9]+", "-", _ascii_fold(str(text)).lower()).strip("-") or fallback
    suffix = "-" + _hash(str(text))
    base = base[: max_len - len(suffix)].rstrip("-") or fallback[: max_len - len(suffix)]
    return base + suffix


def label_value(text: str) -> str:
    """A valid label value made from ``text`` (kept as is when it already is one)."""
    if isinstance(text, str) and len(text) <= 63 and LABEL_VALUE.match(text):
        return text
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", _ascii_fold(str(text)))
    base = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", base)
    suffix = _hash(str(text))
    base = re.sub(r"[^A-Za-z0-9]+$", "", base[: 63 - len(suffix) - 1])
    return f"{base}-{suffix}" if base else suffix


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label or annotation key, or None."""
    if not isinstance(key, str) or not key:
        return "must be non-empty text"
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix or len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix):
            return f"the prefix {prefix!r} must be a DNS subdomain (lower case, e.g. example.com)"
    if not name or len(name) > 63 or not QUALIFIED_NAME.match(name):
        return (f"the name part {name!r} must be at most 63 characters of letters, digits, '-', '_' and '.', "
                "starting and ending with a letter or digit")
    return None


def label_value_problem(value: str) -> str | None:
    if not isinstance(value, str):
        return "must be text"
    if len(value) > 63 or not LABEL_VALUE.match(value):
        return ("must be at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a "
                "letter or digit")
    return None


def name_problem(value: Any, *, label: bool = True) -> str | None:
    """Why ``value`` is not a valid DNS-1123 label (``label=True``) or subdomain, or None."""
    if not isinstance(value, str) or not value:
        return "must be non-empty text"
    if label:
        if len(value) > 63 or not DNS1123_LABEL.match(value):
            return ("must be a DNS-1123 label: at most 63 characters of lower-case letters, digits and '-', "
                    "starting and ending with a letter or digit")
    elif len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
        return ("must be a DNS-1123 subdomain: at most 253 characters of lower-case letters, digits, '-' and "
                "'.', starting and ending with a letter or digit")
    return None


def metadata_problems(meta: Mapping[str, Any]) -> list[str]:
    """Every rule the API server would enforce on an object's name, labels and annotations."""
    out = []
    labels = meta.get("labels") or {}
    for k, v in labels.items():
        p = label_key_problem(k)
        if p:
            out.append(f"label key {k!r}: {p}")
        p = label_value_problem(v)
        if p:
            out.append(f"label {k}={v!r}: {p}")
    annotations = meta.get("annotations") or {}
    size = 0
    for k, v in annotations.items():
        p = label_key_problem(k)
        if p:
            out.append(f"annotation key {k!r}: {p}")
        if not isinstance(v, str):
            out.append(f"annotation {k}: the value must be text")
            continue
        size += len(k.encode()) + len(v.encode())
    if size > ANNOTATIONS_MAX_BYTES:
        out.append(f"annotations take {size} bytes, more than the {ANNOTATIONS_MAX_BYTES} the API server allows")
    return out


# ---- $(VAR) expansion ------------------------------------------------------------------------------
# Kubernetes expands $(VAR) references in a container's command, args and env values (and reduces $$ to
# $). meshrun passes text through unchanged by doubling every '$'; ``expand`` is a faithful port of the
# kubelet's algorithm (third_party/forked/golang/expansion) so tests can check the round trip.


def escape_expansion(text: str) -> str:
    """``text`` written so that Kubernetes' $(VAR) expansion gives back exactly ``text``."""
    return text.replace("$", "$$")


def expand(text: str, env: Mapping[str, str]) -> str:
    """What the kubelet makes of ``text`` given the variables ``env`` (its expansion rules, ported)."""
    out = []
    checkpoint = 0
    cursor = 0
    n = len(text)
    while cursor < n:
        if text[cursor] == "$" and cursor + 1 < n:
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":
                read, is_var, advance = "$", False, 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close >= 1:
                    read, is_var, advance = rest[1:close], True, close + 1
                else:
                    read, is_var, advance = "$(", False, 1
            else:
                read, is_var, advance = "$" + rest[0], False, 1
            if is_var:
                out.append(env[read] if read in env else "$(" + read + ")")
            else:
                out.append(read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


# ---- quantities -------------------------------------------------------------------------------------

_SUFFIX = {
    "": 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")


def parse_quantity(q: Any) -> float:
    """A Kubernetes resource quantity ("500m", "16Gi", "2", "1e3", 4) as a number."""
    if isinstance(q, bool):
        raise ValueError(f"not a quantity: {q!r}")
    if isinstance(q, (int, float)):
        return float(q)
    m = _QUANTITY.match(str(q).strip())
    if not m or m.group(2) not in _SUFFIX or (m.group(2) and "e" in m.group(1).lower()):
        raise ValueError(f"not a Kubernetes quantity: {q!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def cpu_quantity(cores: float) -> str:
    if float(cores).is_integer():
        return str(int(cores))
    return f"{max(1, round(cores * 1000))}m"


def memory_quantity(n: int) -> str:
    for suffix, unit in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(int(n))
