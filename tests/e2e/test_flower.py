"""Flower sees the fleet: a real Flower process against a real worker on RabbitMQ, read through its HTTP API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from celery import Celery

from tests.support.jobs import wait_for, wait_terminal
from worker.dev.jobs import valid, worker_env
from worker.dev.processes import ROOT, Worker, produce

pytestmark = [pytest.mark.services, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flower:
    """`celery -A worker flower` with the workers' environment, its API open (no auth) on a free port."""

    def __init__(self, env: dict[str, str], log: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        self._log_file = open(log, "wb")
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1"],
            cwd=ROOT,
            env={**os.environ, **env, "FLOWER_UNAUTHENTICATED_API": "true"},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def get(self, path: str, **params: Any) -> Any:
        try:
            answer = requests.get(self.url + path, params=params, timeout=5)
        except requests.ConnectionError:
            assert self.proc.poll() is None, self.log.read_text()
            return None  # not listening yet
        answer.raise_for_status()
        return answer.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        self._log_file.close()


def test_flower_shows_the_worker_online_and_the_generate_task(rabbit_url, pg_url, sandbox, tmp_path):
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path)
    flower = Flower(env, tmp_path / "flower.log")
    worker = Worker(env, tmp_path, concurrency=4)
    hostname = f"{worker.name}@{socket.gethostname()}"
    try:
        worker.wait_ready()
        # Online: Flower has the worker's heartbeats (its events), not only an answer to `inspect`.
        online = wait_for(lambda: (flower.get("/api/workers", status="true") or {}).get(hostname), 60, "worker online")
        assert online is True
        # Task events start off (worker/wiring/app.py); Flower asks every worker to send them.
        wait_for(lambda: b"enabled by remote" in worker.log.read_bytes(), 30, "Flower turning task events on", [worker])
        message = valid(uuid.uuid4().hex[:6], 0)
        produce(rabbit_url, env["KLING_QUEUE"], [message])
        found = wait_terminal(pg_url, 1, 60, [worker])

        def generate_tasks() -> list[dict[str, Any]]:
            tasks = flower.get("/api/tasks", taskname="kling.generate") or {}
            return [t for t in tasks.values() if t["state"] == "SUCCESS"]

        tasks = wait_for(generate_tasks, 30, "kling.generate in Flower", [worker])
        workers = flower.get("/api/workers", refresh="true")
    finally:
        worker.stop()
        flower.stop()

    assert found[message["job_id"]].status == "succeeded"
    (task,) = tasks
    assert task["name"] == "kling.generate" and task["worker"] == hostname
    assert task["result"] == "'queued'"  # the task ends once its job is in the line; it was sent and ended later
    assert task["received"] and task["started"] and task["runtime"] is not None
    assert hostname in workers and workers[hostname]["stats"]["pool"]["max-concurrency"] == 4


def task_events_seen(broker: str, hostname: str, run: Callable[[], None], after_run: float = 3.0) -> set[str]:
    """The types of the events `hostname` published while `run()` ran and `after_run` seconds after."""
    app = Celery(broker=broker)
    seen: set[str] = set()
    ready = threading.Event()
    with app.connection_for_read() as conn:

        def note(event: dict[str, Any]) -> None:
            if event.get("hostname") == hostname:
                seen.add(event["type"])

        receiver = app.events.Receiver(conn, handlers={"*": note})

        def capture() -> None:
            ready.set()
            receiver.capture(limit=None, timeout=None, wakeup=False)

        listener = threading.Thread(target=capture, daemon=True)
        listener.start()
        ready.wait(10)
        time.sleep(1)  # the receiver's queue is bound
        run()
        time.sleep(after_run)
        receiver.should_stop = True
        listener.join(10)
    return seen


@pytest.mark.parametrize("setting", [None, "true"])
def test_task_events_start_off_unless_set_and_a_monitor_turns_them_on(rabbit_url, pg_url, sandbox, tmp_path, setting):
    extra = {"KLING_TASK_EVENTS": setting} if setting else {}
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, **extra)
    worker = Worker(env, tmp_path, concurrency=4)
    hostname = f"{worker.name}@{socket.gethostname()}"
    tag = uuid.uuid4().hex[:6]
    try:
        worker.wait_ready()

        def one_job(i: int) -> Callable[[], None]:
            def run() -> None:
                produce(rabbit_url, env["KLING_QUEUE"], [valid(tag, i)])
                wait_terminal(pg_url, i + 1, 60, [worker])

            return run

        before = task_events_seen(rabbit_url, hostname, one_job(0))
        assert "worker-heartbeat" in before  # the worker group is always on
        if setting:
            assert {"task-received", "task-started", "task-succeeded"} <= before
            return
        assert not {e for e in before if e.startswith("task-")}, before
        Celery(broker=rabbit_url).control.enable_events()  # what Flower sends every 5 s
        after = task_events_seen(rabbit_url, hostname, one_job(1))
        assert {"task-received", "task-started", "task-succeeded"} <= after
    finally:
        worker.stop()
