"""A first-come first-served gate for the threads of one process, that a waiter leaves on a deadline or
when the process stops.

worker.fleet.places lets one submit thread per process at a time contend for the fleet's budget row; the
others wait here, each on an event of its own (so passing the gate on wakes one thread, not all).
First come first served: with a hundred threads holding messages, none may wait past its deadline
while later arrivals go ahead.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

# A waiter looks at `stopping` at least this often even if nobody calls `interrupt`.
LOOK_EVERY = 1.0


class _Turn:
    __slots__ = ("ready", "granted")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.granted = False


class Gate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = False
        self._waiters: deque[_Turn] = deque()

    @contextmanager
    def held(self, stopping: threading.Event, deadline: float) -> Iterator[bool]:
        """Hold the gate for the block; yields False (not holding it) if `stopping` is set or
        time.monotonic() passes `deadline` first."""
        entered = self._enter(stopping, deadline)
        try:
            yield entered
        finally:
            if entered:
                self._leave()

    def interrupt(self) -> None:
        """Wake every waiter now, to look at its `stopping` event (the process is stopping)."""
        with self._lock:
            for turn in self._waiters:
                turn.ready.set()

    def _enter(self, stopping: threading.Event, deadline: float) -> bool:
        with self._lock:
            if stopping.is_set():
                return False
            if not self._held:
                self._held = True
                return True
            turn = _Turn()
            self._waiters.append(turn)
        while True:
            left = deadline - time.monotonic()
            turn.ready.wait(max(0.0, min(left, LOOK_EVERY)))
            with self._lock:
                if turn.granted:
                    return True
                if stopping.is_set() or time.monotonic() >= deadline:
                    self._waiters.remove(turn)
                    return False
                turn.ready.clear()  # woken by interrupt() for another reason, or LOOK_EVERY passed

    def _leave(self) -> None:
        with self._lock:
            if self._waiters:
                turn = self._waiters.popleft()
                turn.granted = True
                turn.ready.set()
            else:
                self._held = False
