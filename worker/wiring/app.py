"""The Celery app: JSON only, and delivery settings that lose no job. Building it connects the signal
hooks (worker.wiring.signals), so every process that loads the app has them."""

from __future__ import annotations

import warnings
from pathlib import Path

from celery import Celery
from celery.exceptions import CPendingDeprecationWarning

from worker.config import home
from worker.ops import outages
from worker.resources import settings
from worker.wiring import signals

cfg = settings()
app = Celery("kling_worker", broker=cfg.broker_url, include=["worker.wiring.tasks"])
signals.connect(cfg.log_format)


def _embedded_folders() -> dict[str, Path]:
    """The embedded broker: one folder that producers write and workers read (see worker.wiring.embedded_broker)."""
    folder = home() / "broker"
    return {
        "queue": folder / "queue",
        "processed": folder / "processed",
        "control": folder / "control",
        "unacked": folder / "unacked",
        "bad": folder / "bad",
    }


def prepare_folders() -> None:
    """Create the embedded broker's folders (not at import): producers and workers call this first."""
    if cfg.broker_url.startswith("filesystem"):
        for path in _embedded_folders().values():
            path.mkdir(parents=True, exist_ok=True)


def prepare_process(beat: bool = False) -> None:
    """A worker or beat starts (worker.wiring.signals): its folders, and its broker outages' log lines."""
    home().mkdir(parents=True, exist_ok=True)  # beat's schedule file lives there
    prepare_folders()
    outages.shape_broker_logs(beat=beat)


def quiet_reconnection_warnings() -> None:
    """Once the worker is ready (worker.wiring.signals)."""
    # Celery warns on every reconnection that the default of
    # worker_cancel_long_running_tasks_on_connection_loss will change; ours is set on purpose
    # below. Installed once ready: Celery's logging setup turns these warnings on at start.
    warnings.filterwarnings("ignore", "\nIn Celery 5.1 we introduced", CPendingDeprecationWarning)


transport_options: dict[str, object] = {}
# kombu's filesystem transport loses every message a killed worker held; ours gives them back.
# Chosen by class, not by URL scheme, so the URL stays plain `filesystem://` for any producer.
transport: str | None = None
if cfg.broker_url.startswith("filesystem"):
    folders = _embedded_folders()
    transport = "worker.wiring.embedded_broker:Transport"
    transport_options = {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "processed_folder": str(folders["processed"]),
        "control_folder": str(folders["control"]),
        "unacked_folder": str(folders["unacked"]),
        "bad_folder": str(folders["bad"]),
        "store_processed": False,
        # kombu looks at the folder once a second by default: a job or a handed-over poll
        # would wait up to that long; listing a small folder five times a second costs little.
        "polling_interval": 0.2,
    }

app.conf.update(
    # Only JSON crosses the broker: any serialiser that revives Python objects
    # would run code from anyone who can publish.
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    # The job table is the record; a result backend would be a second, weaker one.
    task_ignore_result=True,
    task_default_queue=cfg.queue,
    task_routes={"kling.*": {"queue": cfg.queue}},
    # Ack after the task ran, and requeue if the worker process dies mid-task:
    # a killed worker's message goes back to the queue instead of vanishing.
    # Re-running is safe because every step is idempotent on the job row.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # Each thread holds at most one unstarted message, so a dying worker strands
    # few and a slow one does not hoard work the others could do.
    worker_prefetch_multiplier=1,
    # The work is waiting on HTTP: threads keep many requests in flight per
    # process at a fraction of prefork's memory.
    worker_pool="threads",
    worker_concurrency=cfg.concurrency,
    broker_connection_retry_on_startup=True,
    # After a broker restart Celery would lower the prefetch count and raise it
    # again as acks arrive; the acks of tasks that ran across the restart fail,
    # and one of two workers stayed at one message for 3 minutes (measured here).
    # One message per thread is already the limit, so there is nothing to lower.
    worker_enable_prefetch_count_reduction=False,
    # A task running when the connection drops finishes; its ack is lost, and its
    # message comes back to a worker whose claim finds the job already handled.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    broker_transport=transport,
    broker_transport_options=transport_options,
    worker_hijack_root_logger=False,
    # Task events, for Flower (README: "Flower and what it shows"): a worker publishes three small
    # messages per task it runs (received, started, succeeded); our own sends (beat's sweep, the
    # polls and deliveries it dispatches, retries) add task-sent. Publishing them cost 0.5 to 1 ms
    # of a worker's CPU per job (bench/run.py), for nobody unless a monitor runs, so they start off: Flower
    # turns them on in every worker it sees (`enable_events`, every 5 s), and KLING_TASK_EVENTS
    # turns them on from the start. Heartbeats (the worker group) are always sent.
    # Not on the embedded broker: its folders keep a fanout binding after a monitor has gone, and
    # the events would pile up as files nobody reads (Flower wants RabbitMQ or Redis anyway).
    worker_send_task_events=cfg.task_events and transport is None,
    task_send_sent_event=transport is None,
    # A monitor's event queue (Flower's, declared from these settings) is deleted 60 s after its
    # monitor goes, and an event it has not read within 5 s is dropped: nothing piles up on RabbitMQ.
    event_queue_expires=60.0,
    event_queue_ttl=5.0,
    beat_schedule={
        # A sweep nobody ran in time is worthless: expire it rather than let
        # sweeps pile up in the queue while every worker is down.
        "kling-sweep": {
            "task": "kling.sweep",
            "schedule": cfg.sweep_interval,
            "options": {"expires": max(10.0, 5 * cfg.sweep_interval)},
        },
    },
    beat_schedule_filename=str(Path(home()) / "celerybeat-schedule"),
)
