"""What the CLI prints: rich tables and colour on a terminal, plain aligned text elsewhere, JSON on request.

On a terminal (rich decides, and honours NO_COLOR and TERM=dumb) tables have
borders and statuses are coloured. Anywhere else, a pipe or a file, the same
table is plain text: a header line, then one line per row, columns aligned
with two spaces, nothing else; `--json` is the form for programs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Words worth a colour wherever they appear in a table's cells.
STYLES = {
    "succeeded": "green",
    "ok": "green",
    "retried": "green",
    "deleted": "green",
    "failed": "red",
    "rejected": "red",
    "FAIL": "bold red",
    "cancelled": "yellow",
    "skipped": "yellow",
    "would retry": "cyan",
    "would delete": "cyan",
    "not sent": "bold red",
    "queued": "dim",
    "submitting": "cyan",
    "submitted": "cyan",
    "processing": "cyan",
}


def console(err: bool = False) -> Console:
    """A console on this moment's stdout (or stderr): made per use, so redirected streams are honoured."""
    return Console(stderr=err, highlight=False, soft_wrap=False)


def on_terminal(err: bool = False) -> bool:
    return console(err).is_terminal


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def styled(value: Any) -> Text:
    text = cell(value)
    return Text(text, style=STYLES.get(text, ""))


def table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    header: bool = True,
    err: bool = False,
) -> None:
    """Print rows under named columns: a rich table on a terminal, aligned plain text anywhere else."""
    out = console(err)
    if out.is_terminal:
        shown = Table(title=title, box=box.SIMPLE_HEAD if header else None, show_header=header, title_justify="left")
        for name in columns:
            shown.add_column(name, overflow="fold")
        for row in rows:
            shown.add_row(*(styled(value) for value in row))
        out.print(shown)
        return
    lines = [list(columns)] if header else []
    lines += [[cell(value) for value in row] for row in rows]
    if not lines:
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    stream = sys.stderr if err else sys.stdout
    for line in lines:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip(), file=stream)


def fields(pairs: Sequence[tuple[str, Any]], *, sep: str = ": ", title: str | None = None) -> None:
    """Print name/value pairs, one per line, names right-aligned (a job in full, counts)."""
    out = console()
    if out.is_terminal:
        shown = Table(title=title, box=None, show_header=False, title_justify="left", pad_edge=False)
        shown.add_column(justify="right", style="bold")
        shown.add_column(overflow="fold")
        for name, value in pairs:
            shown.add_row(name, styled(value))
        out.print(shown)
        return
    width = max((len(name) for name, _ in pairs), default=0)
    for name, value in pairs:
        print(f"{name:>{width}}{sep}{cell(value)}")


def job(row: dict[str, Any]) -> None:
    """A job in full (`jobs show`, the end of `enqueue --wait`): its columns, files and deliveries."""
    pairs: list[tuple[str, Any]] = []
    for key, value in row.items():
        if key in ("last_response", "files", "deliveries") or value is None:
            continue
        pairs.append((key.replace("_", " ") if key == "retried_as" else key, value))
    for index, found in enumerate(row.get("files") or []):
        kept = f"{found['uri']} ({found['content_type']}, {found['bytes']} bytes)" if found.get("uri") else None
        pairs.append((f"file {index}", kept or "not archived: " + str(found.get("error"))))
    for d in row.get("deliveries") or []:
        state = f"{d['state']} after {d['attempts']} attempt(s)"
        pairs.append((d["channel"], state + (f"; last error: {d['last_error']}" if d["last_error"] else "")))
    fields(pairs)


def as_json(data: Any) -> None:
    """JSON for programs: never coloured, never wrapped."""
    print(json.dumps(data, indent=2, ensure_ascii=False))


def say(text: str) -> None:
    """A message for the person (what was done, what was not): on stderr, so stdout stays data."""
    print(text, file=sys.stderr)
