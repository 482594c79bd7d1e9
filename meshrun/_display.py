"""Tables for the terminal: rich when stdout is a terminal, plain aligned text when piped."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing is not imported at run time (the CLI must start fast)
if TYPE_CHECKING:
    from typing import Any, Sequence


def is_terminal(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    try:
        return bool(stream.isatty())
    except Exception:
        return False


def _visible(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# Characters a terminal acts on instead of showing: C0 controls (ESC starts CSI/OSC sequences: clear screen,
# set title, OSC 52 clipboard writes; BEL ends OSC; CR rewrites the line), DEL, C1 controls (0x9b is a
# one-byte CSI), and the Unicode line separators and bidi overrides/isolates (which reorder what follows).
_UNSAFE = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028, 0x2029,
           *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_SAFE = {c: _visible(c) for c in _UNSAFE}
_SAFE_LINES = {c: v for c, v in _SAFE.items() if c != 0x0A}


def safe_text(value: Any, *, newlines: bool = False) -> str:
    """``value`` as text that cannot drive the terminal: every control character (and bidi override) is shown
    as a visible escape such as ``\\x1b``; other Unicode text is kept. For strings that other users or jobs
    control (job names, users, reasons, commands) on their way to a terminal; JSON output is not passed
    through this. With ``newlines``, ``\\n`` is kept as a line break."""
    text = "" if value is None else str(value)
    return text.translate(_SAFE_LINES if newlines else _SAFE)


STATE_STYLE = {
    "succeeded": "green",
    "running": "cyan",
    "pending": "yellow",
    "submitting": "yellow",
    "failed": "red",
    "timeout": "red",
    "lost": "red",
    "preempted": "magenta",
    "cancelled": "dim",
    "unknown": "dim",
}


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    stream: Any = None,
    styles: dict[int, Any] | None = None,
) -> None:
    """Print rows under column headers. ``styles`` maps a column index to a function value -> rich style."""
    stream = stream or sys.stdout
    text_rows = [["" if v is None else str(v) for v in r] for r in rows]
    columns = [safe_text(c) for c in columns]
    title = None if title is None else safe_text(title)
    if is_terminal(stream):
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        t = Table(title=None if title is None else Text(title), box=None, header_style="bold", pad_edge=False)
        for c in columns:
            t.add_column(c, overflow="fold")
        for r in text_rows:
            cells = []
            for i, v in enumerate(r):
                style = styles[i](v) if styles and i in styles else None
                cells.append(Text(safe_text(v, newlines=True), style=style or ""))
            t.add_row(*cells)
        Console(file=stream, soft_wrap=False).print(t)
        return
    if title:
        stream.write(f"# {title}\n")
    clean = [[safe_text(v.replace("\n", "\\n").replace("\t", " ")) for v in r] for r in text_rows]
    widths = [len(c) for c in columns]
    for r in clean:
        for i, v in enumerate(r):
            widths[i] = max(widths[i], len(v))
    fmt = lambda cells: "  ".join(v.ljust(widths[i]) for i, v in enumerate(cells)).rstrip()  # noqa: E731
    stream.write(fmt(list(columns)) + "\n")
    for r in clean:
        stream.write(fmt(r) + "\n")
    stream.flush()


def state_style(value: str) -> str:
    return STATE_STYLE.get(value.split()[0] if value else "", "")


def print_kv(pairs: Sequence[tuple[str, Any]], *, stream: Any = None) -> None:
    stream = stream or sys.stdout
    pairs = [(safe_text(k), v) for k, v in pairs]
    width = max((len(k) for k, _ in pairs), default=0)
    for k, v in pairs:
        text = safe_text(v, newlines=True)
        lines = text.split("\n") or [""]
        stream.write(f"{k.ljust(width)}  {lines[0]}\n")
        for extra in lines[1:]:
            stream.write(f"{' ' * width}  {extra}\n")
    stream.flush()
