"""Tables for the terminal: rich when stdout is a terminal, plain aligned text when piped."""

from __future__ import annotations

import sys
from typing import Any, Sequence


def is_terminal(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    try:
        return bool(stream.isatty())
    except Exception:
        return False


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
    if is_terminal(stream):
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        t = Table(title=title, box=None, header_style="bold", pad_edge=False)
        for c in columns:
            t.add_column(c, overflow="fold")
        for r in text_rows:
            cells = []
            for i, v in enumerate(r):
                style = styles[i](v) if styles and i in styles else None
                cells.append(Text(v, style=style or ""))
            t.add_row(*cells)
        Console(file=stream, soft_wrap=False).print(t)
        return
    if title:
        stream.write(f"# {title}\n")
    clean = [[v.replace("\n", "\\n").replace("\t", " ") for v in r] for r in text_rows]
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
    width = max((len(k) for k, _ in pairs), default=0)
    for k, v in pairs:
        text = "" if v is None else str(v)
        lines = text.splitlines() or [""]
        stream.write(f"{k.ljust(width)}  {lines[0]}\n")
        for extra in lines[1:]:
            stream.write(f"{' ' * width}  {extra}\n")
    stream.flush()
