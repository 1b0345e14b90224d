"""Laying out what the commands print: aligned columns, short ids, durations and times.

Everything here is pure except `print_invariants`, which prints its table.

Example:
    >>> format_duration(timedelta(seconds=1.25)), truncate("a  long  note", width=9)
    ('1.25 s', 'a long...')
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta

from messages import Run


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()
) -> str:
    """Lay out rows under headers in aligned columns; columns in `right` align right.

    >>> print(format_table(["id", "n"], [["a", "1"], ["bcd", "22"]], right={1}))
    id    n
    ---  --
    a     1
    bcd  22
    """
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table has {len(headers)} columns")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        laid = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(laid).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def short_id(object_id: str | None) -> str:
    """The kind prefix and first 8 characters of an id; still a usable prefix for filters.

    >>> short_id("group-ce60df3f-6986-40c7-96fc-0b676aed11ff")
    'group-ce60df3f'
    """
    if object_id is None:
        return "-"
    prefix, dash, rest = object_id.partition("-")
    return f"{prefix}-{rest[:8]}" if dash and len(rest) > 8 else object_id


def format_duration(span: timedelta | None) -> str:
    """A duration for people: `8 ms`, `1.25 s`, `3m05s`; `-` when unknown."""
    if span is None:
        return "-"
    seconds = span.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def format_time(moment: datetime | None) -> str:
    """A timestamp to the second, as stored (UTC); `-` when unset."""
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def truncate(text: str | None, width: int = 40) -> str:
    """One line of at most `width` characters; `-` for nothing."""
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def run_duration(run: Run) -> str:
    """How long a run ran, from started to ended, for people; `-` until it has ended."""
    if run.started_at is None or run.completed_at is None:
        return "-"
    return format_duration(run.completed_at - run.started_at)


def print_invariants(checks: dict[str, bool], violations: Sequence[str]) -> None:
    """A table of invariant -> pass/FAIL, then the violations found."""
    rows = [[name, "pass" if held else "FAIL"] for name, held in checks.items()]
    print(format_table(["invariant", "result"], rows))
    broken = [name for name, held in checks.items() if not held]
    if broken:
        print(f"{len(broken)} invariant(s) FAILED: {', '.join(broken)}")
    else:
        print(f"All {len(checks)} invariants hold.")
    for violation in violations:
        print(f"violation: {violation}")
