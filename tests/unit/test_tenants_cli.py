"""`kling-worker tenants …`, `jobs stats --by tenant`, a queued job's place in line and `enqueue --tenant
--priority`, in this process on an SQLite job table."""

from __future__ import annotations

import json

import pytest

from models import JobStatus, lifecycle, tenants
from models.job import utcnow
from tests.unit.test_cli import run
from worker import resources
from worker.fleet import share


@pytest.fixture
def lines(sqlite_url, configure):
    """Two tenants' jobs: web's three queued (priorities 5, 9, 5) and one submitted; batch's one queued, one failed."""
    configure(DATABASE_URL=sqlite_url)
    now = utcnow().timestamp()
    jobs = [("w1", "web", 5, 30), ("w2", "web", 9, 20), ("w3", "web", 5, 10), ("b1", "batch", 5, 5)]
    with resources.get().transaction() as s:
        for job_id, tenant, priority, ago in jobs:
            line = share.line_of(now - ago, priority, 60.0)
            lifecycle.create(
                s,
                job_id,
                JobStatus.queued,
                {"prompt": "x"},
                None,
                utcnow(),
                tenant=tenant,
                priority=priority,
                line=line,
            )
        lifecycle.create(s, "w0", JobStatus.queued, {"prompt": "x"}, None, utcnow(), tenant="web")
        lifecycle.take(s, "w0", utcnow())
        lifecycle.mark_submitted(s, "w0", utcnow(), task_id="t0", answer={}, next_poll_at=utcnow())
        lifecycle.create(s, "b0", JobStatus.queued, {"prompt": "x"}, None, utcnow(), tenant="batch")
        lifecycle.cancel(s, "b0", utcnow())


def test_set_then_list_policies_with_what_each_tenant_has_waiting(lines, capsys):
    assert run(capsys, "tenants", "set", "web", "--weight", "3", "--max-in-flight", "4") == (
        0,
        "",
        "tenant web: policy set\n",
    )
    assert run(capsys, "tenants", "set", "idle", "--max-rps", "2.5")[0] == 0
    code, out, _ = run(capsys, "tenants", "list", "--json")
    assert code == 0 and json.loads(out) == [
        {"tenant": "batch", "weight": 1.0, "max_in_flight": None, "max_rps": None, "queued": 1, "in_flight": 0},
        {"tenant": "idle", "weight": 1.0, "max_in_flight": None, "max_rps": 2.5, "queued": 0, "in_flight": 0},
        {"tenant": "web", "weight": 3.0, "max_in_flight": 4, "max_rps": None, "queued": 3, "in_flight": 1},
    ]
    table = run(capsys, "tenants", "list")[1].splitlines()
    assert table[0].split() == ["tenant", "weight", "max_in_flight", "max_rps", "queued", "in_flight"]
    assert table[3].split() == ["web", "3.0", "4", "-", "3", "1"]


def test_set_changes_only_what_it_is_given_and_clears_a_cap(lines, capsys):
    run(capsys, "tenants", "set", "web", "--weight", "2", "--max-in-flight", "4", "--max-rps", "1")
    run(capsys, "tenants", "set", "web", "--clear", "max-rps")
    with resources.get().transaction() as s:
        row = next(r for r in tenants.policies(s) if r.name == "web")
    assert (row.weight, row.max_in_flight, row.max_rps) == (2.0, 4, None)


@pytest.mark.parametrize(
    "argv, error",
    [
        (["web shop"], "'web shop': a tenant is 1-64 characters of [A-Za-z0-9._-]"),
        (["web", "--max-rps", "1", "--clear", "max-rps"], "--max-rps: given and cleared at once"),
    ],
)
def test_a_bad_tenant_command_is_one_line_and_exit_2(lines, capsys, argv, error):
    code, out, err = run(capsys, "tenants", "set", *argv)
    assert (code, out, err) == (2, "", f"kling-worker: {error}\n")


@pytest.mark.parametrize(
    "argv", [["web", "--weight", "0"], ["web", "--max-in-flight", "0"], ["web", "--max-rps", "-1"]]
)
def test_weights_and_caps_must_be_positive(lines, capsys, argv):
    code, _, err = run(capsys, "tenants", "set", *argv)
    assert code == 2 and "kling-worker tenants set: Invalid value for" in err


def test_a_queued_job_shows_its_place_in_its_tenants_line(lines, capsys):
    places = {
        job_id: json.loads(run(capsys, "jobs", "show", job_id, "--json")[1]).get("place_in_line")
        for job_id in ("w1", "w2", "w3", "b1", "w0")
    }
    assert places == {"w2": 1, "w1": 2, "w3": 3, "b1": 1, "w0": None}  # w2's priority puts it first
    shown = json.loads(run(capsys, "jobs", "show", "w2", "--json")[1])
    assert (shown["tenant"], shown["priority"]) == ("web", 9)
    assert "place_in_line: 1" in run(capsys, "jobs", "show", "w2")[1]


def test_stats_by_tenant(lines, capsys):
    code, out, _ = run(capsys, "jobs", "stats", "--by", "tenant", "--json")
    assert code == 0 and json.loads(out) == {
        "batch": {"queued": 1, "cancelled": 1},
        "web": {"queued": 3, "submitted": 1},
    }
    table = run(capsys, "jobs", "stats", "--by", "tenant")[1].splitlines()
    assert table[0].split() == ["tenant", *[s.value for s in JobStatus], "total"]
    assert table[2].split() == ["web", "3", "0", "1", "0", "0", "0", "0", "0", "4"]


def test_enqueue_checks_tenant_and_priority_before_sending(lines, capsys):
    code, _, err = run(capsys, "enqueue", "a cat", "--tenant", "web shop")
    assert code == 2 and "tenant: must be 1-64 characters of [A-Za-z0-9._-]" in err
    code, _, err = run(capsys, "enqueue", "a cat", "--priority", "12")
    assert code == 2 and "priority: must be a whole number from 0 (last) to 9 (first)" in err
