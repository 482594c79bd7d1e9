"""Install hints are commands that work for the way meshrun is installed (meshrun._install.install_hint)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import meshrun.backend as mb
from meshrun import _registry
from meshrun._install import extra_hint, install_all_hint, install_hint

REPO = Path(__file__).resolve().parent.parent
BACKENDS = sorted(n for n in _registry.KNOWN if n != "local")


def _editable_path(hint: str) -> Path:
    """The folder a ``... pip install -e <folder>`` hint installs (extras stripped)."""
    words = shlex.split(hint)
    assert "pip" in words and words[words.index("pip") + 1] == "install", hint
    target = words[words.index("-e") + 1]
    return Path(re.sub(r"\[[^\]]*\]$", "", target))


@pytest.mark.parametrize("name", BACKENDS)
def test_each_hint_names_the_backend_folder_of_this_checkout(name):
    hint = install_hint(name)
    assert "meshrun-" not in hint  # no distribution name that no index serves
    path = _editable_path(hint)
    assert path.is_absolute() and path == REPO / "backends" / name
    project = tomllib.loads((path / "pyproject.toml").read_text())["project"]
    assert project["name"] == f"meshrun-{name}"
    assert project["entry-points"]["meshrun.backends"][name]
    # the registry, the kit and the backend's own class all give this same command
    assert _registry.KNOWN[name] == _registry.KNOWN.get(name) == mb.install_hint(name) == hint


def test_extras_are_kept_and_exist():
    hint = install_hint("slurm", ["rest"])
    target = shlex.split(hint)[-1]
    assert target == f"{REPO}/backends/slurm[rest]"
    project = tomllib.loads((REPO / "backends/slurm/pyproject.toml").read_text())["project"]
    assert "rest" in project["optional-dependencies"]


def test_the_backend_classes_carry_the_hint():
    import meshrun_slurm
    import meshrun_ssh

    assert meshrun_ssh.SSHBackend.install_hint == install_hint("ssh")
    assert meshrun_slurm.SlurmBackend.install_hint == install_hint("slurm")


def test_install_all_names_every_backend_folder():
    words = shlex.split(install_all_hint() or "")
    dirs = {Path(words[i + 1]) for i, w in enumerate(words) if w == "-e"}
    assert dirs == {REPO / "backends" / n for n in BACKENDS}
    assert dirs == {p.parent for p in (REPO / "backends").glob("*/pyproject.toml")}


def test_the_readme_install_line_names_every_backend_folder():
    """The README's one line that installs meshrun with every backend, run through bash's expansion."""
    readme = (REPO / "README.md").read_text()
    line = next(c for c in re.findall(r"`([^`\n]+)`", readme) if "backends/*/" in c and "pip install -e ." in c)
    # expand it as the shell would, printing the arguments pip would get
    shown = re.sub(r"\S*pip install", "printf '%s\\n'", line, count=1)
    out = subprocess.run(["bash", "-c", shown], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == ["-e", "."]
    assert {Path(out[i + 1]).resolve() for i in range(2, len(out), 2)} == {REPO / "backends" / n for n in BACKENDS}


def _installed_copy(tmp_path: Path, direct_url: dict | None, urls: list[str] = ()) -> str:
    """A copy of meshrun installed into a site folder (no checkout around it), with the given install record;
    returns what its install_hint says for ssh and slurm[rest], and its extra_hint for track, one a line."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "meshrun", site / "meshrun", ignore=shutil.ignore_patterns("__pycache__"))
    info = site / "meshrun-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: meshrun\nVersion: 0.1.0\n"
                                   + "".join(f"Project-URL: {u}\n" for u in urls))
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    code = ("from meshrun._install import install_hint as h, extra_hint as x; print(h('ssh')); "
            "print(h('slurm', ['rest'])); print(x('track'))")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, check=True, cwd=tmp_path).stdout


def test_an_installed_copy_from_git_points_at_the_same_commit(tmp_path):
    out = _installed_copy(tmp_path, {"url": "https://example.org/meshrun.git",
                                     "vcs_info": {"vcs": "git", "commit_id": "0123abc"}}).splitlines()
    assert out[0].endswith(" install 'meshrun-ssh @ git+https://example.org/meshrun.git@0123abc"
                           "#subdirectory=backends/ssh'")
    assert "'meshrun-slurm[rest] @ git+https://example.org/meshrun.git@0123abc#subdirectory=backends/slurm'" in out[1]
    assert out[2].endswith(" install 'meshrun[track] @ git+https://example.org/meshrun.git@0123abc'")


def test_an_installed_copy_from_a_folder_points_at_that_folder(tmp_path):
    out = _installed_copy(tmp_path, {"url": REPO.as_uri(), "dir_info": {}}).splitlines()
    assert out[0].endswith(f" install {REPO}/backends/ssh")  # not editable, as meshrun was not
    assert out[2].endswith(f" install '{REPO}[track]'")
    out = _installed_copy(tmp_path / "e", {"url": REPO.as_uri(), "dir_info": {"editable": True}}).splitlines()
    assert out[0].endswith(f" install -e {REPO}/backends/ssh")


def test_an_installed_copy_uses_the_repository_url_or_says_to_use_a_checkout(tmp_path):
    out = _installed_copy(tmp_path, None, ["Documentation, https://docs.example.org",
                                           "Repository, https://example.org/meshrun"]).splitlines()
    assert out[0].endswith(" install 'meshrun-ssh @ git+https://example.org/meshrun#subdirectory=backends/ssh'")
    out = _installed_copy(tmp_path / "bare", None).splitlines()
    assert out[0] == "from a checkout of meshrun: pip install -e backends/ssh"
    assert out[1] == "from a checkout of meshrun: pip install -e 'backends/slurm[rest]'"
    assert out[2] == "from a checkout of meshrun: pip install -e '.[track]'"


def test_the_extras_hint_of_this_checkout_installs_the_extra():
    hint = extra_hint("track")
    assert shlex.split(hint)[-2:] == ["-e", f"{REPO}[track]"]
    assert "track" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


# ---- the hinted command, run for real into a throwaway environment -------------------------------------------


def _closure(names: list[str]) -> list[metadata.Distribution]:
    """These distributions and everything they need (extras aside), as installed for this interpreter."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            marker = req.partition(";")[2].strip()
            if marker and "python_version" in marker and "< '3.11'" in marker.replace('"', "'"):
                continue
            todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    return list(seen.values())


@pytest.fixture
def bare_venv(tmp_path):
    """A new virtual environment that sees meshrun's requirements, pip and setuptools (linked from this
    interpreter's), but no backend distribution; meshrun itself comes from this checkout (PYTHONPATH)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for dist in _closure(["meshrun", "pip", "setuptools"]):
        if dist.metadata["Name"] == "meshrun":
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            src = Path(str(dist.locate_file(top)))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400", "MESHRUN_HOME": str(tmp_path / "home")}
    return py, env


def _backends(py: Path, env: dict) -> dict:
    out = subprocess.run([str(py), "-m", "meshrun", "backends", "--json"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {b["name"]: b for b in json.loads(out.stdout)}


@pytest.mark.slow
def test_the_hint_meshrun_backends_shows_installs_the_backend(bare_venv):
    py, env = bare_venv
    check = ("import importlib.metadata as m, json, meshrun_slurm; from meshrun import _registry as r; "
             "ep = [e for e in m.entry_points(group='meshrun.backends') if e.name == 'slurm']; "
             "print(json.dumps([meshrun_slurm.__file__, str(ep[0].dist.locate_file('')), ep[0].value, "
             "r.backend_class('slurm').__name__]))")
    assert subprocess.run([str(py), "-c", check], env=env, capture_output=True).returncode != 0  # not there yet
    by = _backends(py, env)
    assert by["slurm"]["status"] == "not installed"
    hint = by["slurm"]["detail"]
    assert hint == f"{shlex.quote(str(py))} -m pip install -e {REPO}/backends/slurm"
    table = subprocess.run([str(py), "-m", "meshrun", "backends"], env=env, capture_output=True, text=True,
                           timeout=120).stdout
    row = next(line for line in table.splitlines() if line.startswith("slurm"))
    assert "not installed" in row and hint in row

    # run exactly that command (offline: no dependencies to fetch, no build environment to set up)
    words = shlex.split(hint)
    words[words.index("install") + 1:words.index("install") + 1] = ["--no-deps", "--no-build-isolation", "-q"]
    done = subprocess.run(words, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    out = subprocess.run([str(py), "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    module, dist_at, target, cls = json.loads(out.stdout)
    assert Path(module) == REPO / "backends/slurm/meshrun_slurm/__init__.py"
    assert Path(dist_at).resolve().is_relative_to(py.parent.parent.resolve())  # registered in the new venv
    assert (target, cls) == ("meshrun_slurm:SlurmBackend", "SlurmBackend")
    assert _backends(py, env)["slurm"]["status"] != "not installed"
