"""A Celery service of its own that receives kling-worker's callbacks, as a caller would run it.

Started by tests as `celery -A tests.support.callback_app worker` with CALLBACK_BROKER (the broker),
CALLBACK_QUEUE (its queue) and CALLBACK_LOG (a file: one JSON event per line).
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

app = Celery("callback_receiver", broker=os.environ["CALLBACK_BROKER"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=os.environ["CALLBACK_QUEUE"],
    worker_hijack_root_logger=False,
)


@app.task(name="images.ready")
def images_ready(event: dict[str, Any]) -> None:
    with open(os.environ["CALLBACK_LOG"], "a", encoding="utf-8") as out:
        out.write(json.dumps(event) + "\n")
