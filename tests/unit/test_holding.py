"""A held answer (a fact) is plain JSON; the outages themselves are in tests/services/test_holding.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from models import JobStatus
from models.job import utcnow
from models.outbox import Archived, State
from worker import facts
from worker.facts import Claimed, Requeued, SubmitFailed, Submitted, Succeeded, TaskFailed

AT = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
FILES = [{"uri": "file:///r/j/0.png", "sha256": "ab", "bytes": 3, "content_type": "image/png"}]

# Each kind as earlier workers wrote it (the dicts they built), and the fact it stands for: a fact
# handed on in a message crosses the broker between versions of the worker during a rolling deploy.
WIRE = [
    ({}, Claimed("j", AT)),
    (
        {"task_id": "task-1", "answer": {"status": "pending"}, "first_poll": 2.0},
        Submitted("j", AT, task_id="task-1", answer={"status": "pending"}, first_poll=2.0),
    ),
    ({"refund": True}, Requeued("j", AT, refund=True)),
    (
        {"refund": False, "error_code": "429", "error_message": "Too Many Requests"},
        Requeued("j", AT, refund=False, error_code="429", error_message="Too Many Requests"),
    ),
    ({"error_code": "400", "error_message": "Bad Request"}, SubmitFailed("j", AT, "400", "Bad Request")),
    (
        {
            "result_urls": ["https://r/1.png"],
            "answer": {"status": "success"},
            "files": FILES,
            "archived": {"state": "done", "due_at": None, "error": None},
        },
        Succeeded("j", AT, ["https://r/1.png"], {"status": "success"}, FILES, Archived(State.done)),
    ),
    (  # an archive to try again later: when, and why
        {
            "result_urls": ["https://r/1.png"],
            "answer": {"status": "success"},
            "files": FILES,
            "archived": {"state": "pending", "due_at": AT.isoformat(), "error": "download timed out"},
        },
        Succeeded(
            "j",
            AT,
            ["https://r/1.png"],
            {"status": "success"},
            FILES,
            Archived(State.pending, AT, "download timed out"),
        ),
    ),
    (
        {"error_code": "task_failed", "error_message": "Generation failed", "answer": {"status": "failed"}},
        TaskFailed("j", AT, "task_failed", "Generation failed", {"status": "failed"}),
    ),
]


@pytest.mark.parametrize("values, fact", WIRE, ids=[fact.kind + str(i) for i, (_, fact) in enumerate(WIRE)])
def test_a_fact_travels_as_the_json_every_version_reads_and_writes(values, fact):
    wire = {"job_id": "j", "kind": fact.kind, "at": AT.isoformat(), "values": values}
    assert facts.from_json(json.loads(json.dumps(wire))) == fact
    assert fact.to_json() == wire


def test_a_fact_is_plain_json():
    fact = Succeeded("j", utcnow(), result_urls=["https://r/1.png"], answer={"a": 1})
    assert facts.from_json(json.loads(json.dumps(fact.to_json()))) == fact
    # As the first workers wrote a success (no archive yet), and with a value this version does not know.
    older = {"job_id": "j", "kind": "succeeded", "at": AT.isoformat(), "values": {"result_urls": [], "answer": {}}}
    assert facts.from_json(older) == Succeeded("j", AT, [], {}, None, None)
    newer = {"job_id": "j", "kind": "claimed", "at": AT.isoformat(), "values": {"hint": 1}}
    assert facts.from_json(newer) == Claimed("j", AT)
    with pytest.raises(ValueError, match="unknown kind"):
        facts.from_json({"job_id": "j", "kind": "exploded", "at": AT.isoformat(), "values": {}})


def test_the_kinds_that_end_a_job_say_in_which_status():
    ends = {cls.kind: cls.ends for cls in (Claimed, Submitted, Requeued, SubmitFailed, Succeeded, TaskFailed)}
    assert ends == {
        "claimed": None,
        "submitted": None,
        "requeued": None,
        "submit_failed": JobStatus.failed,
        "succeeded": JobStatus.succeeded,
        "task_failed": JobStatus.failed,
    }
