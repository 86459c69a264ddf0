"""Real processes for integration tests and benchmarks: Celery workers (and beat), and a producer
that knows nothing of kling-worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# The project's root: workers run from there, as `celery -A worker` would in production.
ROOT = Path(__file__).resolve().parents[2]

# The producer is its own process that knows nothing of kling-worker: plain
# Celery and a broker URL, as any other service would use. It prints the time
# of its first send; with "stamp" it also puts each send time in the metadata.
PRODUCER = """
import json, sys, time
from celery import Celery
broker, queue, stamp = sys.argv[1], sys.argv[2], sys.argv[3:] == ["stamp"]
app = Celery(broker=broker)
app.conf.task_serializer = "json"
first = None
for line in sys.stdin:
    kwargs = json.loads(line)
    now = time.time()
    if stamp:
        kwargs["metadata"] = {"enqueued_at": now}
    app.send_task("kling.generate", kwargs=kwargs, queue=queue)
    if first is None:
        first = now
        print(first, flush=True)
"""


def produce(
    broker_url: str, queue: str, messages: list[dict[str, Any]], env: dict[str, str] | None = None, stamp: bool = False
) -> float:
    """Enqueue from a separate process; returns the time of its first send."""
    lines = "".join(json.dumps(m) + "\n" for m in messages)
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER, broker_url, queue] + (["stamp"] if stamp else []),
        input=lines.encode(),
        check=True,
        timeout=600,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    return float(done.stdout.split()[0])


class Worker:
    """One `celery -A worker worker` process (or beat) with its own environment."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        concurrency: int = 16,
        beat: bool = False,
        pool: str = "threads",
        app: str = "worker",
        loglevel: str = "INFO",
        root: Path = ROOT,
    ):
        """`root`: the source tree whose code runs (a benchmark compares two checkouts)."""
        self.name = f"w{uuid.uuid4().hex[:6]}"
        self.log = log_dir / f"{self.name}.log"
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            f"--loglevel={loglevel}",
            f"--hostname={self.name}@%h",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            "--without-mingle",
            "--without-gossip",
        ]
        if beat:
            cmd += ["-B", f"--schedule={log_dir / (self.name + '-beat')}"]
        self._log_file = open(self.log, "wb")
        self._started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            cwd=root,
            env={**os.environ, **env},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> Worker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b" ready." in self.log.read_bytes() or self._pinged():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.output()}")

    def _pinged(self) -> bool:
        # At WARNING level the "ready." line is not logged; the banner's queue list is the sign.
        return b"[queues]" in self.log.read_bytes() and time.monotonic() - self._started > 3

    def output(self, tail: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def kill(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, no acks."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()
