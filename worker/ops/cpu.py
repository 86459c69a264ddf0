"""Where a worker's CPU goes, by phase of a job: the profile `bench/run.py` prints.

Each phase is timed with the thread's own CPU clock, so a thread waiting on
the network or the database costs nothing, and phases nest: while a poll
records its result, the time is the `record` phase's, not the `poll`'s. What
no phase covers (Celery and kombu moving messages, thread hand-offs, the poll
timer, heartbeats) is the process's CPU minus the sum: `metrics` reports the
sum by phase beside the process's total.

Every thread keeps its own totals, so timing takes no lock; a scrape adds
them up. A phase costs two reads of the thread's clock, about a microsecond.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

# One `kling.generate` message: its checks (schemas, webhook), the claim, the submit request,
# writing what Modellix answered; one poll of a task; the outbox (archive, events); the sweep.
PHASES = ("validate", "claim", "submit", "record", "poll", "deliver", "sweep")

P = ParamSpec("P")
R = TypeVar("R")


class _Open:
    """A phase running on this thread, and when its time was last counted."""

    __slots__ = ("name", "since")

    def __init__(self, name: str, since: float):
        self.name, self.since = name, since


_local = threading.local()
_threads: list[dict[str, float]] = []
_threads_lock = threading.Lock()


def _spent() -> dict[str, float]:
    try:
        return _local.spent  # type: ignore[no-any-return]  # a threading.local attribute is untyped
    except AttributeError:
        spent = dict.fromkeys(PHASES, 0.0)
        _local.spent, _local.stack = spent, []
        with _threads_lock:
            _threads.append(spent)
        return spent


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count this thread's CPU time in the block as `name` (minus any phase nested in it)."""
    spent = _spent()
    stack: list[_Open] = _local.stack
    now = time.thread_time()
    if stack:
        spent[stack[-1].name] += now - stack[-1].since
    stack.append(_Open(name, now))
    try:
        yield
    finally:
        now = time.thread_time()
        spent[name] += now - stack.pop().since
        if stack:
            stack[-1].since = now


def timed(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """The decorator form of `phase`."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with phase(name):
                return fn(*args, **kwargs)

        return run

    return decorate


def totals() -> dict[str, float]:
    """CPU seconds by phase, over every thread of this process so far."""
    with _threads_lock:
        threads = list(_threads)
    return {name: sum(spent[name] for spent in threads) for name in PHASES}
