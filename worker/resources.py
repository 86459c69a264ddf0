"""This process's resources: settings, the database engine, the Modellix client, the poller, the pause,
the database's outage state, whether the process is stopping, and what else one process keeps (the
archive, the webhook session and secret, the learned poll schedule).

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
from typing import Generic, Self, TypeVar, cast, overload

import requests
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from models import db
from worker.config import Settings, load
from worker.fleet.pause import BalanceAsked, PauseSeen
from worker.modellix import ModellixClient
from worker.ops import metrics, outages
from worker.polling.learning import Learner
from worker.polling.timer import Poller
from worker.results.archive import open_archive
from worker.results.webhooks import WebhookSecret

T = TypeVar("T")
_MISSING = object()


class _Made(Generic[T]):
    """A resource of this process, made by `make` on its first use and kept; threads racing to it get
    the same one (functools.cached_property takes no lock: two threads could each open a pool).
    `close` releases it when the process's resources are closed."""

    def __init__(self, make: Callable[[Resources], T], close: Callable[[T], None] | None = None):
        self.make = make
        self.close = close
        self.name = ""

    def __set_name__(self, owner: type[Resources], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, res: None, owner: type[Resources]) -> Self: ...

    @overload
    def __get__(self, res: Resources, owner: type[Resources]) -> T: ...

    def __get__(self, res: Resources | None, owner: type[Resources]) -> T | Self:
        if res is None:
            return self
        found = res._made.get(self.name, _MISSING)
        if found is _MISSING:
            with res._lock:
                found = res._made.get(self.name, _MISSING)
                if found is _MISSING:
                    found = res._made[self.name] = self.make(res)
        return cast(T, found)

    def made_in(self, res: Resources) -> T | None:
        """`res`'s one if it was made, else None (nothing is made)."""
        return cast(T | None, res._made.get(self.name))

    def close_in(self, made: dict[str, object]) -> None:
        if self.close is not None and self.name in made:
            self.close(cast(T, made[self.name]))


def _make_client(res: Resources) -> ModellixClient:
    s = res.settings
    client = ModellixClient(
        s.base_url, s.api_key, s.submit_path, s.connect_timeout, s.read_timeout, pool_size=s.concurrency + 4
    )
    metrics.meter(client.session, client.submit_url, client.task_url(""))
    return client


def _make_webhook_session(res: Resources) -> requests.Session:
    # Its own session: never the Modellix client's (the API key), never ~/.netrc or proxy variables.
    session = requests.Session()
    session.trust_env = False
    return session


class Resources:
    """This process's resources. Each `_Made` attribute below is made on its first use in the process."""

    settings: Settings
    # Closed in this order by `close`.
    client = _Made(_make_client, ModellixClient.close)
    engine = _Made(lambda res: db.make_engine(res.settings.database_url, res.db_pool_size), Engine.dispose)
    # This process's poll timer, started on first use, with as many threads as the worker.
    poller = _Made(lambda res: Poller(res.settings.concurrency), Poller.stop)
    # When this process last asked for the balance during a pause for credit (worker.fleet.pause).
    balance_asked = _Made(lambda res: BalanceAsked())
    # Where result images are kept (KLING_ARCHIVE; None: off). One per process: an S3 client is costly.
    archive = _Made(lambda res: open_archive(res.settings.archive))
    webhook_secret = _Made(lambda res: WebhookSecret.parse(res.settings.webhook_secret))
    webhook_session = _Made(_make_webhook_session, requests.Session.close)
    # This process's part in learning each request shape's first poll (worker.polling.learning).
    learner = _Made(Learner)

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pid = os.getpid()
        self.pause = PauseSeen()
        self.outage = outages.database()
        # Set when the worker is asked to stop (SIGTERM): what a thread holds is handed on, not kept.
        self.stopping = threading.Event()
        self._lock = threading.RLock()
        self._made: dict[str, object] = {}

    @property
    def poller_if_started(self) -> Poller | None:
        """The poll timer if this process started one, else None (asking starts nothing)."""
        return Resources.poller.made_in(self)

    @property
    def learner_if_made(self) -> Learner | None:
        return Resources.learner.made_in(self)

    def put_off(self, exc: Exception, what: str) -> None:
        """Count `what` (some work) as put off by a database outage, if `exc` is one; re-raise
        anything else, so a bug keeps its traceback. Called from an `except Exception` block."""
        if not db.unreachable(exc):
            raise exc
        self.outage.defer(what, exc)

    @property
    def db_pool_size(self) -> int:
        # Threads hold a connection only for a statement or two, never across an
        # HTTP call, so an eighth of the threads is plenty, and a fixed cap per
        # process keeps a fleet of workers under PostgreSQL's connection limit.
        return self.settings.db_pool or max(4, self.settings.concurrency // 8)

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
        """Close what was made (the client, the engine, the poll timer, the webhook session) and forget it all."""
        with self._lock:
            made, self._made = self._made, {}
        for lazy in vars(Resources).values():
            if isinstance(lazy, _Made):
                lazy.close_in(made)


_current: Resources | None = None
_lock = threading.Lock()


def get() -> Resources:
    """This process's resources, made on first use (after any fork). Asked for at the entry points only
    (Celery tasks and signal hooks, CLI commands, the demo); what they call is given them."""
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
