"""The Celery wiring: the app and its delivery settings (`app`), the tasks that only orchestrate
(`tasks`), each worker process's submit threads (`dispatcher`), every signal hook (`signals`), and the
embedded broker's kombu transport (`embedded_broker`).

`celery -A worker` finds the app through `worker.__init__`.
"""

__all__ = ["app", "dispatcher", "embedded_broker", "signals", "tasks"]
