"""Flower sees the fleet: a real Flower process against a real worker on RabbitMQ, read through its HTTP API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import valid, wait_for, wait_terminal, worker_env
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
    assert task["result"] == "'submitted'"  # the task ends at submission; the job ended later, in the poller
    assert task["received"] and task["started"] and task["runtime"] is not None
    assert hostname in workers and workers[hostname]["stats"]["pool"]["max-concurrency"] == 4
