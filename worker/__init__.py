"""kling-worker: a Celery service for Modellix kling-image-o1 jobs.

`celery -A worker worker` finds the app here. It is loaded lazily so that the
client, schemas and CLI can be imported without building a Celery app.
"""

import sys
from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.config import ConfigError

        try:
            from worker.wiring.app import app
        except ConfigError as exc:
            # Only `celery -A worker` asks for the app here, and would print the message at the
            # foot of a traceback of its own loading code: the message is all the operator needs.
            print(f"kling-worker: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        return app
    raise AttributeError(name)
