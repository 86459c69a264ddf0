"""Following jobs in the table until they end: `enqueue --wait` and the demo.

On a terminal the jobs are a live table (rich); anywhere else each change is
one line. While a job waits in `queued`, `why_queued` says why it may be
waiting: no worker consuming the queue (the doctor's check), the fleet paused
(the budget row), a worker retrying its submit (the row's last error), or, on a
broker that cannot count consumers, that no worker has taken it for a while.
Those checks run at most every HINT_EVERY seconds.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from models import TERMINAL, JobStatus, store
from worker import resources
from worker.cli.printing import styled

LOOK_EVERY = 0.3
# A job queued this long is worth asking about; then at most this often.
HINT_AFTER = 2.0
HINT_EVERY = 5.0
# On a broker that cannot count consumers, a job nobody took for this long is worth a word.
UNSEEN_AFTER = 15.0


@dataclass(frozen=True)
class Hint:
    """Why queued jobs may be waiting. A line is printed again only when what it is `about` changes;
    with `until` (time.monotonic()), the time left is counted down on a terminal."""

    about: str
    text: str
    until: float | None = None

    def sentence(self) -> str:
        if self.until is None:
            return self.text
        return f"{self.text} ({max(0.0, self.until - time.monotonic()):.0f}s left)"


# (how long the longest-queued job has waited, the rows of the queued jobs a worker has seen)
Hints = Callable[[float, list[dict[str, Any]]], list["Hint"]]


def why_queued(waited: float, rows: list[dict[str, Any]] | None = None) -> list[Hint]:
    """Why a job `waited` seconds in `queued` may be waiting still (nothing found: an empty list).
    `rows`: the queued jobs a worker has seen (a row with a last error is being retried)."""
    from worker.cli import doctor, fleet

    cfg = resources.settings()
    found: list[Hint] = []
    broker, consumers = doctor.check_queue(cfg)
    if not broker.ok:
        found.append(Hint("broker", f"the broker is unreachable: {broker.detail}"))
    elif not consumers.ok:
        found.append(Hint("consumers", consumers.detail))
    elif consumers.detail == doctor.CONSUMERS_UNKNOWN and waited >= UNSEEN_AFTER and not rows:
        found.append(
            Hint(
                "unseen",
                f"no worker has taken it in {waited:.0f}s; this broker cannot tell whether any worker is "
                "running (start one with `kling-worker worker`)",
            )
        )
    for row in [r for r in rows or [] if r.get("error_code")][:3]:  # a worker has it, and its submit failed
        last = f"{row['error_code']}: {row['error_message']}" if row.get("error_message") else row["error_code"]
        found.append(
            Hint(
                f"retry {row['id']} {row['error_code']}",
                f"{row['id']}: a worker is retrying its submit ({row['attempts']} attempt(s)); last error {last}",
            )
        )
    with resources.get().transaction() as s:
        budget = fleet.status(cfg, s)
    if budget["paused_for"]:
        reason = budget["pause_reason"] or "no reason recorded"
        until = time.monotonic() + budget["paused_for"]
        found.append(Hint(f"pause {reason}", f"the fleet is paused: {reason}", until))
    return found


def watch(ids: list[str], timeout: float, out: TextIO, hints: Hints | None = None) -> dict[str, dict[str, Any]]:
    """Follow jobs until all have ended (or `timeout`); their rows as dicts. `hints` says why
    queued jobs wait (why_queued); without it nothing is asked."""
    console = Console(file=out, highlight=False)
    view: _View = _LiveView(console, ids) if console.is_terminal else _Lines(out)
    with view:
        return _follow(ids, timeout, view, hints)


def _follow(ids: list[str], timeout: float, view: _View, hints: Hints | None) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    since: dict[str, float] = {}
    rows: dict[str, dict[str, Any]] = {}
    asked_at = float("-inf")
    while time.monotonic() < deadline:
        with resources.get().transaction() as s:
            rows = {j.id: j.to_dict() for j in store.find_jobs(s, ids)}
        now = time.monotonic()
        for job_id in ids:
            status = rows[job_id]["status"] if job_id in rows else JobStatus.queued.value  # no row until taken
            if seen.get(job_id) != status:
                seen[job_id], since[job_id] = status, now
                view.changed(job_id, status)
        if len(rows) == len(ids) and all(r["status"] in TERMINAL for r in rows.values()):
            break
        queued = [now - since[j] for j in ids if seen[j] == JobStatus.queued.value]
        if hints is None or not queued:
            view.hints([])
        elif max(queued) >= HINT_AFTER and now - asked_at >= HINT_EVERY:
            asked_at = now
            seen_rows = [rows[j] for j in ids if seen[j] == JobStatus.queued.value and j in rows]
            view.hints(hints(max(queued), seen_rows))
        time.sleep(LOOK_EVERY)
    return rows


class _View(ABC):
    """How the jobs' progress is shown."""

    def __enter__(self) -> _View:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    @abstractmethod
    def changed(self, job_id: str, status: str) -> None: ...

    @abstractmethod
    def hints(self, found: list[Hint]) -> None: ...


class _Lines(_View):
    """One line per change, for a pipe or a file: `HH:MM:SS job status`, and `HH:MM:SS waiting: why`."""

    def __init__(self, out: TextIO):
        self.out = out
        self.shown: set[str] = set()

    def changed(self, job_id: str, status: str) -> None:
        print(f"{datetime.now():%H:%M:%S} {job_id:<22} {status}", file=self.out, flush=True)

    def hints(self, found: list[Hint]) -> None:
        for hint in found:
            if hint.about not in self.shown:
                print(f"{datetime.now():%H:%M:%S} waiting: {hint.sentence()}", file=self.out, flush=True)
        self.shown = {hint.about for hint in found}


class _LiveView(_View):
    """A table of the jobs, their statuses and for how long, redrawn in place, with the reasons below it."""

    def __init__(self, console: Console, ids: list[str]):
        self.ids = ids
        self.status: dict[str, tuple[str, float]] = {}
        self.found: list[Hint] = []
        self.live = Live(console=console, refresh_per_second=4, get_renderable=self._render)

    def __enter__(self) -> _View:
        self.live.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.live.stop()

    def changed(self, job_id: str, status: str) -> None:
        self.status[job_id] = (status, time.monotonic())

    def hints(self, found: list[Hint]) -> None:
        self.found = found

    def _render(self) -> Group:
        shown = Table(box=None, show_header=False, pad_edge=False)
        for _ in range(3):
            shown.add_column()
        now = time.monotonic()
        for job_id in self.ids:
            status, at = self.status.get(job_id, (JobStatus.queued.value, now))
            waited = "" if status in TERMINAL else f"{now - at:.0f}s"
            shown.add_row(job_id, styled(status), Text(waited, style="dim"))
        notes = [Text(f"waiting: {hint.sentence()}", style="yellow") for hint in self.found]
        return Group(shown, *notes)
