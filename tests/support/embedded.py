"""The embedded (file) broker's folders as a test reads them, and a producer process that sends through it."""

from __future__ import annotations

import json
from pathlib import Path


def messages(folder: str | Path) -> list[str]:
    """Message files under a folder (and its consumer folders), by name."""
    return sorted(p.name for p in Path(folder).rglob("*.msg"))


def unacked_messages(folder: Path) -> list[dict]:
    """The messages consumers hold now (the raw file contents)."""
    found = []
    for path in folder.glob("*/*.msg"):
        try:
            found.append(json.loads(path.read_bytes()))
        except FileNotFoundError:
            continue  # acked since the listing
    return found


# The embedded default as a user runs it: the worker app publishes (as the CLI and demo do).
ENQUEUE = """
import json, sys
from worker.wiring.app import app, prepare_folders
prepare_folders()
for line in sys.stdin:
    message = json.loads(line)
    app.send_task("kling.generate", kwargs=message["kwargs"], countdown=message.get("countdown"))
"""
