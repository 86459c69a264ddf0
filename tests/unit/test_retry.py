"""`kling-worker jobs retry`: which failed jobs go again, as new jobs linked to the originals; which need --force."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from models.job import Job
from tests.support.jobs import handle, job
from worker import cli, resources
from worker.cli import jobs
from worker.cli.enqueue import PartlySent
from worker.cli.retry_plan import retry_id
from worker.schemas import is_valid_job_id

NOW = datetime.now(UTC)


def add(job_id: str, status: str = "failed", **values: Any) -> None:
    values.setdefault("request", {"prompt": f"picture {job_id}"})
    values.setdefault("created_at", NOW - timedelta(minutes=5))
    values.setdefault("updated_at", values["created_at"])
    with resources.get().transaction() as s:
        s.add(Job(id=job_id, status=status, **values))


def retry(capsys, *args: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    """Exit code, the JSON report by original job id, and what was said on stderr."""
    code = cli.main(["jobs", "retry", *args, "--json"])
    out, err = capsys.readouterr()
    return code, {row["job_id"]: row for row in json.loads(out)}, err


@pytest.fixture
def table(sqlite_url, configure):
    configure(DATABASE_URL=sqlite_url)
    add("rate-limited", error_code="429", error_message="too many requests", meta={"order": 1})
    add("unknown", error_code="submit_unknown")
    add("interrupted", error_code="submit_interrupted")
    add("server", error_code="503")
    add("timed-out", error_code="timeout", modellix_task_id="task-t")
    add("task-failed", error_code="task_failed", modellix_task_id="task-f")
    add("task-gone", error_code="404", modellix_task_id="task-g")
    inline = {"prompt": "x", "image_list": [{"image": "data:image/png;sha256=ab12;bytes=9"}]}
    add("inline", error_code="400", request=inline)
    add("invalid", "rejected", error_code="validation", request={"prompt": ""})
    add("done", "succeeded", modellix_task_id="task-d")
    add("running", "processing", modellix_task_id="task-r")
    add("cancelled-unseen", "cancelled", error_code="cancelled", request={})
    add("cancelled-queued", "cancelled", error_code="cancelled")
    add("old", error_code="429", created_at=NOW - timedelta(days=3))


def test_a_dry_run_says_what_each_failed_job_would_do_and_sends_nothing(table, capsys):
    code, report, err = retry(capsys, "--dry-run", "--since", "1h")
    assert code == 0 and "dry run: 3 would be retried, 5 skipped; nothing sent" in err
    would = {job_id: row["new_job_id"] for job_id, row in report.items() if row["action"] == "would retry"}
    assert would == {
        "rate-limited": "rate-limited:retry1",
        "task-failed": "task-failed:retry1",  # Modellix ended the task: nothing left to bill
        "task-gone": "task-gone:retry1",
    }
    skipped = {job_id: row["reason"] for job_id, row in report.items() if row["action"] == "skipped"}
    assert set(skipped) == {"unknown", "interrupted", "server", "timed-out", "inline"}
    assert skipped["unknown"].startswith("submit_unknown: its submit may have created a Modellix task")
    assert skipped["interrupted"].startswith("submit_interrupted: its submit may have created")
    assert "503" in skipped["server"] and "task may exist" in skipped["server"]
    assert skipped["timed-out"].startswith("its Modellix task task-t may still be running")
    for reason in (skipped[k] for k in ("unknown", "interrupted", "server", "timed-out")):
        assert reason.endswith("(--force to retry anyway)")
    assert skipped["inline"] == "its inline images were stored as digests only: enqueue it again with the images"
    with resources.get().transaction() as s:
        assert s.query(Job).count() == 14  # no job was added


def test_force_sends_the_ambiguous_ones_but_never_an_unsendable_request(table, capsys):
    _, report, _ = retry(capsys, "--dry-run", "--force", "--since", "1h")
    forced = {k: r for k, r in report.items() if r["reason"] and r["reason"].startswith("forced: ")}
    assert set(forced) == {"unknown", "interrupted", "server", "timed-out"}
    assert all(r["action"] == "would retry" for r in forced.values())
    assert report["inline"]["action"] == "skipped"


@pytest.mark.parametrize(
    "job_id, reason",
    [
        ("invalid", "rejected: its request is invalid, so it would be rejected again"),
        ("done", "succeeded: nothing to retry"),
        ("running", "still processing: it has not ended"),
        ("cancelled-unseen", "its request is not known (it was cancelled before any worker saw it)"),
    ],
)
def test_one_job_that_cannot_be_retried_says_why_and_exits_1(table, capsys, job_id, reason):
    code, report, _ = retry(capsys, job_id, "--force")
    assert code == 1 and report[job_id]["action"] == "skipped" and report[job_id]["reason"].startswith(reason)


def test_filters_choose_the_jobs(table, capsys):
    assert set(retry(capsys, "--dry-run", "--error-code", "429")[1]) == {"rate-limited", "old"}
    assert set(retry(capsys, "--dry-run", "--until", "1d")[1]) == {"old"}
    assert set(retry(capsys, "--dry-run", "--status", "cancelled")[1]) == {"cancelled-unseen", "cancelled-queued"}
    assert len(retry(capsys, "--dry-run", "--limit", "2")[1]) == 2
    code, report, _ = retry(capsys, "cancelled-queued", "--dry-run")
    assert code == 0 and report["cancelled-queued"]["new_job_id"] == "cancelled-queued:retry1"


def test_mistakes_are_one_line_and_exit_2(table, capsys):
    for argv, said in [
        (["jobs", "retry", "rate-limited", "--since", "1h"], "give a JOB_ID or filters (--since), not both"),
        (["jobs", "retry", "--status", "succeeded"], "'succeeded' is not one of 'failed', 'cancelled'"),
        (["jobs", "retry", "--limit", "0"], "--limit"),
        (["jobs", "retry", "--since", "yesterday"], "not an ISO time or an age"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1 and "Traceback" not in err
    assert cli.main(["jobs", "retry", "nope"]) == 1
    assert "job nope: no such job" in capsys.readouterr().err


def test_retry_ids_are_valid_distinct_and_fit_in_64_characters():
    assert retry_id("order-7", 1) == "order-7:retry1" and retry_id("order-7", 12) == "order-7:retry12"
    long = "x" * 64
    ids = {retry_id(long, n) for n in range(1, 30)} | {retry_id("x" * 63, 1), retry_id(long[:-1] + "y", 1)}
    assert len(ids) == 31 and all(is_valid_job_id(i) and len(i) <= 64 for i in ids)


# -- for real: RabbitMQ and PostgreSQL, the messages read off the queue and handled by the worker's code --


def test_the_worker_records_the_link_whatever_becomes_of_the_job(service, configure, monkeypatch):
    monkeypatch.delenv("KLING_WEBHOOK_SECRET", raising=False)
    handle(request={"prompt": "a cat"}, job_id="a:retry1", retry_of="a")
    handle(request={"prompt": "a cat", "n": 12}, job_id="b:retry1", retry_of="b")
    handle(request={"prompt": "a cat"}, job_id="c:retry1", retry_of="c", webhook="https://hooks.example.com/k")
    assert (job("a:retry1").status, job("a:retry1").retry_of) == ("submitted", "a")
    assert (job("b:retry1").status, job("b:retry1").retry_of) == ("rejected", "b")
    refused = job("c:retry1")  # no secret to sign its webhook with
    assert (refused.status, refused.retry_of, refused.webhook) == ("rejected", "c", None)
    handle(request={"prompt": "a cat"}, job_id="d", retry_of="not a job id")
    bad = job("d")  # a bad retry_of is a bad message: rejected, the link not kept
    assert (bad.status, bad.retry_of) == ("rejected", None) and "retry_of" in bad.error_message


def test_the_retries_the_broker_took_are_retried_and_the_rest_not_sent(table, capsys, monkeypatch):
    sent: list[list[str]] = []

    def broker_refuses_the_second(messages: list[dict[str, Any]]) -> None:
        sent.append([m["job_id"] for m in messages])
        raise PartlySent(sent[-1][:1], ConnectionError("connection refused"))

    monkeypatch.setattr(jobs, "send", broker_refuses_the_second)
    code, report, err = retry(capsys, "--since", "1h")
    ((first, *rest),) = sent
    actions = {row["new_job_id"]: (row["action"], row["reason"]) for row in report.values() if row["new_job_id"]}
    assert actions.pop(first) == ("retried", None)
    assert actions and set(actions) == set(rest)
    assert set(actions.values()) == {("not sent", "not sent: the broker refused it (connection refused)")}
    assert code == 1 and "1 retried, 5 skipped, 2 not sent" in err


def test_retries_the_broker_took_are_all_retried(table, capsys, monkeypatch):
    monkeypatch.setattr(jobs, "send", lambda messages: None)
    code, report, err = retry(capsys, "--since", "1h")
    actions = {row["job_id"]: row["action"] for row in report.values() if row["new_job_id"]}
    assert actions == {"rate-limited": "retried", "task-failed": "retried", "task-gone": "retried"}
    assert code == 0 and "3 retried, 5 skipped" in err
