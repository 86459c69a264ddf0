"""The bare-Celery ceiling: a no-op task on the same broker, pool and delivery settings."""

import os

from celery import Celery

app = Celery("noop", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_pool="threads",
    task_default_queue=os.environ["KLING_QUEUE"],
    worker_hijack_root_logger=False,
)


@app.task(name="kling.generate")
def noop(**kwargs):
    return None
