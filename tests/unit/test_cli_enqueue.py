"""`kling-worker enqueue` in this process: what it sends (Celery's send_task recorded, no broker), what it
prints for one job and for a batch, how --wait ends, and what a broker that refuses a message leaves."""

from __future__ import annotations

import base64
import io
import json
import re
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from models.job import Job
from tests.support.cli import GOOD_BATCH, write_batch
from worker import cli, resources
from worker.cli import enqueue, watch
from worker.cli.params import UsageError
from worker.dev.sandbox import png
from worker.fleet import pause

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_TERMINAL_SETTINGS = ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR", "NO_COLOR")


class Broker:
    """Celery's send_task, recorded: each call as (task name, kwargs, queue); `refuse_at` (1-based) raises."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.refuse_at: int | None = None
        self.error: Exception = OperationalError("connection refused")

    def prepare_folders(self) -> None:
        self.calls.append("prepare_folders")

    def send_task(self, name: str, kwargs: dict[str, Any], queue: str) -> SimpleNamespace:
        number = len(self.sent) + 1
        if self.refuse_at is not None and number >= self.refuse_at:
            raise self.error
        self.calls.append((name, kwargs, queue))
        return SimpleNamespace(id=f"task-{number}")

    @property
    def sent(self) -> list[tuple[str, dict[str, Any], str]]:
        return [c for c in self.calls if isinstance(c, tuple)]


@pytest.fixture
def plain_streams(monkeypatch) -> None:
    """stdout and stderr are pipes (pytest's capture), whatever the environment says about terminals."""
    for name in _TERMINAL_SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def broker(sqlite_url, configure, monkeypatch, plain_streams) -> Broker:
    """This process on an SQLite job table and queue `q-test`, its sends recorded instead of published."""
    from worker.wiring import app as wiring

    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    configure(DATABASE_URL=sqlite_url, KLING_QUEUE="q-test")
    fake = Broker()
    monkeypatch.setattr(wiring, "prepare_folders", fake.prepare_folders)
    monkeypatch.setattr(wiring.app, "send_task", fake.send_task)
    monkeypatch.setattr(watch, "LOOK_EVERY", 0.05)
    return fake


def add(job_id: str, status: str, **values: Any) -> None:
    values.setdefault("request", {"prompt": "a cat"})
    with resources.get().transaction() as s:
        s.add(Job(id=job_id, status=status, created_at=WHEN, updated_at=WHEN, **values))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def status_lines(err: str) -> list[str]:
    """What `--wait` said on stderr, without the time at the start of its lines."""
    return [line[9:] if line[:2].isdigit() and line[8:9] == " " else line for line in err.splitlines()]


# -- one job ----------------------------------------------------------------------------------------


def test_one_prompt_is_one_message_on_the_configured_queue_and_its_id_printed(broker, capsys):
    code, out, err = run(
        capsys,
        "enqueue",
        "a cat",
        "--job-id",
        "cat-1",
        "--metadata",
        '{"order": 7}',
        "-n",
        "2",
        "--resolution",
        "2k",
        "--aspect-ratio",
        "16:9",
        "--element",
        "5",
        "--image",
        "https://img.example/a.png",
    )
    assert (code, out, err) == (0, "cat-1\n", "")
    request = {
        "prompt": "a cat",
        "image_list": [{"image": "https://img.example/a.png"}],
        "element_list": [{"element_id": 5}],
        "resolution": "2k",
        "aspect_ratio": "16:9",
        "n": 2,
    }
    assert broker.calls == [
        "prepare_folders",
        ("kling.generate", {"request": request, "job_id": "cat-1", "metadata": {"order": 7}}, "q-test"),
    ]


def test_without_a_job_id_the_task_id_is_the_jobs_and_json_says_it(broker, capsys):
    assert run(capsys, "enqueue", "a dog") == (0, "task-1\n", "")
    assert run(capsys, "enqueue", "a fox", "--json") == (0, '{\n  "job_id": "task-2"\n}\n', "")
    assert [kwargs for _, kwargs, _ in broker.sent] == [
        {"request": {"prompt": "a dog"}},
        {"request": {"prompt": "a fox"}},
    ]


def test_the_message_and_the_request_are_both_checked_unless_no_check(broker, capsys):
    code, out, err = run(capsys, "enqueue", "a cat", "--job-id", "no spaces!")
    assert (code, out) == (2, "")
    assert err == "kling-worker: the request is not valid: job_id: must be 1-64 characters of [A-Za-z0-9._:-]\n"
    code, out, err = run(capsys, "enqueue", "a cat", "-n", "12")
    assert (code, out, err) == (2, "", "kling-worker: the request is not valid: n: must be 1 to 9\n")
    assert broker.sent == []
    assert run(capsys, "enqueue", "a cat", "-n", "12", "--job-id", "big-1", "--no-check") == (0, "big-1\n", "")
    assert broker.sent == [("kling.generate", {"request": {"prompt": "a cat", "n": 12}, "job_id": "big-1"}, "q-test")]


@pytest.mark.parametrize(
    "argv, said",
    [
        (["enqueue"], "give a PROMPT, or --batch FILE.jsonl"),
        (["enqueue", "a cat", "--batch", "{file}"], "give a PROMPT or --batch FILE, not both"),
        (
            ["enqueue", "--batch", "{file}", "--job-id", "x", "--no-check", "--metadata", "{}"],
            "--job-id, --metadata, --no-check: not with --batch (each line says it for its job)",
        ),
        (
            ["enqueue", "--batch", "{file}", "--aspect-ratio", "1:1", "--resolution", "1k", "--element", "3"],
            "--element, --resolution, --aspect-ratio: not with --batch (each line says it for its job)",
        ),
        (
            ["enqueue", "--batch", "{file}", "-n", "1", "--image", "a.png", "--timeout", "3", "--json"],
            "--image, -n: not with --batch (each line says it for its job)",
        ),
    ],
)
def test_a_prompt_and_a_batch_exclude_each_other(broker, capsys, tmp_path, argv, said):
    file = str(write_batch(tmp_path / "jobs.jsonl", GOOD_BATCH))
    code, out, err = run(capsys, *[arg.replace("{file}", file) for arg in argv])
    assert (code, out) == (2, "")
    assert err == f"kling-worker enqueue: {said} (see `kling-worker enqueue --help`)\n"
    assert broker.calls == []


def test_a_refused_message_is_one_line_and_exit_2(broker, capsys):
    broker.refuse_at = 1
    code, out, err = run(capsys, "enqueue", "a cat", "--job-id", "cat-1")
    assert (code, out) == (2, "")
    assert err == "kling-worker: the broker refused the message (connection refused); is CELERY_BROKER_URL right?\n"


def test_partly_sent_keeps_what_went_before_and_why():
    cause = OSError("no route")
    partly = enqueue.PartlySent(["a", "b"], cause)
    assert str(partly) == "the broker refused the message (no route); is CELERY_BROKER_URL right?"
    assert partly.sent == ["a", "b"] and partly.cause is cause


def test_send_stops_at_the_first_refusal_naming_what_was_sent(broker):
    broker.refuse_at = 3
    broker.error = ConnectionRefusedError("refused")
    messages = [{"request": {"prompt": "one"}, "job_id": "one"}, {"request": {"prompt": "two"}}, {"request": {}}]
    with pytest.raises(enqueue.PartlySent) as raised:
        enqueue.send(messages)
    assert raised.value.sent == ["one", "task-2"] and raised.value.cause is broker.error
    assert raised.value.__cause__ is broker.error
    assert [kwargs for _, kwargs, _ in broker.sent] == messages[:2]
    assert enqueue.send([]) == []


# -- one job, --wait --------------------------------------------------------------------------------


def test_wait_prints_the_job_in_full_when_it_succeeded(broker, capsys):
    add("cat-1", "succeeded", attempts=1, result_urls=["https://r/0.png"])
    code, out, err = run(capsys, "enqueue", "a cat", "--job-id", "cat-1", "--wait", "--timeout", "5")
    assert code == 0
    assert out.splitlines() == [
        "cat-1",
        "         id: cat-1",
        "     status: succeeded",
        "     tenant: default",
        "   priority: 5",
        '    request: {"prompt": "a cat"}',
        'result_urls: ["https://r/0.png"]',
        "   attempts: 1",
        "      polls: 0",
        " created_at: 2026-01-02T03:04:05+00:00",
        " updated_at: 2026-01-02T03:04:05+00:00",
    ]
    assert status_lines(err) == ["cat-1                  succeeded"]


def test_wait_exits_1_when_the_job_failed_and_json_is_its_row(broker, capsys):
    add("cat-2", "failed", error_code="task_failed")
    code, out, err = run(capsys, "enqueue", "a cat", "--job-id", "cat-2", "--wait", "--json")
    row = json.loads(out)  # only the row: not the id first
    assert code == 1 and (row["id"], row["status"], row["error_code"]) == ("cat-2", "failed", "task_failed")
    assert status_lines(err) == ["cat-2                  failed"]


def test_wait_gives_up_after_its_timeout(broker, capsys):
    code, out, err = run(capsys, "enqueue", "a cat", "--job-id", "slow-1", "--wait", "--timeout", "0.3")
    assert (code, out) == (1, "slow-1\n")
    assert status_lines(err) == ["slow-1                 queued", "slow-1: not finished after 0s"]
    code, out, err = run(capsys, "enqueue", "a cat", "--job-id", "slow-2", "--wait", "--timeout", "0.3", "--json")
    assert (code, json.loads(out)) == (1, {"id": "slow-2", "status": "queued"})
    assert err.endswith("slow-2: not finished after 0s\n")
    add("slow-3", "processing", modellix_task_id="task-p")
    code, out, _ = run(capsys, "enqueue", "a cat", "--job-id", "slow-3", "--wait", "--timeout", "0.3", "--json")
    assert code == 1 and json.loads(out)["status"] == "processing"  # the row as it is


def test_wait_needs_the_job_database(configure, tmp_path):
    missing = tmp_path / "nowhere.sqlite"
    configure(DATABASE_URL=f"sqlite:///{missing}")
    with pytest.raises(UsageError, match=f"^no job database at {re.escape(str(missing))}: run this where the service"):
        enqueue._wait(["x"], 1.0)
    assert not missing.exists()


def test_wait_follows_on_stderr_and_says_why_a_job_stays_queued(broker, capsys, monkeypatch):
    monkeypatch.setattr(watch, "HINT_AFTER", 0.0)
    pause.pause_fleet(resources.get(), 300, "429 from submit")
    add("done-1", "succeeded")
    rows = enqueue._wait(["done-1", "never-1"], 0.5)
    assert set(rows) == {"done-1"} and rows["done-1"]["status"] == "succeeded"
    out, err = capsys.readouterr()
    said = status_lines(err)
    assert out == "" and said[:2] == ["done-1                 succeeded", "never-1                queued"]
    assert said[2].startswith("waiting: the fleet is paused: 429 from submit (") and said[2].endswith("s left)")
    assert len(said) == 3


# -- a batch ----------------------------------------------------------------------------------------


def batch_file(tmp_path, lines: list[object] | None = None) -> str:
    """GOOD_BATCH with a blank second line: its messages are on lines 1, 3 and 4; its job ids are
    batch-1, the task id of the second message, and batch-3."""
    return str(write_batch(tmp_path / "jobs.jsonl", lines or [GOOD_BATCH[0], "", GOOD_BATCH[1], GOOD_BATCH[2]]))


def test_a_batch_is_sent_in_order_and_each_line_named_with_its_job(broker, capsys, tmp_path):
    code, out, err = run(capsys, "enqueue", "--batch", batch_file(tmp_path))
    assert (code, err) == (0, "")
    assert out == "line  job_id\n1     batch-1\n3     task-2\n4     batch-3\n"
    assert broker.calls == ["prepare_folders", *[("kling.generate", m, "q-test") for m in GOOD_BATCH]]
    code, out, _ = run(capsys, "enqueue", "--batch", batch_file(tmp_path), "--json")
    assert code == 0 and json.loads(out) == [
        {"line": 1, "job_id": "batch-1"},
        {"line": 3, "job_id": "task-5"},
        {"line": 4, "job_id": "batch-3"},
    ]
    assert out.startswith('[\n  {\n    "line": 1,\n    "job_id": "batch-1"\n  },')


def test_a_broker_refusing_mid_batch_names_the_line_and_what_went(broker, capsys, tmp_path):
    broker.refuse_at = 3
    code, out, err = run(capsys, "enqueue", "--batch", batch_file(tmp_path))
    assert code == 1
    assert out == "line  job_id\n1     batch-1\n3     task-2\n"
    assert err == "kling-worker: the broker refused line 4 (connection refused); 2 of 3 sent, none after it\n"
    broker.calls.clear()
    code, out, err = run(capsys, "enqueue", "--batch", batch_file(tmp_path), "--json")
    assert code == 1 and json.loads(out) == [{"line": 1, "job_id": "batch-1"}, {"line": 3, "job_id": "task-2"}]


def test_a_broker_refusing_the_first_line_sent_nothing_and_exits_2(broker, capsys, tmp_path):
    broker.refuse_at = 1
    broker.error = OSError("network unreachable")
    code, out, err = run(capsys, "enqueue", "--batch", batch_file(tmp_path))
    assert (code, out) == (2, "")
    assert err == "kling-worker: the broker refused line 1 (network unreachable); 0 of 3 sent, none after it\n"


def test_one_bad_line_is_named_and_counted_and_nothing_sent(broker, capsys, tmp_path):
    name = batch_file(tmp_path, [GOOD_BATCH[0], {"request": {"prompt": "x", "n": 0}}])
    code, out, err = run(capsys, "enqueue", "--batch", name)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"kling-worker: {name} line 2: request.n: must be 1 to 9",
        "kling-worker: 1 line is not valid messages; nothing was sent",
    ]
    name = batch_file(tmp_path, ["{", "[]"])
    code, _, err = run(capsys, "enqueue", "--batch", name)
    assert code == 2 and err.splitlines()[-1] == "kling-worker: 2 lines are not valid messages; nothing was sent"
    assert broker.calls == []


def test_a_batch_without_messages_is_refused_by_its_name():
    with pytest.raises(UsageError, match=r"^the file holds no message; nothing was sent$"):
        enqueue._enqueue_batch(io.StringIO("\n  \n"), False, 1.0, False)
    named = io.StringIO("")
    named.name = "jobs.jsonl"
    with pytest.raises(UsageError, match=r"^jobs.jsonl holds no message; nothing was sent$"):
        enqueue._enqueue_batch(named, False, 1.0, False)


def test_a_batch_with_wait_prints_what_was_sent_then_how_each_ended(broker, capsys, tmp_path):
    add("batch-1", "succeeded")
    add("batch-3", "failed", error_code="task_failed")
    code, out, err = run(capsys, "enqueue", "--batch", batch_file(tmp_path), "--wait", "--timeout", "0.4")
    assert code == 1
    assert out.splitlines() == [
        "line  job_id",
        "1     batch-1",
        "3     task-2",
        "4     batch-3",
        "id       status     error_code",
        "batch-1  succeeded",
        "task-2   queued",
        "batch-3  failed     task_failed",
    ]
    assert status_lines(err) == [
        "batch-1                succeeded",
        "task-2                 queued",
        "batch-3                failed",
        "1 of 3 jobs not finished after 0s",
    ]


def test_a_batch_with_wait_and_json_prints_only_how_each_ended(broker, capsys, tmp_path):
    add("batch-1", "succeeded")
    add("batch-3", "succeeded")
    add("task-2", "succeeded")
    code, out, err = run(capsys, "enqueue", "--batch", batch_file(tmp_path), "--wait", "--json", "--timeout", "5")
    ended = json.loads(out)
    assert code == 0 and [(r["id"], r["status"]) for r in ended] == [
        ("batch-1", "succeeded"),
        ("task-2", "succeeded"),
        ("batch-3", "succeeded"),
    ]
    assert "not finished" not in err


def test_a_batch_with_wait_and_json_shows_a_job_nobody_took_as_queued(broker, capsys, tmp_path):
    add("batch-1", "succeeded")
    add("task-2", "succeeded")
    code, out, err = run(capsys, "enqueue", "--batch", batch_file(tmp_path), "--wait", "--json", "--timeout", "0.3")
    ended = json.loads(out)
    assert code == 1 and ended[2] == {"id": "batch-3", "status": "queued"}
    assert [r["status"] for r in ended[:2]] == ["succeeded", "succeeded"]
    assert err.splitlines()[-1] == "1 of 3 jobs not finished after 0s"


def test_print_sent_pairs_lines_with_the_ids_that_went(plain_streams, capsys):
    from worker.cli.batch import Message

    messages = [Message(2, {}), Message(5, {}), Message(9, {})]
    enqueue._print_sent(messages, ["a", "b"], False)
    assert capsys.readouterr().out == "line  job_id\n2     a\n5     b\n"
    enqueue._print_sent(messages, ["a"], True)
    assert capsys.readouterr().out == '[\n  {\n    "line": 2,\n    "job_id": "a"\n  }\n]\n'


# -- the request --------------------------------------------------------------------------------------


def test_a_request_holds_only_what_was_given(tmp_path):
    photo = tmp_path / "me.JPG"
    photo.write_bytes(b"\xff\xd8\xff jpeg")
    assert enqueue.build_request("p") == {"prompt": "p"}
    assert enqueue.build_request("p", n=0, resolution=None) == {"prompt": "p", "n": 0}
    assert enqueue.build_request("p", [str(photo), "data:image/png;base64,AAAA"], [1, 2], aspect_ratio="auto") == {
        "prompt": "p",
        "image_list": [{"image": "data:image/jpeg;base64,/9j/IGpwZWc="}, {"image": "data:image/png;base64,AAAA"}],
        "element_list": [{"element_id": 1}, {"element_id": 2}],
        "aspect_ratio": "auto",
    }


def test_an_image_is_a_url_a_data_uri_or_a_png_or_jpeg_file(tmp_path):
    image = tmp_path / "in.png"
    image.write_bytes(png(1, 1))
    assert enqueue._image("s3://bucket/key.gif") == "s3://bucket/key.gif"  # any URL: the worker judges it
    assert enqueue._image("data:text/plain,hi") == "data:text/plain,hi"
    assert enqueue._image(str(image)) == "data:image/png;base64," + base64.b64encode(png(1, 1)).decode()
    for name in ("cat.gif", "notes", "photo.webp"):
        with pytest.raises(UsageError) as refused:
            enqueue._image(str(tmp_path / name))
        assert str(refused.value) == (
            f"--image {tmp_path / name}: not a .png, .jpg or .jpeg file; give one, or an http(s) URL"
        )
    with pytest.raises(UsageError) as missing:
        enqueue._image(str(tmp_path / "missing.jpeg"))
    assert str(missing.value) == f"--image {tmp_path / 'missing.jpeg'}: No such file or directory"
