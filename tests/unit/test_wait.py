"""`enqueue --wait` says why a job stays queued (no consumer, a fleet pause), live on a terminal, in lines elsewhere."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from io import StringIO

from tests.support.cli import CLI, run_cli
from worker import resources
from worker.cli import watch
from worker.dev.processes import ROOT
from worker.fleet import pause

PAUSE_REASON = "402 from submit: insufficient balance"


def run_on_terminal(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its stdout and stderr; its exit code and all it wrote."""
    main, secondary = os.openpty()
    env = {**env, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "40"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(CLI + args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    data = os.read(main, 65536)
                except OSError:  # the terminal closed: the process ended
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        return proc.wait(10), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()


def test_a_paused_fleet_is_named_with_its_reason_and_time_left(embedded):
    pause.pause_fleet(resources.get(), 120, PAUSE_REASON)
    done = run_cli(["enqueue", "a cat", "--job-id", "paused-1", "--wait", "--timeout", "4"], embedded)
    assert done.returncode == 1 and done.stdout == "paused-1\n"
    lines = done.stderr.splitlines()
    assert lines[0].split()[1:] == ["paused-1", "queued"]
    found = re.fullmatch(r"\d\d:\d\d:\d\d waiting: the fleet is paused: (.+) \((\d+)s left\)", lines[1])
    assert found and found[1] == PAUSE_REASON and 100 < int(found[2]) <= 120
    assert lines[2:] == ["paused-1: not finished after 4s"]  # said once, however long it waits


def test_without_a_pause_or_a_countable_queue_nothing_is_said_before_long(embedded):
    done = run_cli(["enqueue", "a cat", "--job-id", "quiet-1", "--wait", "--timeout", "3"], embedded)
    assert done.returncode == 1 and "waiting:" not in done.stderr


def test_on_a_terminal_the_wait_is_a_live_table_with_the_reason(embedded):
    pause.pause_fleet(resources.get(), 120, PAUSE_REASON)
    code, screen = run_on_terminal(["enqueue", "a cat", "--job-id", "live-1", "--wait", "--timeout", "4"], embedded)
    assert code == 1
    assert "\x1b[2K" in screen and "\x1b[2mqueued" in screen  # redrawn in place, in colour
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "waiting: the fleet is paused: " + PAUSE_REASON in text
    assert re.search(r"live-1 +queued +[1-9]s", text)  # counting
    assert not re.search(r"\d\d:\d\d:\d\d live-1", text)  # not the plain lines


def test_tables_are_drawn_on_a_terminal_and_plain_in_a_pipe(embedded):
    from models.job import Job
    from worker import resources

    with resources.get().transaction() as s:
        s.add(Job(id="shown-1", status="failed", request={"prompt": "p"}, error_code="task_failed"))
    code, screen = run_on_terminal(["jobs", "list"], embedded)
    assert code == 0 and "\x1b[" in screen and "shown-1" in screen and "─" in screen
    piped = run_cli(["jobs", "list"], embedded)
    assert piped.returncode == 0 and "\x1b" not in piped.stdout and "─" not in piped.stdout
    assert piped.stdout.splitlines()[1].split()[:2] == ["shown-1", "failed"]


def test_the_reasons_are_asked_at_most_every_few_seconds(embedded):
    asked = []

    def hints(waited: float, rows: list) -> list[watch.Hint]:
        asked.append(waited)
        return [watch.Hint("why", "because")]

    out = StringIO()
    started = time.monotonic()
    watch.watch(["never-1"], watch.HINT_AFTER + watch.HINT_EVERY + 1.0, out, hints=hints)
    assert time.monotonic() - started >= watch.HINT_AFTER + watch.HINT_EVERY
    assert len(asked) == 2 and asked[0] >= watch.HINT_AFTER and asked[1] - asked[0] >= watch.HINT_EVERY - 0.5
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["never-1                queued", "waiting: because"]


def test_a_job_a_worker_is_retrying_is_named_with_its_last_error_not_as_unseen(embedded):
    from models.job import Job
    from worker import resources

    with resources.get().transaction() as s:  # a worker took it, and its submit met a refused connection
        s.add(
            Job(
                id="retried-1",
                status="queued",
                request={"prompt": "p"},
                attempts=2,
                error_code="network",
                error_message="connection error: refused",
            )
        )
    found = watch.why_queued(
        watch.UNSEEN_AFTER + 1,
        [{"id": "retried-1", "attempts": 2, "error_code": "network", "error_message": "connection error: refused"}],
    )
    assert [h.about for h in found] == ["retry retried-1 network"]
    assert "retrying its submit (2 attempt(s)); last error network: connection error: refused" in found[0].text
    done = run_cli(["enqueue", "a cat", "--job-id", "retried-1", "--wait", "--timeout", "4"], embedded)
    assert "a worker is retrying its submit" in done.stderr and "no worker has taken it" not in done.stderr
    # Nobody has taken a job with no row: on a broker that cannot count consumers, that is worth saying.
    assert [h.about for h in watch.why_queued(watch.UNSEEN_AFTER + 1, [])] == ["unseen"]
