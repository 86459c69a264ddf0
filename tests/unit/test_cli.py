"""The CLI in this process on an SQLite job table: what each command prints and returns."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import click
import pytest

from models.job import Job
from worker import cli, resources
from worker.cli import enqueue, params
from worker.cli.params import when
from worker.dev.sandbox import png


@pytest.fixture
def table(sqlite_url, configure):
    configure(DATABASE_URL=sqlite_url, MODELLIX_MAX_RPS="5", MODELLIX_MAX_IN_FLIGHT="7")
    now = datetime.now(UTC)
    with resources.get().transaction() as s:
        for i, (status, age) in enumerate([("succeeded", 3), ("failed", 2), ("queued", 1), ("submitted", 0)]):
            when = now - timedelta(hours=age)
            s.add(
                Job(
                    id=f"j{i}",
                    status=status,
                    request={"prompt": f"p{i}"},
                    meta={"i": i},
                    error_code="task_failed" if status == "failed" else None,
                    attempts=i,
                    created_at=when,
                    updated_at=when,
                    result_urls=["https://r/0.png"] if status == "succeeded" else None,
                )
            )
    return now


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_is_newest_first_with_filters(table, capsys):
    code, out, _ = run(capsys, "jobs", "list", "--json")
    assert code == 0 and [r["id"] for r in json.loads(out)] == ["j3", "j2", "j1", "j0"]
    assert [r["id"] for r in json.loads(run(capsys, "jobs", "list", "--status", "failed", "--json")[1])] == ["j1"]
    assert [r["id"] for r in json.loads(run(capsys, "jobs", "list", "--since", "90m", "--json")[1])] == ["j3", "j2"]
    until = (table - timedelta(minutes=90)).strftime("%Y-%m-%dT%H:%M:%S")
    assert [r["id"] for r in json.loads(run(capsys, "jobs", "list", "--until", until, "--json")[1])] == ["j1", "j0"]
    assert [r["id"] for r in json.loads(run(capsys, "jobs", "list", "--limit", "1", "--json")[1])] == ["j3"]


def test_list_table_has_aligned_columns(table, capsys):
    lines = run(capsys, "jobs", "list")[1].splitlines()
    assert lines[0].split() == ["id", "status", "modellix_task_id", "attempts", "created_at", "error_code"]
    assert lines[3].split()[:3] == ["j1", "failed", "1"] and lines[3].split()[-1] == "task_failed"
    assert len({line.index("status") for line in lines[:1]} | {lines[1].index("submitted")}) == 1
    assert len(lines) == 5


def test_show_prints_one_job_or_says_there_is_none(table, capsys):
    code, out, _ = run(capsys, "jobs", "show", "j0", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["status"] == "succeeded" and shown["metadata"] == {"i": 0}
    assert datetime.fromisoformat(shown["created_at"]) == table - timedelta(hours=3)
    assert datetime.fromisoformat(shown["updated_at"]) == table - timedelta(hours=3)
    assert shown["submitted_at"] is None and shown["finished_at"] is None
    code, out, _ = run(capsys, "jobs", "show", "j0")
    assert code == 0 and 'result_urls: ["https://r/0.png"]' in out and "last_response" not in out
    code, _, err = run(capsys, "jobs", "show", "nope")
    assert code == 1 and "job nope: not seen by any worker yet" in err


def test_stats_counts_by_status_and_shows_the_budget(table, capsys):
    code, out, _ = run(capsys, "jobs", "stats", "--json")
    stats = json.loads(out)
    assert code == 0 and stats["jobs"] == {"succeeded": 1, "failed": 1, "queued": 1, "submitted": 1}
    assert stats["budget"]["in_flight"] == 1 and stats["budget"]["max_in_flight"] == 7
    assert stats["budget"]["max_rps"] == 5 and stats["budget"]["paused_for"] == 0
    text = run(capsys, "jobs", "stats")[1]
    assert "total  4" in text and "in flight  1 of 7" in text and "max rps  5" in text and "paused" not in text


def test_cancel_only_a_queued_job(table, capsys):
    code, _, err = run(capsys, "jobs", "cancel", "j2")
    assert code == 0 and "cancelled" in err
    shown = json.loads(run(capsys, "jobs", "show", "j2", "--json")[1])
    assert (shown["status"], shown["error_code"]) == ("cancelled", "cancelled") and "operator" in shown["error_message"]
    assert shown["finished_at"]
    code, _, err = run(capsys, "jobs", "cancel", "j3")
    assert code == 1 and "not queued" in err


def test_enqueue_refuses_an_invalid_request_before_sending(table, capsys):
    code, _, err = run(capsys, "enqueue", "see <<<image_2>>>", "-n", "12")
    assert code == 2 and "n: must be 1 to 9" in err and "image_2" in err and err.count("\n") == 1


def test_local_images_become_data_uris_and_urls_pass(tmp_path):
    image = tmp_path / "in.png"
    image.write_bytes(png(2, 2))
    request = enqueue.build_request(
        "x <<<image_1>>>", [str(image), "https://a/b.png"], [9], n=2, resolution="2k", aspect_ratio="1:1"
    )
    first = request["image_list"][0]["image"]
    assert first.startswith("data:image/png;base64,") and base64.b64decode(first.split(",", 1)[1]) == png(2, 2)
    assert request["image_list"][1] == {"image": "https://a/b.png"}
    assert request == {
        **request,
        "prompt": "x <<<image_1>>>",
        "element_list": [{"element_id": 9}],
        "n": 2,
        "resolution": "2k",
        "aspect_ratio": "1:1",
    }
    assert enqueue.build_request("y") == {"prompt": "y"}


@pytest.mark.parametrize("value, ago", [("30s", 30), ("15m", 900), ("2h", 7200), ("1d", 86400)])
def test_ages_are_counted_back_from_now(value, ago):
    assert abs((datetime.now(UTC) - when(value)).total_seconds() - ago) < 5


def test_iso_times_without_a_zone_are_utc():
    assert when("2026-11-24T12:00") == datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def test_iso_times_keep_the_zone_they_name():
    assert when("2026-11-24T12:00+02:00") == datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "kind, value, said",
    [
        (params.WHEN, "soon", "'soon' is not an ISO time or an age such as 30m, 2h, 1d"),
        (params.JSON_OBJECT, "{bad", "not JSON: "),
        (params.JSON_OBJECT, "[1, 2]", "must be a JSON object, such as '{\"order\": 7}'"),
    ],
)
def test_a_value_an_option_refuses_names_the_option(kind, value, said):
    option = click.Option(["--since"])
    ctx = click.Context(click.Command("list", params=[option]))
    with pytest.raises(click.BadParameter) as caught:
        kind.convert(value, option, ctx)
    assert (caught.value.param, caught.value.ctx) == (option, ctx)
    message = caught.value.format_message()
    assert message.startswith(f"Invalid value for '--since': {said}")
    assert message == f"Invalid value for '--since': {caught.value.message}"


def test_list_shows_fifty_by_default_with_since_inclusive_and_until_exclusive(sqlite_url, configure, capsys):
    configure(DATABASE_URL=sqlite_url)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    with resources.get().transaction() as s:
        for i in range(55):
            when = base + timedelta(minutes=i)
            s.add(Job(id=f"m{i:02d}", status="queued", request={}, created_at=when, updated_at=when))
    assert len(json.loads(run(capsys, "jobs", "list", "--json")[1])) == 50
    since, until = "2026-01-01T00:10:00", "2026-01-01T00:12:00"
    found = json.loads(run(capsys, "jobs", "list", "--since", since, "--until", until, "--json")[1])
    assert [r["id"] for r in found] == ["m11", "m10"]


def test_watch_prints_each_job_once_per_status_and_returns_when_all_ended(table, capsys):
    from io import StringIO

    from worker.cli.watch import watch

    out = StringIO()
    rows = watch(["j0", "j1"], 10, out)
    assert {k: r["status"] for k, r in rows.items()} == {"j0": "succeeded", "j1": "failed"}
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].split()[1:] == ["j0", "succeeded"] and lines[1].split()[1:] == ["j1", "failed"]


def test_watch_gives_up_after_its_timeout_on_a_job_nobody_takes(table):
    import time
    from io import StringIO

    from worker.cli.watch import watch

    out = StringIO()
    started = time.monotonic()
    assert watch(["never-seen"], 1.0, out) == {}
    assert 1.0 <= time.monotonic() - started < 5 and out.getvalue().split()[1:] == ["never-seen", "queued"]


@pytest.mark.parametrize(
    "argv, said",
    [
        (["jobs", "list", "--status", "bogus"], "'bogus' is not one of 'queued'"),
        (["jobs", "list", "--since", "garbage"], "not an ISO time or an age"),
        (["enqueue", "x", "--metadata", "{bad"], "not JSON"),
        (["enqueue", "x", "--metadata", "[1, 2]"], "must be a JSON object"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(table, capsys, argv, said):
    code, out, err = run(capsys, *argv)
    assert code == 2 and said in err and err.count("\n") == 1 and out == ""
    assert err.startswith(f"kling-worker {argv[0]}") and "Traceback" not in err


def test_a_missing_image_file_is_one_line_and_exit_2(table, capsys, tmp_path):
    code, out, err = run(capsys, "enqueue", "x <<<image_1>>>", "--image", str(tmp_path / "missing.png"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("kling-worker: --image ") and "No such file" in err


def test_jobs_commands_where_there_is_no_database_say_so_and_create_nothing(configure, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    configure(KLING_HOME=str(tmp_path / "elsewhere"))
    for argv in (["jobs", "list"], ["jobs", "show", "x"], ["jobs", "stats"], ["results", "get", "x"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("kling-worker: no job database at ") and "db upgrade" in err
    assert not (tmp_path / "elsewhere").exists()


def test_an_unmigrated_database_and_a_bad_setting_are_one_line_each(configure, capsys, tmp_path):
    configure(DATABASE_URL=f"sqlite:///{tmp_path / 'empty.sqlite'}")
    (tmp_path / "empty.sqlite").touch()
    code, _, err = run(capsys, "jobs", "list")
    assert code == 2 and "no such table: jobs" in err and "db upgrade" in err and "Traceback" not in err
    configure(KLING_CONCURRENCY="abc")
    code, _, err = run(capsys, "jobs", "list")
    assert code == 2 and err == "kling-worker: KLING_CONCURRENCY='abc' is not a whole number\n"
    configure(KLING_SUBMIT_5XX="maybe")  # two bad variables: one line for each
    code, _, err = run(capsys, "jobs", "list")
    assert code == 2 and sorted(err.splitlines()) == [
        "kling-worker: KLING_CONCURRENCY='abc' is not a whole number",
        "kling-worker: KLING_SUBMIT_5XX must be one of unknown, retry, not 'maybe'",
    ]


# The mistakes a newcomer made (issue 9), as they make them: the command, from a folder with no service in it.
NEWCOMER_MISTAKES = [
    (["enqueue", "x <<<image_1>>>", "--image", "missing.png"], {}, "kling-worker: --image missing.png: No such file"),
    (["enqueue", "x <<<image_1>>>", "--image", "README.md"], {}, "--image README.md: not a .png, .jpg or .jpeg file"),
    (["jobs", "list", "--since", "garbage"], {}, "'garbage' is not an ISO time or an age"),
    (["jobs", "list"], {}, "kling-worker: no job database at "),
    (["jobs", "retry"], {}, "kling-worker: no job database at "),
    (["jobs", "list", "--status", "bogus"], {}, "'bogus' is not one of 'queued'"),
    (["enqueue", "x", "--metadata", "{bad"], {}, "Invalid value for '--metadata': not JSON: "),
    (["jobs", "list"], {"KLING_CONCURRENCY": "abc"}, "KLING_CONCURRENCY"),
    (["enqueue", "x", "--resolution", "4k"], {}, "'4k' is not one of '1k', '2k'"),
    (["enqueue", "see <<<image_2>>>", "-n", "12"], {}, "kling-worker: the request is not valid: "),
]


def test_each_newcomer_mistake_is_one_line_and_exit_2_from_another_folder(tmp_path):
    from tests.support.cli import cli_env, run_cli

    folder = tmp_path / "elsewhere"
    folder.mkdir()
    for argv, settings, said in NEWCOMER_MISTAKES:
        done = run_cli(argv, cli_env(**settings), cwd=folder)
        assert (done.returncode, done.stdout) == (2, ""), (argv, done.stderr)
        assert said in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, argv
    assert list(folder.iterdir()) == []  # no ./.kling, no empty database
