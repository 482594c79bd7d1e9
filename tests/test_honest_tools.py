"""Tools that tell the truth: rejections name every violated constraint, `meshrun offers` prints what the
docs show, `meshrun bench` prints its table once, a command job's notebook cell shows its output, and the
docs' log-following examples print something."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import meshrun
from meshrun import JobSpec, _catalog

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


SNAP: Path | None = _catalog.SHIPPED  # the price catalog snapshot that ships inside the package
needs_snapshot = pytest.mark.skipif(not SNAP.is_dir(), reason="the catalog snapshot (meshrun/catalogs/v8) is not here")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshrun", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# ---- a rejected catalog offer names every violated constraint ---------------------------------------------


@needs_snapshot
def test_uninstalled_launcher_rejection_also_names_price_and_spot(fake_gpus):
    fake_gpus(0)
    meshrun.configure({"placement": {"catalog_dir": str(SNAP), "cloud_launcher": "skyless"}})
    p = meshrun.plan(JobSpec(command=["true"], gpus="H100:1"), backends=["local", "skyless"],
                     max_price_per_hour=2, raise_on_empty=False)
    assert p.chosen is None
    sky = [(o, r) for o, r in p.rejected if o.backend == "skyless"]
    assert sky
    for o, why in sky:
        assert "skyless backend, which is not installed" in why, why
        if o.total_price_per_hour > 2:
            assert f"${o.total_price_per_hour:.2f}/h is above max_price_per_hour $2.00/h" in why, why
        else:
            assert "above max_price_per_hour" not in why, why
        assert ("spot is not allowed" in why) == o.spot, why
    # the $3.29 lambda H100 named in the docs is among them, with both reasons
    assert any(abs(o.total_price_per_hour - 3.29) < 1e-9 and "above max_price_per_hour" in why for o, why in sky)
    # an offer that cannot run for a reason of its own keeps that reason first
    local = [why for o, why in p.rejected if o.backend == "local"]
    assert local and all("GPU" in why.split(";")[0] for why in local)


# ---- docs/placement.md shows what `meshrun offers --max-price 2` prints ---------------------------------


def _doc_block(path: Path, first_line: str) -> list[str]:
    """The lines of the fenced block in ``path`` that starts with ``first_line``."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line == first_line and i and lines[i - 1].startswith("```"):
            end = lines.index("```", i)
            return lines[i + 1:end]
    raise AssertionError(f"{path.name} has no code block starting with {first_line!r}")


def _pattern(doc_line: str) -> re.Pattern[str]:
    """A doc line as a pattern: runs of spaces are one space, ``...`` stands for anything, and the install
    hint of an uninstalled launcher may be absent (the test's launcher has none)."""
    text = " ".join(doc_line.split())
    text = text.replace(" (install it with: pip install -e backends/skypilot)", "\0").replace(" (...)", "\0")
    pat = re.escape(text).replace(re.escape("..."), ".*").replace("\0", "(?: \\(.*?\\))?")
    return re.compile(pat)


@needs_snapshot
def test_placement_doc_shows_what_offers_with_max_price_prints(tmp_path):
    doc = _doc_block(REPO / "docs" / "placement.md", "$ meshrun offers --gpus H100:1 --max-price 2")
    assert not any("meshrun: error" in line for line in doc)
    cfg = tmp_path / "config.toml"
    # a launcher that is not installed stands for the docs' uninstalled skypilot backend
    cfg.write_text('[placement]\nbackends = ["local", "skyless"]\ncloud_launcher = "skyless"\n')
    out = cli("offers", "--gpus", "H100:1", "--max-price", "2",
              env={"MESHRUN_CONFIG": str(cfg), "MESHRUN_CATALOG_DIR": str(SNAP), "MESHRUN_GPUS": "0,1"})
    assert out.returncode == 1, out.stderr
    got = [" ".join(line.replace("skyless", "skypilot").split()) for line in out.stdout.splitlines()]
    assert len(got) == len(doc), (got, doc)
    for want, line in zip(doc, got):
        assert _pattern(want).fullmatch(line), f"docs show\n  {want}\nthe command prints\n  {line}"


# ---- docs never show a bare job.logs(follow=True), which prints nothing -----------------------------------


def _python_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every ```python block in a Markdown file."""
    out, cur, start = [], None, 0
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if cur is None and line.strip().startswith("```python"):
            cur, start = [], n + 1
        elif cur is not None and line.strip() == "```":
            out.append((start, cur))
            cur = None
        elif cur is not None:
            cur.append(line)
    return out


BARE_FOLLOW = re.compile(r"^\s*[\w.\[\]()]+\.logs\([^)]*follow\s*=\s*True")


def test_docs_never_show_a_bare_follow_that_prints_nothing():
    bad = []
    for path in DOCS:
        for start, lines in _python_blocks(path):
            for k, line in enumerate(lines):
                if BARE_FOLLOW.match(line):
                    bad.append(f"{path.relative_to(REPO)}:{start + k}: {line.strip()}")
    assert not bad, "job.logs(follow=True) returns an iterator; a bare call prints nothing:\n" + "\n".join(bad)


def test_the_ssh_docs_follow_example_prints_the_output():
    # run the docs' loop as written against a real local command job
    block = next(lines for _, lines in _python_blocks(REPO / "docs" / "backends" / "ssh.md")
                 if any("logs(follow=True)" in line for line in lines))
    i = next(k for k, line in enumerate(block) if "logs(follow=True)" in line)
    loop = "\n".join([block[i], *[line for line in block[i + 1:] if line.startswith((" ", "\t"))]])
    code = ("import meshrun\n"
            "job = meshrun.run(['sh', '-c', 'echo first; echo second'], backend='local')\n" + loop + "\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["first", "second"], out.stdout


# ---- a command job's display shows its output and exit code ---------------------------------------------


def test_command_job_display_shows_a_capped_output_tail_and_the_exit_code():
    job = meshrun.run(["sh", "-c", "echo start; yes filler | head -c 20000; echo; echo the-last-line; exit 3"],
                      backend="local")
    job.wait(timeout=120)
    assert "exit code 3" in repr(job) and "failed" in repr(job)
    html = job._repr_html_()
    assert "the-last-line" in html and "<th" in html and ">exit code<" in html and ">3<" in html
    assert "start" not in html.split("<pre", 1)[1]  # only the tail, not the whole output
    assert len(html) < 6000  # capped: a job's output may be gigabytes
    ok = meshrun.run(["echo", "hello"], backend="local")
    assert ok.result(timeout=120) == 0  # result() stays the exit code
    assert "exit code 0" in repr(ok) and "hello" in ok._repr_html_()


def test_the_example_notebook_shows_a_command_job_not_its_exit_code():
    import json

    nb = json.loads((REPO / "examples" / "notebook.ipynb").read_text())
    last = "".join(nb["cells"][-1]["source"]).strip().splitlines()[-1]
    assert not last.rstrip().endswith(".result(timeout=120)"), last
