"""The learned poll schedule in real worker processes."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.support.jobs import wait_terminal
from worker.config import Settings
from worker.dev.jobs import rows, worker_env
from worker.dev.processes import Worker, produce
from worker.polling import learning, schedule


@pytest.mark.services
def test_after_a_warm_up_jobs_of_a_shape_need_fewer_polls_than_the_configured_schedule(
    rabbit_url, pg_url, sandbox, tmp_path
):
    sandbox.task_seconds = 6.0
    # The default schedule (2 s, x1.25): a 6 s task is seen finished by its 3rd poll, at 7.6 s.
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, KLING_POLL_FIRST="2", KLING_POLL_MAX="30")
    fixed = Settings(poll_first=2, poll_max=30)
    fixed_polls = next(k for k in range(1, 20) if sum(schedule.gap(i, fixed) for i in range(k)) >= 6.0)
    assert fixed_polls == 3
    worker = Worker(env, tmp_path)
    tag = uuid.uuid4().hex[:6]
    request = {"prompt": "p", "n": 2, "image_list": [{"image": "https://img.example/a.png"}]}
    try:
        worker.wait_ready()
        warm_up = [{"request": request, "job_id": f"{tag}-warm-{i}"} for i in range(3)]
        produce(rabbit_url, env["KLING_QUEUE"], warm_up)
        wait_terminal(pg_url, 3, 60, [worker])
        time.sleep(learning.SYNC_EVERY)  # the worker's copy may be read again
        later = []
        for i in range(8):  # one at a time: each sees what the ones before it taught
            later.append({"request": request, "job_id": f"{tag}-later-{i}"})
            produce(rabbit_url, env["KLING_QUEUE"], later[-1:])
            time.sleep(1.5)
        found = wait_terminal(pg_url, 11, 60, [worker])
    finally:
        worker.stop()
    assert all(j.status == "succeeded" for j in found.values())
    assert [found[m["job_id"]].polls for m in warm_up] == [fixed_polls] * 3
    polls = [found[m["job_id"]].polls for m in later]
    assert sum(polls) / len(polls) <= 2.0 < fixed_polls, polls
    assert rows(pg_url)  # the database outlived the worker
