"""kling-worker: a Celery service for Modellix kling-image-o1 jobs.

`celery -A worker worker` finds the app here. It is loaded lazily so that the
client, schemas and CLI can be imported without building a Celery app.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.config import ConfigError

        try:
            from worker.app import app
        except ConfigError as exc:
            # `celery -A worker …` would print the traceback of the import; one line names the setting.
            raise SystemExit(f"kling-worker: {exc}") from None
        return app
    raise AttributeError(name)
