"""The CLI and the embedded default, as a user runs them: real worker processes, no servers."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.support.cli import CLI, embedded_env, run_checked
from worker.dev.processes import ROOT, Worker


@pytest.mark.slow
def test_demo_runs_the_embedded_default_end_to_end(tmp_path):
    env = embedded_env(tmp_path)
    done = run_checked(["demo", "--timeout", "90"], env, timeout=150)
    assert "all jobs reached an end state" in done.stdout
    engine = create_engine(f"sqlite:///{tmp_path / 'home' / 'jobs.sqlite'}")
    with engine.connect() as conn:
        rows = dict(conn.execute(text("select id, status from jobs")).all())
    engine.dispose()
    assert sorted(rows.values()) == ["rejected", "succeeded", "succeeded", "succeeded"]
    assert (tmp_path / "home" / "broker").is_dir()  # the file-backed broker, no server


@pytest.mark.slow
def test_a_job_enqueued_from_the_cli_runs_to_its_end_and_is_queryable(tmp_path, sandbox):
    env = embedded_env(
        tmp_path,
        MODELLIX_BASE_URL=sandbox.url,
        MODELLIX_API_KEY=sandbox.api_key,
        KLING_POLL_FIRST="0.3",
        KLING_POLL_MAX="0.5",
    )
    run_checked(["db", "upgrade"], env)
    image = tmp_path / "in.png"
    from worker.dev.sandbox import png

    image.write_bytes(png(2, 2))
    worker = Worker(env, tmp_path, concurrency=4).wait_ready()
    try:
        done = run_checked(
            [
                "enqueue",
                "A cat like <<<image_1>>>",
                "--image",
                str(image),
                "--image",
                "https://a/b.png",
                "--element",
                "9",
                "-n",
                "2",
                "--aspect-ratio",
                "1:1",
                "--job-id",
                "cli-1",
                "--metadata",
                '{"who": "test"}',
                "--wait",
                "--timeout",
                "60",
            ],
            env,
        )
    finally:
        worker.stop()
    assert done.stdout.startswith("cli-1") and "succeeded" in done.stderr

    shown = json.loads(run_checked(["jobs", "show", "cli-1", "--json"], env).stdout)
    assert shown["status"] == "succeeded" and len(shown["result_urls"]) == 2 and shown["metadata"] == {"who": "test"}
    assert shown["request"]["image_list"][0]["image"].startswith("data:image/png;sha256=")  # no blob stored
    assert shown["request"]["element_list"] == [{"element_id": 9}]

    table = run_checked(["jobs", "list", "--status", "succeeded", "--since", "1h"], env).stdout.splitlines()
    assert table[0].split()[:2] == ["id", "status"] and table[1].split()[:2] == ["cli-1", "succeeded"]
    assert json.loads(run_checked(["jobs", "list", "--status", "failed", "--json"], env).stdout) == []
    stats = json.loads(run_checked(["jobs", "stats", "--json"], env).stdout)
    assert stats["jobs"] == {"succeeded": 1} and stats["budget"]["in_flight"] == 0
    assert "in flight" in run_checked(["jobs", "stats"], env).stdout

    refused = run_checked(["enqueue", "see <<<image_4>>>", "-n", "12"], env, check=False)
    assert refused.returncode == 2 and "n: must be 1 to 9" in refused.stderr and "image_4" in refused.stderr
    assert run_checked(["jobs", "cancel", "cli-1"], env, check=False).returncode == 1  # terminal stays terminal
    assert run_checked(["jobs", "show", "nope"], env, check=False).returncode == 1


def start_embedded_worker(env: dict[str, str], log: Path, concurrency: int) -> subprocess.Popen:
    """`kling-worker worker --sandbox` (the sandbox on a free port) in a session of its own, writing to `log`;
    returned once Celery says it is ready."""
    import time

    with open(log, "wb") as out:
        worker = subprocess.Popen(
            CLI + ["worker", "--sandbox", "--sandbox-port", "0", "--concurrency", str(concurrency)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while b" ready." not in log.read_bytes() and time.monotonic() < deadline:
        assert worker.poll() is None, log.read_text()
        time.sleep(0.2)
    return worker


@pytest.mark.slow
def test_a_newcomer_runs_an_embedded_worker_with_the_sandbox_and_sees_a_job_end(tmp_path):
    import signal

    env = embedded_env(tmp_path, MODELLIX_API_KEY="", KLING_POLL_FIRST="0.3", KLING_POLL_MAX="0.5")
    log = tmp_path / "worker.log"
    worker = start_embedded_worker(env, log, concurrency=4)
    try:
        assert b"sandbox Modellix API at http://127.0.0.1:" in log.read_bytes(), log.read_text()
        done = run_checked(["enqueue", "a cat", "--job-id", "newcomer-1", "--wait", "--timeout", "60"], env, timeout=90)
        assert "status: succeeded" in done.stdout
        # The worker says what another terminal needs for doctor to check the sandbox it runs.
        hint = re.search(
            rb"for doctor in another terminal: (MODELLIX_BASE_URL=\S+) (MODELLIX_API_KEY=\S+)", log.read_bytes()
        )
        assert hint, log.read_text()
        told = dict(part.decode().split("=", 1) for part in hint.groups())
        checked = run_checked(["doctor", "--json"], {**env, **told}, check=False)
        verdicts = {c["name"]: c for c in json.loads(checked.stdout)}
        assert checked.returncode == 0 and all(c["ok"] for c in verdicts.values()), checked.stdout
        assert {"api", "key", "balance", "database"} <= set(verdicts)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)


@pytest.mark.slow
def test_a_kill_of_the_embedded_worker_command_stops_its_celery_worker_too(tmp_path):
    """`kill PID` reaches only the `kling-worker worker` process; the Celery worker it started must stop
    with it rather than live on, taking jobs for a sandbox that is gone."""
    import signal

    log = tmp_path / "worker.log"
    parent = start_embedded_worker(embedded_env(tmp_path), log, concurrency=2)
    try:
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        assert children, "the command runs Celery in a child process"
        parent.send_signal(signal.SIGTERM)  # the process alone, as `kill` does: not its group
        assert parent.wait(60) == 0, log.read_text()
        assert all(not Path(f"/proc/{pid}").exists() for pid in children), log.read_text()
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
