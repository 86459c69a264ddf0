"""kling-worker: a Celery service for Modellix kling-image-o1 jobs.

`celery -A worker worker` finds the app here. It is loaded lazily so that the
client, schemas and CLI can be imported without building a Celery app.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.app import app

        return app
    raise AttributeError(name)
