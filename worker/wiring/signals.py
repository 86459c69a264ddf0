"""Every Celery signal hook of the service, connected in one place (`connect`).

worker.wiring.app calls `connect` when it builds the app, so workers, beat and any process that loads
the app have the same hooks. Each hook only calls into the module that holds its logic. Celery calls
the receivers of one signal in the order they were connected, which is the order below: the log
format is set up first, the health server stops before the polls are handed over.

The hooks that call into worker.wiring.app and worker.wiring.tasks import them when they run: the app
imports this module as it is built, and a worker loads its tasks (the app's `include`) before any
hook that needs them fires, while a producer never loads them.
"""

from __future__ import annotations

from typing import Any

from celery import Task, signals

from worker import resources
from worker.ops import health, logs, metrics


def connect(log_format: str) -> None:
    """Connect every hook (once per process: connecting a receiver again changes nothing)."""
    logs.installer.log_format = log_format
    hooks = logs.installer
    signals.after_setup_logger.connect(hooks.after_setup, weak=False)
    signals.after_setup_task_logger.connect(hooks.after_setup, weak=False)
    if log_format == "json":
        signals.celeryd_init.connect(hooks.before_setup, weak=False)
        signals.celeryd_after_setup.connect(hooks.banner, weak=False)
        signals.worker_ready.connect(hooks.quiet_shutdown_notice, weak=False)
        signals.worker_shutting_down.connect(hooks.shutting_down, weak=False)

    signals.celeryd_init.connect(_started, weak=False)
    signals.beat_init.connect(_beat_started, weak=False)
    signals.worker_ready.connect(_ready, weak=False)
    signals.worker_ready.connect(_serve_health, weak=False)
    signals.worker_ready.connect(_start_submitting, weak=False)
    signals.task_prerun.connect(_task_started, weak=False)
    signals.task_postrun.connect(_task_ended, weak=False)
    signals.worker_shutting_down.connect(_stopping, weak=False)
    signals.worker_shutdown.connect(_stop_health, weak=False)
    signals.worker_shutdown.connect(_hand_over, weak=False)


def _started(**_: Any) -> None:
    from worker.wiring.app import prepare_process

    prepare_process()


def _beat_started(**_: Any) -> None:
    from worker.wiring.app import prepare_process

    prepare_process(beat=True)


def _ready(**_: Any) -> None:
    from worker.wiring.app import quiet_reconnection_warnings

    quiet_reconnection_warnings()


def _start_submitting(sender: Any, **_: Any) -> None:
    from worker.wiring import dispatcher, tasks

    # As many sender threads as the worker has task threads (`--concurrency` may override KLING_CONCURRENCY).
    controller = getattr(sender, "controller", None)
    threads = getattr(controller, "concurrency", None)
    dispatcher.start(resources.get(), tasks.carry_on, threads if isinstance(threads, int) and threads > 0 else None)


def _serve_health(sender: Any, **_: Any) -> None:
    health.start(resources.get(), sender)  # the consumer: /healthz asks it whether this process consumes


def _task_started(task: Task, **_: Any) -> None:
    metrics.task_started(task.name)


def _task_ended(task: Task, **_: Any) -> None:
    metrics.task_ended(task.name)


def _stopping(**_: Any) -> None:
    # Every wait for the budget is on this event: the taker's wait for its turn ends at once.
    resources.get().stopping.set()


def _stop_health(**_: Any) -> None:
    health.stop()


def _hand_over(**_: Any) -> None:
    from worker.wiring.tasks import hand_over

    hand_over(resources.get())
