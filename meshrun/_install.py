"""How to install a backend package, worked out from the way meshrun itself is installed.

The backends live in meshrun's repository (``backends/<name>``, distribution ``meshrun-<name>``) and are not
published on a package index, so ``pip install meshrun-<name>`` cannot work. :func:`install_hint` gives a
command that does, in this order:

1. meshrun runs from a checkout (its package folder sits beside ``backends/<name>/pyproject.toml``):
   ``pip install -e /abs/path/backends/<name>``;
2. meshrun was installed from a local folder (``pip install /path/to/meshrun``, recorded in its
   ``direct_url.json``) that still holds the backend: the same, editable or not as meshrun was;
3. meshrun was installed from a git URL: ``pip install 'meshrun-<name> @ git+<url>@<commit>#subdirectory=
   backends/<name>'``, the same commit as meshrun's;
4. meshrun's metadata names its repository (``[project.urls]``): the same form from that repository;
5. otherwise: ``from a checkout of meshrun: pip install -e backends/<name>``.

``pip`` is the ``pip`` on ``PATH`` when it belongs to the interpreter running meshrun, else
``<that interpreter> -m pip``, so the command installs where meshrun will find it. Standard library only.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote, urlparse

#: the folder of a meshrun checkout that holds one backend package per subfolder
BACKENDS_DIR = "backends"
#: the [project.urls] labels that name meshrun's repository, most specific first
_REPO_LABELS = ("repository", "source", "source code", "code", "git", "homepage")


def source_tree() -> Path | None:
    """The checkout this meshrun runs from (the folder above the ``meshrun`` package when it holds a
    ``pyproject.toml`` and a ``backends`` folder), or None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / BACKENDS_DIR).is_dir():
        return root
    return None


def backend_source(name: str) -> Path | None:
    """``backends/<name>`` of the checkout meshrun runs from, when it holds that backend's pyproject.toml."""
    root = source_tree()
    if root is not None and (root / BACKENDS_DIR / name / "pyproject.toml").is_file():
        return root / BACKENDS_DIR / name
    return None


@functools.lru_cache(maxsize=1)
def pip_command() -> str:
    """``pip`` when the ``pip`` on PATH is this interpreter's, else ``<this interpreter> -m pip``."""
    found = shutil.which("pip")
    if found and os.path.dirname(os.path.abspath(found)) == os.path.dirname(os.path.abspath(sys.executable)):
        return "pip"
    return f"{shlex.quote(sys.executable)} -m pip"


@functools.lru_cache(maxsize=1)
def _installed_origin() -> tuple[str, str, bool]:
    """How the meshrun distribution was installed: ``("dir", path, editable)``, ``("vcs", "git+url@commit",
    False)``, ``("repo", url, False)`` or ``("", "", False)`` when nothing says."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("meshrun")
    except (PackageNotFoundError, ValueError, OSError):
        return ("", "", False)
    try:
        direct: Any = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        direct = None
    if isinstance(direct, dict) and isinstance(direct.get("url"), str):
        url = direct["url"]
        vcs = direct.get("vcs_info")
        if isinstance(vcs, dict) and vcs.get("vcs") == "git":
            commit = vcs.get("commit_id") or vcs.get("requested_revision")
            return ("vcs", f"git+{url}" + (f"@{commit}" if commit else ""), False)
        if isinstance(direct.get("dir_info"), dict) and url.startswith("file:"):
            editable = bool(direct["dir_info"].get("editable"))
            return ("dir", unquote(urlparse(url).path), editable)
    urls: dict[str, str] = {}
    for entry in dist.metadata.get_all("Project-URL") or []:
        label, _, link = str(entry).partition(",")
        urls[label.strip().lower()] = link.strip()
    for label in _REPO_LABELS:
        link = urls.get(label, "")
        if link.startswith(("https://", "http://", "git+", "ssh://")):
            return ("repo", link if link.startswith("git+") else f"git+{link}", False)
    return ("", "", False)


def install_hint(name: str, extras: Iterable[str] = ()) -> str:
    """One command that installs backend ``name`` (with ``extras``) for the way meshrun is installed here."""
    extra = f"[{','.join(extras)}]" if extras else ""
    src = backend_source(name)
    if src is not None:
        return f"{pip_command()} install -e {shlex.quote(f'{src}{extra}')}"
    kind, where, editable = _installed_origin()
    if kind == "dir" and (Path(where) / BACKENDS_DIR / name / "pyproject.toml").is_file():
        path = Path(where) / BACKENDS_DIR / name
        return f"{pip_command()} install {'-e ' if editable else ''}{shlex.quote(f'{path}{extra}')}"
    if kind in ("vcs", "repo"):
        req = f"meshrun-{name}{extra} @ {where}#subdirectory={BACKENDS_DIR}/{name}"
        return f"{pip_command()} install {shlex.quote(req)}"
    return f"from a checkout of meshrun: pip install -e {shlex.quote(f'{BACKENDS_DIR}/{name}{extra}')}"


def extra_hint(extra: str) -> str:
    """One command that installs meshrun's optional dependencies ``extra`` (``track``) for the way meshrun is
    installed here (meshrun is not published on a package index either)."""
    root = source_tree()
    if root is not None:
        return f"{pip_command()} install -e {shlex.quote(f'{root}[{extra}]')}"
    kind, where, editable = _installed_origin()
    if kind == "dir":
        return f"{pip_command()} install {'-e ' if editable else ''}{shlex.quote(f'{where}[{extra}]')}"
    if kind in ("vcs", "repo"):
        return f"{pip_command()} install {shlex.quote(f'meshrun[{extra}] @ {where}')}"
    return f"from a checkout of meshrun: pip install -e {shlex.quote(f'.[{extra}]')}"


def install_all_hint() -> str | None:
    """One command that installs every backend of the checkout meshrun runs from (None for an installed copy)."""
    root = source_tree()
    if root is None:
        return None
    dirs = sorted(p.parent for p in (root / BACKENDS_DIR).glob("*/pyproject.toml"))
    return f"{pip_command()} install " + " ".join(f"-e {shlex.quote(str(d))}" for d in dirs)
