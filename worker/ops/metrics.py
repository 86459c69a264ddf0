"""The worker's Prometheus metrics, all defined here, and one function per event that moves them.

Counters and histograms count what happens in this process: jobs it ended,
its calls to the Modellix API (timed and counted by a wrapper around the
client's HTTP adapter, so the client itself knows nothing of metrics), its
Celery tasks running. `Snapshot` reads the rest when Prometheus scrapes: the
fleet pause as this process last read it, its poll timer's backlog, and the
outbox's backlog from the database (the whole fleet's: every worker reports
the same numbers, so aggregate them with max, not sum).

Labels take values from small fixed sets only: never a job id, a task id, a
URL or a message, so the number of series stays bounded whatever the jobs are.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from requests.adapters import BaseAdapter

from models.job import utcnow
from models.outbox import Backlog, Channel, State
from models.tenants import InLine
from worker.fleet.pause import PauseKind, kind_of
from worker.ops import cpu

# The Modellix API answers in tens of milliseconds to seconds; a read may take up to MODELLIX_READ_TIMEOUT (30 s).
API_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENDPOINTS = ("submit", "poll", "other")
# How a fleet pause is labelled, by its kind (worker.fleet.pause).
PAUSE_REASONS = {
    PauseKind.rate_limited: "rate_limited",
    PauseKind.unauthorized: "key_refused",
    PauseKind.no_balance: "balance",
}
OTHER = "other"

# A `_created` series beside every counter and histogram doubles what is scraped and says little here.
disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated

JOBS_ENDED = Counter(
    "kling_jobs_ended",
    "Jobs this process moved to an end state, by status and error code (empty when it succeeded)",
    ["status", "error_code"],
)
API_SECONDS = Histogram(
    "kling_api_request_duration_seconds",
    "Modellix API calls from this process, from sending to the answer's headers (or the error), by endpoint",
    ["endpoint"],
    buckets=API_BUCKETS,
)
API_ANSWERS = Counter(
    "kling_api_responses",
    'Modellix API calls from this process by endpoint and HTTP status; status="error" when no answer came '
    "(refused, timed out, dropped)",
    ["endpoint", "status"],
)
TASKS_IN_FLIGHT = Gauge(
    "kling_tasks_in_flight",
    "Celery tasks running in this process, by task name",
    ["task"],
)

JOBS_SUBMITTED = Counter(
    "kling_jobs_submitted",
    "Jobs this process submitted to Modellix (the answer recorded), by tenant",
    ["tenant"],
)

TASK_RUNS = Counter(
    "kling_task_runs",
    "Celery task executions started in this process, by task name: each one a delivery of a message from the "
    "broker (a message sent back with a countdown and delivered again counts again)",
    ["task"],
)


# -- the events ------------------------------------------------------------------


def job_ended(status: str, error_code: str | None, count: int = 1) -> None:
    """`count` jobs reached the end state `status` in this process (counted once: after the move committed)."""
    if count:
        JOBS_ENDED.labels(status, error_code_label(error_code)).inc(count)


def job_submitted(tenant: str) -> None:
    JOBS_SUBMITTED.labels(tenant).inc()


def tasks_known(names: Iterable[str]) -> None:
    """Show these tasks at 0 in flight before any has run (a series that appears late hides its start)."""
    for name in names:
        TASKS_IN_FLIGHT.labels(name)
        TASK_RUNS.labels(name)


def task_started(name: str) -> None:
    TASKS_IN_FLIGHT.labels(name).inc()
    TASK_RUNS.labels(name).inc()


def task_ended(name: str) -> None:
    TASKS_IN_FLIGHT.labels(name).dec()


def api_call(endpoint: str, status: str, seconds: float) -> None:
    """One call to the API: its answer's HTTP status, or "error" when none came."""
    API_SECONDS.labels(endpoint).observe(seconds)
    API_ANSWERS.labels(endpoint, status).inc()


def error_code_label(code: str | None) -> str:
    """A job's error code as a label: ours are short words; the API's are HTTP statuses. Anything else
    (a number from an answer's body) is "other", so no answer can make new series without end."""
    if not code:
        return ""
    return code if re.fullmatch(r"[a-z_]{1,32}|[1-5]\d\d", code) else OTHER


def pause_reason_label(reason: str) -> str:
    kind = kind_of(reason)
    return PAUSE_REASONS[kind] if kind is not None else OTHER


# -- API calls: a wrapper around the client session's adapter -----------------------


class MeteredAdapter(BaseAdapter):
    """Sends through `inner`, timing and counting each call by endpoint and answer (or "error")."""

    def __init__(self, inner: BaseAdapter, endpoint_of: Callable[[requests.PreparedRequest], str]):
        super().__init__()
        self.inner = inner
        self.endpoint_of = endpoint_of

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        endpoint = self.endpoint_of(request)
        began = time.perf_counter()
        try:
            response = self.inner.send(request, stream, timeout, verify, cert, proxies)
        except Exception:
            api_call(endpoint, "error", time.perf_counter() - began)
            raise
        api_call(endpoint, str(response.status_code), time.perf_counter() - began)
        return response

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Anything else is the inner adapter's (its pool's size, for one): the wrapper stays out of sight.
        if name == "inner":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def meter(session: requests.Session, submit_url: str, poll_url: str) -> None:
    """Time and count every call `session` makes: a POST to `submit_url` is a submit, a GET under
    `poll_url` a poll, anything else (key, balance) "other". Compared by path: the host is the same."""
    submit_path, poll_path = urlsplit(submit_url).path, urlsplit(poll_url).path

    def endpoint_of(request: requests.PreparedRequest) -> str:
        path = urlsplit(request.url or "").path
        if request.method == "POST" and path == submit_path:
            return "submit"
        if request.method == "GET" and path.startswith(poll_path):
            return "poll"
        return OTHER

    for prefix, adapter in list(session.adapters.items()):
        session.mount(prefix, MeteredAdapter(adapter, endpoint_of))


# -- read at scrape time ---------------------------------------------------------------


class Snapshot(Collector):
    """What is read when Prometheus scrapes: `pause` (until when, in epoch seconds, and why) and
    `poller_backlog` from this process's memory, `read_backlog` from the database. A failed read of
    the backlog is counted in kling_scrape_errors_total and its series are left out; the rest of the
    scrape goes on."""

    def __init__(
        self,
        pause: Callable[[], tuple[float, str]],
        poller_backlog: Callable[[], int],
        read_backlog: Callable[[], Sequence[Backlog]],
        read_tenants: Callable[[], Sequence[InLine]] | None = None,
    ):
        self.pause = pause
        self.poller_backlog = poller_backlog
        self.read_backlog = read_backlog
        self.read_tenants = read_tenants
        self.errors = 0
        self._lock = threading.Lock()  # scrapes may run at once

    def collect(self) -> Iterator[Metric]:
        yield from self._pause()
        yield self._poller()
        yield self._phases()
        yield from self._backlog()
        yield from self._tenants()

    def _tenants(self) -> Iterator[Metric]:
        if self.read_tenants is None:
            return
        try:
            found = self.read_tenants()
        except Exception:
            with self._lock:
                self.errors += 1
            return
        jobs = GaugeMetricFamily(
            "kling_tenant_jobs",
            "Jobs per tenant waiting in the line (queued) or holding a place at Modellix (in_flight: submitting, "
            "submitted, processing); fleet-wide",
            labels=["tenant", "state"],
        )
        for line in found:
            jobs.add_metric([line.tenant, "queued"], line.queued)
            jobs.add_metric([line.tenant, "in_flight"], line.in_flight)
        yield jobs

    def _phases(self) -> Metric:
        spent = CounterMetricFamily(
            "kling_cpu_seconds",
            "CPU seconds this process's threads spent in each phase of a job (worker.ops.cpu); the rest of "
            "process_cpu_seconds_total is Celery and the broker moving messages, thread hand-offs and timers",
            labels=["phase"],
        )
        for name, seconds in cpu.totals().items():
            spent.add_metric([name], seconds)
        return spent

    def _pause(self) -> Iterator[Metric]:
        until, reason = self.pause()
        left = max(0.0, until - time.time())
        active = pause_reason_label(reason) if left else None
        paused = GaugeMetricFamily(
            "kling_fleet_paused",
            "1 while the fleet's API calls are paused (after a 429, 401 or 402), as this process last read it; "
            "by reason",
            labels=["reason"],
        )
        for reason in (*PAUSE_REASONS.values(), OTHER):
            paused.add_metric([reason], 1.0 if reason == active else 0.0)
        yield paused
        yield GaugeMetricFamily(
            "kling_fleet_pause_seconds_left", "Seconds until the fleet pause ends, as this process last read it", left
        )

    def _poller(self) -> Metric:
        return GaugeMetricFamily(
            "kling_poller_backlog",
            "Polls scheduled on this process's poll timer and not started yet",
            self.poller_backlog(),
        )

    def _backlog(self) -> Iterator[Metric]:
        try:
            found = self.read_backlog()
        except Exception:
            with self._lock:
                self.errors += 1
            found = None
        yield CounterMetricFamily(
            "kling_scrape_errors",
            "Scrapes that could not read the outbox's backlog from the database (its series were left out)",
            self.errors,
        )
        if found is None:
            return
        rows = GaugeMetricFamily(
            "kling_delivery_backlog",
            "Outbox rows not settled yet, by channel (archive, webhook, callback) and state: waiting (an event "
            "waiting for its job's archive) or pending (due, held by a worker, or waiting for a retry); fleet-wide",
            labels=["channel", "state"],
        )
        due = GaugeMetricFamily(
            "kling_delivery_due",
            "Pending outbox rows whose time has come and that no worker holds, by channel; fleet-wide",
            labels=["channel"],
        )
        oldest = GaugeMetricFamily(
            "kling_delivery_oldest_due_seconds",
            "How long the longest-waiting due outbox row has been due, by channel (0: none); fleet-wide",
            labels=["channel"],
        )
        by_key = {(b.channel, b.state): b for b in found}
        now = utcnow()
        for channel in Channel:
            for state in (State.waiting, State.pending):
                found_rows = by_key.get((channel.value, state.value))
                rows.add_metric([channel.value, state.value], found_rows.rows if found_rows else 0)
            pending = by_key.get((channel.value, State.pending.value))
            due.add_metric([channel.value], pending.due if pending else 0)
            since = pending.oldest_due if pending else None
            oldest.add_metric([channel.value], max(0.0, (now - since).total_seconds()) if since else 0.0)
        yield from (rows, due, oldest)
