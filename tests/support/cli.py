"""Helpers for running `kling-worker` as a user does (a subprocess) and for reading what it sent to RabbitMQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kombu import Connection

from worker.cli import main
from worker.dev.processes import ROOT

CLI = [sys.executable, "-m", "worker.cli"]


def cli_env(**settings: Any) -> dict[str, str]:
    """This environment without the service's settings, plus `settings`; PYTHONPATH makes this checkout's
    code the one that runs from any folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLING_", "CELERY_", "DATABASE_", "MODELLIX_"))}
    # Under `make mutation` a subprocess started in another folder cannot find mutmut's configuration
    # (it is read from the current folder) and would crash in mutmut's own code: it runs the code unmutated,
    # and the CLI's mutants are judged by the tests that call it in-process.
    env.pop("MUTANT_UNDER_TEST", None)
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


def embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment for the embedded default (no broker or database set), at home in `tmp_path`."""
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "DATABASE_URL")}
    env.update(KLING_HOME=str(tmp_path / "home"), **extra)
    return env


def run_checked(
    args: list[str], env: dict[str, str], check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`kling-worker ARGS` from the checkout; unless `check` is false, an exit other than 0 fails naming its output."""
    done = subprocess.run(CLI + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def run_doctor(capsys, *args: str) -> tuple[int, str, dict[str, tuple[bool, str]]]:
    """Exit code, the printed text, and {name: (ok, detail)} from a second, --json run."""
    code = main(["doctor", *args])
    text = capsys.readouterr().out
    assert main(["doctor", "--json", *args]) == code
    found = json.loads(capsys.readouterr().out)
    assert all(set(item) == {"name", "ok", "detail"} for item in found)
    return code, text, {item["name"]: (item["ok"], item["detail"]) for item in found}


# Three messages `enqueue --batch` accepts: with and without a job id, an image, a callback.
GOOD_BATCH = [
    {"request": {"prompt": "a cat", "n": 2}, "job_id": "batch-1", "metadata": {"row": 1}},
    {"request": {"prompt": "a dog like <<<image_1>>>", "image_list": [{"image": "https://img.example/d.png"}]}},
    {"request": {"prompt": "a fox"}, "job_id": "batch-3", "callback": {"task": "orders.ready", "queue": "orders"}},
]


def write_batch(path: Path, lines: list[object]) -> Path:
    """A batch file: each line as given if text, else as JSON."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path
