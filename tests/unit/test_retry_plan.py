"""worker.cli.retry_plan in this process: the derived retry ids, which jobs are refused and why, the
messages a retry sends, and each job's plan against an SQLite job table (nothing is sent here)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from models.job import Job
from worker import resources
from worker.cli import retry_plan
from worker.cli.retry_plan import Plan, message_for, plan, refusal, retry_id

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def db(sqlite_url, configure) -> None:
    configure(DATABASE_URL=sqlite_url)


def add(job_id: str, status: str = "failed", minute: int = 0, **values: Any) -> None:
    values.setdefault("request", {"prompt": f"picture {job_id}"})
    when = T0 + timedelta(minutes=minute)
    with resources.get().transaction() as s:
        s.add(Job(id=job_id, status=status, created_at=when, updated_at=when, **values))


def plans(*job_ids: str, force: bool = False) -> dict[str, Plan]:
    with resources.get().transaction() as s:
        found = [s.get(Job, job_id) for job_id in job_ids]
        return {p.job_id: p for p in plan(s, found, force)}


# -- ids ------------------------------------------------------------------------------------------------


def test_a_retry_id_is_the_original_with_its_number_while_it_fits_in_64_characters():
    assert retry_id("order-7", 1) == "order-7:retry1"
    assert retry_id("order-7", 99) == "order-7:retry99"
    assert retry_id("x" * 57, 1) == "x" * 57 + ":retry1"  # 64 exactly
    assert retry_id("x" * 57, 10) == "x" * 47 + "-ae14a256:retry10"
    assert retry_id("x" * 58, 1) == "x" * 48 + "-5ef8b2e5:retry1"
    assert retry_id("x" * 58, 12) == "x" * 47 + "-5ef8b2e5:retry12"
    assert all(len(retry_id("y" * 64, n)) == 64 for n in (1, 10, 100))


# -- refusals -------------------------------------------------------------------------------------------


def test_only_a_failed_or_cancelled_job_may_be_retried():
    assert refusal(Job(id="a", status="failed")) is None
    assert refusal(Job(id="a", status="cancelled")) is None
    assert refusal(Job(id="a", status="rejected")) == (
        "rejected: its request is invalid, so it would be rejected again (fix it and enqueue it anew)"
    )
    assert refusal(Job(id="a", status="succeeded")) == "succeeded: nothing to retry"
    for status in ("queued", "submitting", "submitted", "processing"):
        assert refusal(Job(id="a", status=status)) == f"still {status}: it has not ended"


# -- the message ----------------------------------------------------------------------------------------


def test_a_retry_carries_the_request_and_everything_the_original_was_sent_with():
    original = Job(
        id="o-1",
        status="failed",
        request={"prompt": "a cat", "n": 2},
        meta={"order": 7},
        webhook="https://hooks.example.com/k",
        callback={"task": "orders.ready", "queue": "orders"},
    )
    assert message_for(original, "o-1:retry1") == (
        {
            "request": {"prompt": "a cat", "n": 2},
            "job_id": "o-1:retry1",
            "retry_of": "o-1",
            "metadata": {"order": 7},
            "webhook": "https://hooks.example.com/k",
            "callback": {"task": "orders.ready", "queue": "orders"},
        },
        None,
    )
    bare = Job(id="o-2", status="failed", request={"prompt": "a dog"})
    assert message_for(bare, "o-2:retry3") == (
        {"request": {"prompt": "a dog"}, "job_id": "o-2:retry3", "retry_of": "o-2"},
        None,
    )


def test_no_message_for_a_request_that_cannot_be_sent_again():
    digests = {
        "prompt": "x",
        "image_list": [{"image": "https://a/b.png"}, {"image": "data:image/png;sha256=ab;bytes=9"}],
    }
    assert message_for(Job(id="d", request=digests), "d:retry1") == (
        None,
        "its inline images were stored as digests only: enqueue it again with the images",
    )
    assert message_for(Job(id="u", request={}), "u:retry1") == (
        None,
        "its request is not known (it was cancelled before any worker saw it)",
    )
    assert message_for(Job(id="n", request={"prompt": "x", "n": 12}), "n:retry1") == (
        None,
        "its stored request is not valid now: n: must be 1 to 9",
    )
    assert message_for(Job(id="m", request={"prompt": "x"}, meta="nope"), "m:retry1") == (  # type: ignore[arg-type]
        None,
        "its stored request is not valid now: metadata: Not a valid mapping type.",
    )
    assert message_for(Job(id="w", request={"prompt": "x"}, webhook="ftp://x"), "w:retry1") == (
        None,
        "its stored request is not valid now: webhook: Not a valid URL.",
    )


def test_an_inline_image_is_a_digest_only_when_its_header_says_so():
    def digests(*images: Any) -> bool:
        return retry_plan._has_stored_digests({"prompt": "x", "image_list": list(images)})

    assert digests({"image": "data:image/jpeg;sha256=00ff;bytes=3"})
    assert not digests({"image": "data:image/png;base64,c2hhMjU2;sha256=inthedata"})  # after the comma: data
    assert not digests({"image": "data:image/png;base64,AAAA;sha256=x,y"})  # the first comma ends the header
    assert not digests({"image": "https://a/b.png"}, {"image": None}, {}, "data:image/png;sha256=ab")
    assert not digests()
    assert not retry_plan._has_stored_digests({"prompt": "x"})
    assert not retry_plan._has_stored_digests({"prompt": "x", "image_list": None})
    assert not retry_plan._has_stored_digests(None)
    assert not retry_plan._has_stored_digests(["data:image/png;sha256=ab"])


# -- plans ----------------------------------------------------------------------------------------------


def test_a_plan_reports_its_job_and_what_became_of_it():
    one = Plan("j1", "failed", "429", new_id="j1:retry1", reason="forced: x", message={"k": 1})
    assert one.retry and not Plan("j2", "failed", None).retry
    assert one.to_dict("retried") == {
        "job_id": "j1",
        "status": "failed",
        "error_code": "429",
        "action": "retried",
        "new_job_id": "j1:retry1",
        "reason": "forced: x",
    }
    assert "message" not in repr(one) and not one.forced


def test_a_plain_failure_is_retried_as_its_first_retry(db):
    add("rl", error_code="429", meta={"order": 1})
    add("gone", error_code="404", modellix_task_id="task-g")
    found = plans("rl", "gone")
    assert (found["rl"].new_id, found["rl"].reason, found["rl"].forced) == ("rl:retry1", None, False)
    assert found["rl"].message == {
        "request": {"prompt": "picture rl"},
        "job_id": "rl:retry1",
        "retry_of": "rl",
        "metadata": {"order": 1},
    }
    assert (found["gone"].new_id, found["gone"].reason) == ("gone:retry1", None)  # the task ended at Modellix
    assert [(p.status, p.error_code) for p in found.values()] == [("failed", "429"), ("failed", "404")]


def test_a_job_whose_task_may_exist_needs_force_and_says_so(db):
    add("unknown", error_code="submit_unknown")
    add("timed-out", error_code="timeout", modellix_task_id="task-t")
    add("server", error_code="503")
    reasons = {
        "unknown": "submit_unknown: its submit may have created a Modellix task (billed) whose id is unknown",
        "timed-out": "its Modellix task task-t may still be running (and is billed): it failed as timeout",
        "server": "its submits were answered 503: a Modellix task may exist for any of them",
    }
    found = plans(*reasons)
    for job_id, why in reasons.items():
        assert (found[job_id].new_id, found[job_id].reason) == (None, f"{why} (--force to retry anyway)")
        assert found[job_id].message == {} and not found[job_id].forced
    forced = plans(*reasons, force=True)
    for job_id, why in reasons.items():
        assert (forced[job_id].new_id, forced[job_id].reason) == (f"{job_id}:retry1", f"forced: {why}")
        assert forced[job_id].forced and forced[job_id].message["job_id"] == f"{job_id}:retry1"


def test_a_job_retried_already_names_its_retries_and_the_next_free_id_follows_the_run(db):
    add("a", error_code="429")
    add("a:retry1", minute=1, retry_of="a")
    add("manual-7", minute=2, retry_of="a")  # sent by hand, linked
    add("a:retry3", minute=3)  # not linked, and after a gap at retry2: neither taken nor named
    found = plans("a")["a"]
    assert (found.new_id, found.forced) == (None, False)
    assert found.reason == "already retried as a:retry1, manual-7 (--force to retry anyway)"
    forced = plans("a", force=True)["a"]
    assert (forced.new_id, forced.forced) == ("a:retry2", True)
    assert forced.reason == "forced: already retried as a:retry1, manual-7"
    assert forced.message == {"request": {"prompt": "picture a"}, "job_id": "a:retry2", "retry_of": "a"}


def test_a_retry_already_taken_and_a_task_that_may_exist_are_both_named(db):
    add("b", error_code="submit_interrupted")
    add("b:retry1", minute=1)  # not linked, but its id is taken
    found = plans("b")["b"]
    assert found.reason == (
        "already retried as b:retry1; submit_interrupted: its submit may have created a Modellix task (billed) "
        "whose id is unknown (--force to retry anyway)"
    )
    assert plans("b", force=True)["b"].new_id == "b:retry2"


def test_the_next_id_is_looked_for_among_the_first_99_retries(db):
    add("c", error_code="429")
    for n in range(1, 100):
        add(f"c:retry{n}", minute=n)
    assert plans("c", force=True)["c"].new_id == "c:retry100"
    with resources.get().transaction() as s:
        taken = retry_plan._taken_retry_ids(s, "c")
    assert taken == [f"c:retry{n}" for n in range(1, 100)]


def test_refused_jobs_and_unsendable_requests_are_skipped_even_with_force(db):
    add("invalid", "rejected", error_code="validation")
    add("done", "succeeded")
    add("running", "processing", modellix_task_id="task-r")
    add("unseen", "cancelled", error_code="cancelled", request={})
    add("inline", error_code="400", request={"prompt": "x", "image_list": [{"image": "data:image/png;sha256=ab"}]})
    add("queued-then-cancelled", "cancelled", error_code="cancelled")
    found = plans("invalid", "done", "running", "unseen", "inline", "queued-then-cancelled", force=True)
    assert {job_id: (p.new_id, p.reason) for job_id, p in found.items()} == {
        "invalid": (
            None,
            "rejected: its request is invalid, so it would be rejected again (fix it and enqueue it anew)",
        ),
        "done": (None, "succeeded: nothing to retry"),
        "running": (None, "still processing: it has not ended"),
        "unseen": (None, "its request is not known (it was cancelled before any worker saw it)"),
        "inline": (None, "its inline images were stored as digests only: enqueue it again with the images"),
        "queued-then-cancelled": ("queued-then-cancelled:retry1", None),
    }
    assert not any(p.forced for p in found.values())
