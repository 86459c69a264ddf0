"""How a worker's and beat's log lines look: Celery's text (the default) or, with KLING_LOG_FORMAT=json,
one JSON object per line; which job a line is about; and the routine lines kept at DEBUG.

Every record gets an `event` (a stable snake_case name for the kind of line: the project's own
calls pass `extra={"event": ...}`; Celery's task lines are named from their templates, any other
line by its logger) and, while a job is being handled, its `job_id`, `tenant` and `modellix_task_id`, bound
once where the job is taken up (`bound`) instead of passed to every call. Both formats carry them
on the record; the JSON one prints them.

Installed from Celery's own logging signals (`installer`'s hooks, connected by worker.wiring.signals):
Celery keeps building its handlers (the `--logfile` and `--loglevel` options, worker_hijack_root_logger),
and only the handlers it made get this module's formatter and filters; handlers someone configured
before Celery are left alone.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from celery._state import get_current_task
from celery.app import trace
from celery.utils.log import ColorFormatter
from pythonjsonlogger.json import JsonFormatter

log = logging.getLogger("kling_worker.logs")

# The tasks the beat sends every KLING_SWEEP_INTERVAL: their received/succeeded lines, and beat's
# line for sending them, are DEBUG (three INFO lines a second otherwise bury everything else).
ROUTINE_TASKS = frozenset({"kling.sweep"})
BEAT_SENDING = "Scheduler: Sending due task %s (%s)"

# What a JSON line holds, in this order; a field without a value is left out.
FIELDS = (
    "time",
    "level",
    "logger",
    "process",
    "event",
    "message",
    "job_id",
    "tenant",
    "modellix_task_id",
    "task_id",
    "task_name",
    "exc_info",
    "stack_info",
)
# Names for Celery's own lines, by their message template; any other line is named by its logger.
CELERY_EVENTS = {
    trace.LOG_RECEIVED: "task_received",
    trace.LOG_SUCCESS: "task_succeeded",
    trace.LOG_FAILURE: "task_failed",  # the same template as trace.LOG_INTERNAL_ERROR
    trace.LOG_RETRY: "task_retried",
    trace.LOG_IGNORED: "task_ignored",
    trace.LOG_REJECTED: "task_rejected",
    BEAT_SENDING: "beat_sending",
    "%s ready.": "worker_ready",
}

_bound: ContextVar[Mapping[str, str]] = ContextVar("kling_log_bound", default=MappingProxyType({}))


@contextmanager
def bound(**values: str | None) -> Iterator[None]:
    """Log records made inside this block (in this thread) carry `values` (None values are left out)."""
    token = _bound.set(_with(values))
    try:
        yield
    finally:
        _bound.reset(token)


def bind(**values: str | None) -> None:
    """Add to the values of the enclosing `bound` block (a job's Modellix task id, once known);
    the block's end drops them with the rest. Only call it inside such a block."""
    _bound.set(_with(values))


def _with(values: Mapping[str, str | None]) -> Mapping[str, str]:
    return MappingProxyType({**_bound.get(), **{k: v for k, v in values.items() if v is not None}})


class JobContext(logging.Filter):
    """Copies the bound values, an event name and the Celery task onto each record a handler gets;
    what a call passed in `extra` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = record.__dict__
        for key, value in _bound.get().items():
            found.setdefault(key, value)
        if "event" not in found:
            named = CELERY_EVENTS.get(record.msg) if isinstance(record.msg, str) else None
            found["event"] = named or record.name
        data = found.get("data")
        if isinstance(data, Mapping) and "id" in data and "name" in data:
            # Celery's task lines (received, succeeded …) say which task in their `data`.
            found.setdefault("task_id", data["id"])
            found.setdefault("task_name", data["name"])
        else:
            task = get_current_task()
            if task is not None and task.request.id is not None:
                found.setdefault("task_id", task.request.id)
                found.setdefault("task_name", task.name)
        return True


class RoutineLines(logging.Filter):
    """Celery's lines for the per-second sweep (beat sending it, a worker receiving it, its success)
    become DEBUG, and are dropped unless the level in force (`--loglevel`) shows DEBUG."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and routine(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.level <= logging.DEBUG
        return True


def routine(record: logging.LogRecord) -> bool:
    """Whether a record is one of Celery's lines about a ROUTINE_TASKS task."""
    args = record.args
    if record.msg == BEAT_SENDING:
        return isinstance(args, tuple) and len(args) == 2 and args[1] in ROUTINE_TASKS
    if record.msg in (trace.LOG_RECEIVED, trace.LOG_SUCCESS):
        return isinstance(args, Mapping) and args.get("name") in ROUTINE_TASKS
    return False


class JsonLines(JsonFormatter):
    """One JSON object per record, with FIELDS only: nothing else a record carries (Celery puts a
    task's arguments in `data`) reaches the line."""

    def __init__(self) -> None:
        super().__init__(
            fmt=["levelname", "name", "processName", *FIELDS[4:10]],
            rename_fields={"levelname": "level", "name": "logger", "processName": "process"},
            timestamp="time",
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {key: log_data[key] for key in FIELDS if log_data.get(key) is not None}


class _Installer:
    """This module's hooks into Celery's logging setup, in a worker (with or without -B) and in beat:
    `after_setup` for either format; `before_setup`, `banner`, `quiet_shutdown_notice` and
    `shutting_down` only for JSON lines."""

    def __init__(self) -> None:
        self.log_format = "text"  # KLING_LOG_FORMAT, set before the hooks are connected
        self._early: logging.Handler | None = None

    def handler_setup(self, handler: logging.Handler, level: int) -> None:
        if self.log_format == "json":
            handler.setFormatter(JsonLines())
        for old in [f for f in handler.filters if isinstance(f, (RoutineLines, JobContext))]:
            handler.removeFilter(old)
        handler.addFilter(RoutineLines(level))  # first: a line it drops needs no context
        handler.addFilter(JobContext())

    def after_setup(self, logger: logging.Logger, loglevel: int | None = None, **_: Any) -> None:
        """Celery has set up `logger` (the root logger, or its task logger): shape the handlers it made."""
        for handler in logger.handlers:
            if isinstance(handler.formatter, ColorFormatter):  # Celery's, TaskFormatter included
                self.handler_setup(handler, loglevel or logging.WARNING)

    def before_setup(self, instance: Any = None, **_: Any) -> None:
        """A JSON worker is starting (before Celery's logging setup). Its banner would be plain text on
        stdout: it is logged as one record instead (`banner`). A warning issued before the setup (Celery
        warns a worker running as root) would be plain text on stderr: it is a JSON line too."""
        if instance is not None:
            instance.quiet = True
        early = logging.StreamHandler(sys.__stderr__)
        early.setFormatter(JsonLines())
        early.addFilter(JobContext())
        logging.getLogger("py.warnings").addHandler(early)
        logging.captureWarnings(True)
        self._early = early

    def banner(self, instance: Any = None, **_: Any) -> None:
        """Celery's logging is set up: the early handler goes, and the banner is one record."""
        if self._early is not None:
            logging.getLogger("py.warnings").removeHandler(self._early)
            self._early = None
        if instance is not None:
            text = instance.startup_info(artlines=False) + (instance.extra_info() or "")
            log.info("%s", text.strip("\n"), extra={"event": "worker_starting"})

    def quiet_shutdown_notice(self, sender: Any = None, **_: Any) -> None:
        """Celery's SIGTERM handler writes "worker: Warm shutdown (MainProcess)" straight to stdout, past
        logging. Installed again without that line (Celery's own function, with its verbose switch off);
        `shutting_down` logs it as a record."""
        from celery.apps.worker import install_worker_term_handler

        controller = getattr(sender, "controller", None)
        if controller is not None:
            install_worker_term_handler(controller, verbose=False)

    def shutting_down(self, how: str = "", **_: Any) -> None:
        log.info("worker: %s shutdown", how, extra={"event": "worker_shutting_down"})


installer = _Installer()
