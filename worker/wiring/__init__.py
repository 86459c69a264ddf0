"""The Celery wiring: the app and its delivery settings (`app`), the tasks that only orchestrate
(`tasks`), every signal hook (`signals`), and the embedded broker's kombu transport (`embedded_broker`).

`celery -A worker` finds the app through `worker.__init__`.
"""

__all__ = ["app", "embedded_broker", "signals", "tasks"]
