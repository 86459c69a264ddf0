"""`kling-worker jobs prune`: old ended jobs go with their deliveries, nothing else; a dry run deletes nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from models import Delivery, JobStatus, retention
from models.job import Job
from worker import cli, resources

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=40)


def add(job_id: str, status: str, when: datetime, deliveries: tuple[tuple[str, str], ...] = ()) -> None:
    with resources.get().transaction() as s:
        s.add(Job(id=job_id, status=status, request={"prompt": job_id}, created_at=when, updated_at=when))
        for channel, state in deliveries:
            s.add(Delivery(job_id=job_id, channel=channel, state=state, created_at=when, updated_at=when))


def left() -> tuple[set[str], dict[str, set[str]]]:
    """The job ids left, and the channels of the deliveries left by job."""
    with resources.get().transaction() as s:
        ids = set(s.scalars(select(Job.id)))
        found: dict[str, set[str]] = {}
        for job_id, channel in s.execute(select(Delivery.job_id, Delivery.channel)):
            found.setdefault(job_id, set()).add(channel)
    return ids, found


def prune(capsys, *args: str) -> tuple[int, dict[str, Any], str]:
    code = cli.main(["jobs", "prune", *args, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else {}, err


@pytest.fixture
def table(any_db_url, configure, tmp_path):
    configure(DATABASE_URL=any_db_url, KLING_ARCHIVE=(tmp_path / "results").as_uri())
    settled = (("archive", "done"), ("webhook", "failed"))
    add("old-ok", "succeeded", OLD, settled)
    add("old-failed", "failed", OLD, (("callback", "done"),))
    add("old-rejected", "rejected", OLD)
    add("old-cancelled", "cancelled", OLD)
    add("old-failed-2", "failed", OLD + timedelta(hours=1))
    add("old-still-delivering", "failed", OLD, (("webhook", "pending"),))
    add("old-waiting-archive", "succeeded", OLD, (("archive", "pending"), ("webhook", "waiting")))
    add("old-but-active", "processing", OLD)
    add("old-but-queued", "queued", OLD)
    add("new-ok", "succeeded", NOW - timedelta(days=2), settled)
    kept = tmp_path / "results" / "old-ok" / "0.png"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"an archived image")
    return kept


def test_a_dry_run_counts_by_status_and_deletes_nothing(table, capsys):
    before = left()
    code, report, err = prune(capsys, "--before", "30d", "--dry-run")
    assert code == 0 and report["dry_run"] is True
    assert report["jobs"] == {"succeeded": 1, "failed": 2, "rejected": 1, "cancelled": 1} and report["total"] == 5
    assert report["deliveries"] == 3 and report["kept_with_deliveries_due"] == 2
    assert report["archived_files_deleted"] is False
    assert left() == before


def test_prune_deletes_only_old_ended_jobs_with_their_deliveries_in_batches(table, capsys):
    code, report, _ = prune(capsys, "--before", "30d", "--batch-size", "2")
    assert code == 0 and report["dry_run"] is False and report["total"] == 5 and report["deliveries"] == 3
    ids, deliveries = left()
    assert ids == {"old-still-delivering", "old-waiting-archive", "old-but-active", "old-but-queued", "new-ok"}
    assert deliveries == {
        "old-still-delivering": {"webhook"},
        "old-waiting-archive": {"archive", "webhook"},
        "new-ok": {"archive", "webhook"},
    }
    assert table.read_bytes() == b"an archived image"  # archived files stay
    code, report, _ = prune(capsys, "--before", "30d")
    assert code == 0 and report["total"] == 0 and report["kept_with_deliveries_due"] == 2


def test_status_and_an_iso_cutoff_narrow_it(table, capsys):
    cutoff = (OLD + timedelta(minutes=30)).isoformat()
    code, report, _ = prune(capsys, "--before", cutoff, "--status", "failed", "--status", "cancelled")
    assert code == 0 and report["jobs"] == {"failed": 1, "cancelled": 1}
    assert {"old-failed-2", "old-ok", "old-rejected"} <= left()[0]


def test_the_plain_report_says_what_went_and_that_archived_files_stay(table, capsys):
    assert cli.main(["jobs", "prune", "--before", "30d", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["status", "would", "delete"]
    assert out.splitlines()[-1].split() == ["total", "5"]
    assert "would delete 3 delivery row(s)" in err and "kept 2 ended job(s)" in err
    assert "archived images are not deleted" in err


@pytest.mark.parametrize(
    "argv, said",
    [
        (["jobs", "prune"], "Missing option '--before'"),
        (["jobs", "prune", "--before", "soon"], "not an ISO time or an age"),
        (["jobs", "prune", "--before", "2999-01-01"], "is in the future"),
        (["jobs", "prune", "--before", "1d", "--status", "queued"], "'queued' is not one of"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(table, capsys, argv, said):
    before = left()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and "Traceback" not in err
    assert left() == before


# -- models.retention directly ---------------------------------------------------------------


@pytest.fixture
def db(any_db_url, configure, tmp_path):
    configure(DATABASE_URL=any_db_url, KLING_ARCHIVE=(tmp_path / "results").as_uri())


def test_pruned_adds_up_every_count():
    total = retention.Pruned(jobs={"failed": 1}, deliveries=2, kept=3)
    total.add(retention.Pruned(jobs={"failed": 2, "succeeded": 1}, deliveries=4, kept=5))
    assert total == retention.Pruned(jobs={"failed": 3, "succeeded": 1}, deliveries=6, kept=8)
    assert total.total == 4


def test_only_ended_statuses_may_be_chosen(db):
    with resources.get().transaction() as s, pytest.raises(ValueError) as caught:
        retention.count(s, NOW, [JobStatus.failed, JobStatus.queued, JobStatus.processing])
    assert str(caught.value) == "only ended jobs can be pruned, not processing, queued"


def test_a_job_last_changed_at_the_cutoff_itself_stays(db):
    add("at-cutoff", "failed", OLD)
    add("before-cutoff", "failed", OLD - timedelta(seconds=1))
    with resources.get().transaction() as s:
        assert retention.count(s, OLD).jobs == {"failed": 1}
        assert retention.prune_batch(s, OLD).jobs == {"failed": 1}
    assert left()[0] == {"at-cutoff"}


def test_kept_counts_only_old_ended_jobs_with_deliveries_due(db):
    add("old-delivering", "failed", OLD, (("webhook", "pending"),))
    add("new-delivering", "failed", NOW - timedelta(days=1), (("webhook", "pending"),))
    add("old-active", "processing", OLD, (("webhook", "waiting"),))
    with resources.get().transaction() as s:
        assert retention.kept(s, NOW - timedelta(days=30)) == 1
        assert retention.count(s, NOW - timedelta(days=30)).kept == 1


def test_a_batch_takes_the_oldest_jobs_up_to_its_limit(db):
    # Added newest first, and the newest with the status that sorts first: neither order is the batch's.
    for job_id, status, age in (("newest", "cancelled", 31), ("oldest", "succeeded", 50), ("middle", "failed", 40)):
        add(job_id, status, NOW - timedelta(days=age), (("callback", "done"),))
    with resources.get().transaction() as s:
        first = retention.prune_batch(s, NOW - timedelta(days=30), limit=2)
    assert (first.jobs, first.deliveries) == ({"succeeded": 1, "failed": 1}, 2)
    assert left() == ({"newest"}, {"newest": {"callback"}})


class DeliveryMadeDueMeanwhile:
    """The caller's session, with a delivery of `job_id` made due again (`jobs redeliver` in another
    transaction) right after prune_batch chose its jobs."""

    def __init__(self, session, job_id: str):
        self.session, self.job_id = session, job_id

    def scalars(self, statement):
        chosen = list(self.session.scalars(statement))
        self.session.execute(update(Delivery).where(Delivery.job_id == self.job_id).values(state="pending"))
        return chosen

    def execute(self, statement, *args):
        return self.session.execute(statement, *args)


def test_a_job_whose_delivery_is_made_due_after_it_was_chosen_stays(db):
    add("redelivered", "succeeded", OLD, (("webhook", "failed"),))
    add("gone", "succeeded", OLD, (("webhook", "failed"),))
    with resources.get().transaction() as s:
        pruned = retention.prune_batch(DeliveryMadeDueMeanwhile(s, "redelivered"), NOW)
    assert (pruned.jobs, pruned.deliveries) == ({"succeeded": 1}, 1)
    assert left() == ({"redelivered"}, {"redelivered": {"webhook"}})
