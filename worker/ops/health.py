"""Each worker process's metrics and health server, on KLING_METRICS_PORT (conventionally 9808).

- `/metrics`: Prometheus text exposition: worker.ops.metrics, and the client library's process metrics.
- `/healthz` (liveness): 200 while the process consumes: Celery's consumer runs with a broker
  connection, the poll timer's thread is alive and the worker is not stopping; otherwise 503 with
  the reason, as JSON. It reads a few attributes, so it can be asked as often as anyone likes.
- `/readyz` (readiness): 200 when the broker and the database each take a fresh connection
  within PROBE_TIMEOUT; otherwise 503, the JSON naming which did not and why. Every answer is kept
  CACHE seconds, and so is the outbox backlog /metrics reads, so a storm of probes and scrapes
  costs the database and the broker at most one connection each per CACHE.

The database reads use an engine of their own, with no pool and short timeouts: a probe never
waits behind job threads for a pooled connection, and never holds one they need.

Started when the worker is ready and stopped at its shutdown (worker.wiring.signals), so a producer or
the CLI never opens a port.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from celery import bootsteps
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from models import db, outbox, tenants
from models.job import utcnow
from worker.ops import metrics, outages

if TYPE_CHECKING:
    from worker.resources import Resources

log = logging.getLogger("kling_worker.health")

ADDRESS = "0.0.0.0"  # scraped from other hosts and containers
CONVENTIONAL_PORT = 9808
# Seconds a readiness probe may take to connect (and, on PostgreSQL, to run its statement).
PROBE_TIMEOUT = 2.0
# Seconds an answer from the broker or the database is kept before it is asked again.
CACHE = 2.0

T = TypeVar("T")


class Cached(Generic[T]):
    """`read()`'s outcome, a value or an exception, kept `ttl` seconds; callers meanwhile share it."""

    def __init__(self, read: Callable[[], T], ttl: float = CACHE):
        self.read = read
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -math.inf
        self._value: T | None = None
        self._error: Exception | None = None

    def get(self) -> T:
        with self._lock:  # a caller arriving during a read waits for it rather than reading again
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._value, self._error = self.read(), None
                except Exception as exc:
                    self._value, self._error = None, exc
                self._at = time.monotonic()
            value, error = self._value, self._error
        if error is not None:
            raise error.with_traceback(None)  # raised again each time: do not let its traceback grow
        return value  # type: ignore[return-value]  # set with a None error


# -- the checks ------------------------------------------------------------------------


def consuming(res: Resources, consumer: Any) -> str | None:
    """Why this process is not consuming, or None while it is. `consumer` is Celery's (worker_ready's sender)."""
    if res.stopping.is_set():
        return "the worker is stopping"
    if consumer.blueprint.state != bootsteps.RUN:
        return "Celery's consumer is not running"
    if consumer.connection is None:  # Celery clears it while it reconnects
        return "no connection to the broker: reconnecting"
    poller = res.poller_if_started
    if poller is not None and not poller.alive():
        return "the poll timer's thread has stopped"
    return None


def probe_engine(url: str) -> Engine:
    """An engine for probes and scrapes: a fresh connection each time, with short timeouts."""
    full = db.normalise_url(url)
    if full.startswith("sqlite"):
        args: dict[str, Any] = {"timeout": PROBE_TIMEOUT}
    else:
        # libpq's connect_timeout is whole seconds, at least 2; the statement's is in milliseconds.
        seconds = max(2, math.ceil(PROBE_TIMEOUT))
        args = {"connect_timeout": seconds, "options": f"-c statement_timeout={int(PROBE_TIMEOUT * 1000)}"}
    return create_engine(full, poolclass=NullPool, connect_args=args)


def database_problem(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return f"cannot connect: {outages.reason(exc)}"
    return None


def broker_problem(app: Any) -> str | None:
    """One connection to the broker, one try. The embedded broker is a folder: it must be there."""
    options = app.conf.broker_transport_options or {}
    folder = options.get("data_folder_in")
    if folder:
        return None if Path(folder).is_dir() else f"the embedded broker's folder {folder} is missing"
    try:
        with app.connection_for_read(connect_timeout=PROBE_TIMEOUT) as conn:
            conn.ensure_connection(max_retries=0)
    except Exception as exc:
        return f"cannot connect: {outages.reason(exc)}"
    return None


# -- the server ---------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold the worker's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None  # a line per scrape and probe would drown the worker's own log


class _Joined(Collector):
    """The library's default registry (our metrics, the process's) and a Snapshot, as one."""

    def __init__(self, snapshot: metrics.Snapshot):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from self.snapshot.collect()


class HealthServer:
    """/metrics, /healthz and /readyz on `port` (0: any free port; `.port` says which) in a thread of its own.

    `live()` says why the process is not live (None: it is); `ready()` maps each dependency to
    why it is not ready (None: it is).
    """

    def __init__(
        self,
        port: int,
        live: Callable[[], str | None],
        ready: Callable[[], dict[str, str | None]],
        snapshot: metrics.Snapshot,
        address: str = ADDRESS,
    ):
        self.live = live
        self.ready = ready
        registry = CollectorRegistry()
        registry.register(_Joined(snapshot))
        self._metrics = make_wsgi_app(registry)
        self._server = make_server(address, port, self._app, server_class=_Server, handler_class=_QuietHandler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kling-health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            answer: Iterable[bytes] = self._metrics(environ, start_response)
            return answer
        if path == "/healthz":
            reason = self.live()
            body = {"status": "ok"} if reason is None else {"status": "failing", "reason": reason}
            return _json(start_response, reason is None, body)
        if path == "/readyz":
            problems = self.ready()
            ok = all(problem is None for problem in problems.values())
            body = {"status": "ok" if ok else "unavailable", **{k: v or "ok" for k, v in problems.items()}}
            return _json(start_response, ok, body)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: /metrics, /healthz and /readyz are served here\n"]


def _json(start_response: StartResponse, ok: bool, body: dict[str, str]) -> list[bytes]:
    data = json.dumps(body).encode()
    status = "200 OK" if ok else "503 Service Unavailable"
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


# -- this worker process's server ------------------------------------------------------------

_running: HealthServer | None = None


def start(res: Resources, consumer: Any) -> HealthServer | None:
    """Serve this worker process's metrics and health on KLING_METRICS_PORT, if it is set (at worker_ready)."""
    global _running
    port = res.settings.metrics_port
    if port is None or _running is not None:
        return _running
    metrics.tasks_known(name for name in consumer.app.tasks if name.startswith("kling."))
    engine = probe_engine(res.settings.database_url)
    database = Cached(lambda: database_problem(engine))
    broker = Cached(lambda: broker_problem(consumer.app))
    backlog: Cached[Sequence[outbox.Backlog]] = Cached(lambda: read_backlog(engine))
    lines: Cached[Sequence[tenants.InLine]] = Cached(lambda: read_tenants(engine))
    snapshot = metrics.Snapshot(
        pause=lambda: (res.pause.until, res.pause.reason),
        poller_backlog=lambda: _poller_backlog(res),
        read_backlog=backlog.get,
        read_tenants=lines.get,
    )
    try:
        server = HealthServer(
            port,
            live=lambda: consuming(res, consumer),
            ready=lambda: {"broker": broker.get(), "database": database.get()},
            snapshot=snapshot,
        )
    except OSError as exc:
        log.error("metrics and health not served: KLING_METRICS_PORT=%d cannot be opened (%s)", port, exc)
        return None
    _running = server.start()
    log.info("metrics and health on http://%s:%d (/metrics, /healthz, /readyz)", ADDRESS, server.port)
    return server


def stop() -> None:
    """Stop serving (at worker_shutdown): from here on, probes find the port closed."""
    global _running
    server, _running = _running, None
    if server is not None:
        server.stop()


def read_backlog(engine: Engine) -> list[outbox.Backlog]:
    with engine.connect() as conn:
        return outbox.backlog(conn, utcnow())


def read_tenants(engine: Engine) -> list[tenants.InLine]:
    with engine.connect() as conn:
        return tenants.in_line(conn)


def _poller_backlog(res: Resources) -> int:
    poller = res.poller_if_started
    return poller.pending() if poller is not None else 0
