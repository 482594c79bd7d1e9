"""The code blocks of README.md and docs/**/*.md run as written.

Each fenced block is one of:

- ```python: run in a fresh interpreter (the test's own MESHRUN_HOME, on the local backend), which must exit 0;
- ```bash / ```sh / ```console: every command line (``$ `` lines of a console block) must be a ``meshrun``
  command that is safe here (reading commands, ``run`` on the local backend, ``--help``); they run in order
  and each must exit 0. ``JOB_ID`` stands for the job the block's last ``meshrun run -d`` printed;
- ```toml: a config file, loaded by meshrun's config loader and every table checked by what reads it (the
  backends' settings models, ``[placement]``, ``[prices]``, ``[tracking]``), so a setting that no longer
  exists fails here.

A block that cannot run here (a Slurm cluster, a cloud, a GPU, your own ``train.py``, an install) carries
``<!-- doctest: skip (the reason) -->`` on the line before it; the ``meshrun`` command lines of a skipped shell
block are still parsed by the CLI's own parser, so a documented flag that does not exist fails. A block may also
be preceded by ``<!-- doctest: env KEY=VALUE ... (why) -->`` (e.g. GPUs declared with ``MESHRUN_GPUS``),
``<!-- doctest: stub train.py ... (why) -->`` (stand-ins for the user's own scripts, which print their arguments)
and a shell block by ``<!-- doctest: exit N (why) -->``, the exit code its commands document.
Blocks without a language (layouts, output) are text. Each file is one test, with one MESHRUN_HOME for all
its blocks; the test prints how many blocks ran and how many were skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")
TIMEOUT = 60

MARKER = re.compile(r"^<!--\s*doctest:\s*(skip|env|exit|stub)\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w-]*)")

# meshrun subcommands that are safe to run here (reading, or run on this machine)
SAFE = {"ls", "status", "logs", "wait", "cancel", "offers", "gpus", "backends", "show", "catalog", "usage",
        "doctor", "run"}
SERVICES = ("slurm", "ssh", "dstack", "kubernetes")  # backends of the shared test services
OWN_PARSER = {"bench", "dashboard", "usage"}  # they parse their own arguments (usage: only as it runs)


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    text: str
    skip: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    exit: int = 0
    stubs: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line} ({self.lang})"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` with their markers."""
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        b = Block(path, start + 1, lang, "\n".join(body) + "\n")
        j = start - 1
        while j >= 0 and (mm := MARKER.match(lines[j].strip())):
            if mm.group(1) == "skip":
                reason = mm.group(2)
                assert re.fullmatch(r"\(.+\)", reason), f"{b}: a skip marker gives its reason in parentheses"
                b.skip = reason[1:-1]
            elif mm.group(1) == "stub":
                b.stubs += shlex.split(mm.group(2).split("(")[0])
            elif mm.group(1) == "exit":
                b.exit = int(mm.group(2).split()[0])
            else:
                b.env.update(dict(kv.split("=", 1) for kv in shlex.split(mm.group(2).split("(")[0])))
            j -= 1
        out.append(b)
    return out


def command_lines(b: Block) -> list[str]:
    """The command lines of a shell block (comments, continuations and, in a console block, output removed)."""
    text = b.text.replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines()]
    if b.lang == "console":
        lines = [ln[2:] for ln in lines if ln.startswith("$ ")]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def argv_of(line: str) -> list[str] | None:
    """The meshrun arguments of a command line, or None when it is not a meshrun command."""
    words = shlex.split(line, comments=True)
    while words and re.match(r"[A-Za-z_]\w*=", words[0]):  # VAR=value meshrun ...
        words = words[1:]
    if words[:1] == ["meshrun"]:
        return words[1:]
    if words[:3] == ["python", "-m", "meshrun"]:
        return words[3:]
    return None


def unsafe(argv: list[str]) -> str | None:
    """Why ``meshrun ARGV`` cannot run here, or None."""
    argv = argv[: argv.index("--")] if "--" in argv else argv  # not the job's own command
    if "--help" in argv or "-h" in argv:
        return None
    cmd = argv[0] if argv else ""
    if cmd not in SAFE:
        return f"`meshrun {cmd}` is not run by the doc test"
    if cmd == "catalog" and "update" in argv:
        return "`meshrun catalog update` fetches from the network"
    for flag in ("--backend", "-b"):
        if flag in argv and argv[argv.index(flag) + 1] != "local":
            return f"it uses the {argv[argv.index(flag) + 1]} backend"
    return None


def parse_check(b: Block, argv: list[str]) -> None:
    """The CLI's own parser accepts ``meshrun ARGV`` (nothing runs)."""
    from meshrun import _cli, _dashboard
    from meshrun.bench import _cli as bench_cli

    assert not argv or argv[0] in _cli.COMMANDS, f"{b}: no meshrun subcommand {argv[0]!r}"
    argv = [("1" if w == "JOB_ID" else w) for w in argv[: argv.index(">") if ">" in argv else None]]
    own = {"bench": bench_cli.build_parser, "dashboard": _dashboard.build_parser}
    if not argv or (argv[0] in OWN_PARSER and argv[0] not in own) or "--help" in argv or "-h" in argv:
        return  # `meshrun usage` builds its parser as it runs; --help is run where the block runs
    try:
        if argv[0] in own:
            own[argv[0]]().parse_args(argv[1:])
        else:
            _cli.build_parser(argv[0]).parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"{b}: `meshrun {shlex.join(argv)}` is refused by the CLI's parser") from e


def run_python(b: Block, cwd: Path) -> None:
    write_stubs(b, cwd)
    env = {**os.environ, **b.env}
    p = subprocess.run([sys.executable, "-c", b.text], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 0, f"{b} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"


def write_stubs(b: Block, cwd: Path) -> None:
    """Stand-ins for the user's own scripts a block names: they print their arguments and exit 0."""
    for name in b.stubs:
        f = cwd / name
        if name.endswith(".py"):
            f.write_text("import sys\nprint('stand-in for your script:', sys.argv[1:])\n")
        else:
            f.write_text("#!/bin/bash\necho \"stand-in for your script: $*\"\n")
            f.chmod(0o755)


def run_shell(b: Block, cwd: Path) -> None:
    job_id = None
    write_stubs(b, cwd)
    for line in command_lines(b):
        argv = argv_of(line)
        assert argv is not None, f"{b}: {line!r} is not a meshrun command; mark the block doctest: skip (reason)"
        why = unsafe(argv)
        assert why is None, f"{b}: {line!r} cannot run here ({why}); mark the block doctest: skip (reason)"
        if "JOB_ID" in argv:
            assert job_id, f"{b}: {line!r} names JOB_ID, but no `meshrun run -d` of the block printed one"
            argv = [job_id if w == "JOB_ID" else w for w in argv]
        out = None
        if ">" in argv:  # `meshrun usage --csv > usage.csv`
            k = argv.index(">")
            out, argv = cwd / argv[k + 1], argv[:k]
        p = subprocess.run([sys.executable, "-m", "meshrun", *argv], cwd=cwd, capture_output=True, text=True,
                           timeout=TIMEOUT, env={**os.environ, **b.env})
        assert p.returncode == b.exit, f"{b}: `{line}` exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        if out is not None:
            out.write_text(p.stdout)
        if argv[0] == "run" and ("-d" in argv or "--detach" in argv):
            job_id = p.stdout.split()[-1]


def load_toml(b: Block, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Load the block as the config file, and have each table read by what reads it."""
    import meshrun
    from meshrun import _prices, _registry, _tracking

    path = cwd / f"config-{b.line}.toml"
    path.write_text(b.text)
    try:
        with monkeypatch.context() as m:  # the file's later blocks run without it
            m.setenv("MESHRUN_CONFIG", str(path))
            config = meshrun.configure()  # read from the file, as a fresh process reads it
            for name in config.data.get("backends", {}):
                _registry.backend_class(name)(config.backend(name))  # its settings model: unknown keys are errors
            meshrun.PlacementOptions.from_config()
            _prices.price_table()
            _tracking.configured()
    finally:
        meshrun.configure()


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_doc_blocks(doc: Path, tmp_path: Path, request: pytest.FixtureRequest,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    # the jobs the blocks submit stay on this machine: the test services (a Slurm cluster, ...) other tests
    # start are not this test's to use
    Path(os.environ["MESHRUN_CONFIG"]).write_text(f"[placement]\nexclude_backends = {list(SERVICES)!r}\n")
    ran = skipped = 0
    for b in blocks(doc):
        if not b.lang:
            cmds = [ln for ln in b.text.splitlines() if re.match(r"(\$ )?meshrun ", ln.strip())]
            assert not cmds, f"{b}: {cmds[0]!r} is a command in a block without a language: tag it bash or console"
        if b.lang not in ("python", "toml", *SHELL):
            continue
        if b.lang in SHELL:  # even a skipped block's meshrun lines must parse
            for line in command_lines(b):
                argv = argv_of(line)
                if argv is not None:
                    parse_check(b, argv)
        if b.skip is not None:
            skipped += 1
            continue
        if b.lang == "python":
            run_python(b, tmp_path)
        elif b.lang == "toml":
            try:
                load_toml(b, tmp_path, monkeypatch)
            except meshrun_errors() as e:
                raise AssertionError(f"{b}: {type(e).__name__}: {e}") from e
        else:
            run_shell(b, tmp_path)
        ran += 1
    line = f"[docs] {doc.relative_to(REPO)}: {ran} block(s) ran, {skipped} skipped"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{line}" if reporter.verbosity <= 0 else line)


def meshrun_errors() -> tuple[type[BaseException], ...]:
    import meshrun

    return (meshrun.MeshrunError,)
