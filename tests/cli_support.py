"""Helpers for running `kling-worker` as a user does (a subprocess) and for reading what it sent to RabbitMQ."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kombu import Connection

from worker.dev.processes import ROOT

CLI = [sys.executable, "-m", "worker.cli"]


def cli_env(**settings: Any) -> dict[str, str]:
    """This environment without the service's settings, plus `settings`; PYTHONPATH makes this checkout's
    code the one that runs from any folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_", "CELERY_", "DATABASE_", "MODELLIX_"))}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({k: str(v) for k, v in settings.items()})
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 60, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=stdin)


def drain(broker_url: str, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """Take every message off a RabbitMQ queue: (task name, keyword arguments) each, in order."""
    found = []
    with Connection(broker_url) as conn:
        channel = conn.channel()
        while True:
            raw = channel.basic_get(queue, no_ack=True)
            if raw is None:
                break
            message = channel.message_to_python(raw)
            _, kwargs, _ = message.decode()
            found.append((message.headers["task"], kwargs))
    return found


def delete_queue(broker_url: str, queue: str) -> None:
    with Connection(broker_url) as conn:
        conn.channel().queue_delete(queue)
