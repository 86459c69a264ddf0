"""This process's resources: settings, the database engine, the Modellix client, the poller, the pause,
the database's outage state, and whether the process is stopping.

One object per process, made on first use in that process (never inherited
across a fork: neither a requests Session nor a database pool survives one),
with one `reset()` for tests that change the settings between cases.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from models import db
from worker.config import Settings, load
from worker.modellix import ModellixClient
from worker.ops import metrics, outages
from worker.polling.timer import Poller

T = TypeVar("T")


@dataclass
class PauseSeen:
    """The fleet pause as this process last read it from the budget row (worker.fleet.limits)."""

    until: float = 0.0
    reason: str = ""
    read_at: float = float("-inf")  # time.monotonic() of the last read


class Resources:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.pid = os.getpid()
        self.pause = PauseSeen()
        self.outage = outages.database()
        # Set when the worker is asked to stop (SIGTERM): what a thread holds is handed on, not kept.
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._made: dict[str, Any] = {}

    def once(self, name: str, make: Callable[[], T]) -> T:
        """This process's `name`, made by `make` on first use; threads racing to it get the same one."""
        found = self._made.get(name)
        if found is None:
            with self._lock:
                found = self._made.get(name)
                if found is None:
                    found = self._made[name] = make()
        return cast(T, found)

    def put_off(self, exc: Exception, what: str) -> None:
        """Count `what` (some work) as put off by a database outage, if `exc` is one; re-raise
        anything else, so a bug keeps its traceback. Called from an `except Exception` block."""
        if not db.unreachable(exc):
            raise exc
        self.outage.defer(what, exc)

    def made(self, name: str) -> Any:
        """This process's `name` if it was made, else None."""
        return self._made.get(name)

    @property
    def engine(self) -> Engine:
        return self.once("engine", lambda: db.make_engine(self.settings.database_url, self.db_pool_size))

    @property
    def db_pool_size(self) -> int:
        # Threads hold a connection only for a statement or two, never across an
        # HTTP call, so an eighth of the threads is plenty, and a fixed cap per
        # process keeps a fleet of workers under PostgreSQL's connection limit.
        return self.settings.db_pool or max(4, self.settings.concurrency // 8)

    @property
    def client(self) -> ModellixClient:
        return self.once("client", self._make_client)

    def _make_client(self) -> ModellixClient:
        s = self.settings
        client = ModellixClient(
            s.base_url, s.api_key, s.submit_path, s.connect_timeout, s.read_timeout, pool_size=s.concurrency + 4
        )
        metrics.meter(client.session, client.submit_url, client.task_url(""))
        return client

    @property
    def poller(self) -> Poller:
        """This process's poll timer, started on first use, with as many threads as the worker."""
        return self.once("poller", lambda: Poller(self.settings.concurrency))

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction (locks last until it commits)."""
        with self._answered(db.transaction(self.engine)) as s:
            yield s

    @contextmanager
    def atomic(self) -> Iterator[Connection]:
        """Core statements in one transaction (no ORM session: see models.db.atomic)."""
        with self._answered(db.atomic(self.engine)) as conn:
            yield conn

    @contextmanager
    def statement(self) -> Iterator[Connection]:
        """One statement that is atomic on its own."""
        with self._answered(db.statement(self.engine)) as conn:
            yield conn

    @contextmanager
    def _answered(self, opened: AbstractContextManager[T]) -> Iterator[T]:
        # A block that ran to its end tells the outage tracker the database answered since `began`.
        began = time.monotonic()
        with opened as value:
            yield value
        self.outage.ok(began)

    def close(self) -> None:
        with self._lock:
            made, self._made = self._made, {}
        if "client" in made:
            made["client"].close()
        if "engine" in made:
            made["engine"].dispose()
        if "poller" in made:
            made["poller"].stop()


_current: Resources | None = None
_lock = threading.Lock()


def get() -> Resources:
    """This process's resources, made on first use (after any fork)."""
    global _current
    found = _current
    if found is None or found.pid != os.getpid():
        with _lock:
            if _current is None or _current.pid != os.getpid():
                _current = Resources(load())
            found = _current
    return found


def settings() -> Settings:
    return get().settings


def reset() -> None:
    """Forget this process's resources (tests that change the environment between cases)."""
    global _current
    with _lock:
        if _current is not None and _current.pid == os.getpid():
            _current.close()
        _current = None
