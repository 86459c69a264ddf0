"""`kling-worker enqueue --batch FILE.jsonl`: every line checked before any is sent; all sent, or none."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.cli_support import cli_env, delete_queue, drain, run_cli
from tests.support import worker_env
from worker import cli
from worker.dev.processes import Worker

GOOD = [
    {"request": {"prompt": "a cat", "n": 2}, "job_id": "batch-1", "metadata": {"row": 1}},
    {"request": {"prompt": "a dog like <<<image_1>>>", "image_list": [{"image": "https://img.example/d.png"}]}},
    {"request": {"prompt": "a fox"}, "job_id": "batch-3", "callback": {"task": "orders.ready", "queue": "orders"}},
]


def write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_one_bad_line_and_nothing_is_sent_each_named_by_its_number(configure, tmp_path, capsys):
    configure(KLING_HOME=str(tmp_path / "home"), CELERY_BROKER_URL="filesystem://localhost/")
    lines = [
        GOOD[0],
        '{"request": {"prompt": "x"},',
        "[1, 2]",
        {"request": {"prompt": "see <<<image_2>>>", "n": 12}},
        "",
        {"request": {"prompt": "y"}, "bogus": 1},
        {"request": {"prompt": "z"}, "job_id": "batch-1"},
        {"request": {"prompt": "w"}, "metadata": "not an object"},
        {"prompt": "a bare request"},
        GOOD[2],
    ]
    code = cli.main(["enqueue", "--batch", str(write(tmp_path / "jobs.jsonl", lines))])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    said = err.splitlines()
    name = str(tmp_path / "jobs.jsonl")
    assert said[0].startswith(f"kling-worker: {name} line 2: not JSON: ")
    assert said[1].startswith(f"kling-worker: {name} line 3: not a JSON object")
    assert said[2].startswith(f"kling-worker: {name} line 4: request.")
    assert "request.n: must be 1 to 9" in said[2] and "<<<image_2>>> does not match an image" in said[2]
    assert said[3] == f"kling-worker: {name} line 6: bogus: Unknown field."
    assert said[4] == f"kling-worker: {name} line 7: job_id 'batch-1' is also on line 1"
    assert said[5].startswith(f"kling-worker: {name} line 8: metadata: ")
    assert said[6] == (
        f"kling-worker: {name} line 9: a request without its envelope: "
        'write {"request": {"prompt": ...}} on each line'
    )
    assert said[7] == "kling-worker: 7 lines are not valid messages; nothing was sent"
    assert len(said) == 8
    assert not (tmp_path / "home" / "broker").exists()  # no message, not even the broker's folders


@pytest.mark.parametrize(
    "argv, said",
    [
        (["enqueue", "a cat", "--batch", "{file}"], "give a PROMPT or --batch FILE, not both"),
        (["enqueue", "--batch", "{file}", "--image", "x.png", "-n", "2"], "--image, -n: not with --batch"),
        (["enqueue", "--batch", "{missing}"], "No such file or directory"),
        (["enqueue", "--batch", "{empty}"], "holds no message; nothing was sent"),
    ],
)
def test_batch_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, said):
    files = {
        "file": str(write(tmp_path / "good.jsonl", GOOD)),
        "missing": str(tmp_path / "missing.jsonl"),
        "empty": str(write(tmp_path / "empty.jsonl", ["", "  "])),
    }
    code = cli.main([arg.format(**files) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2 and said in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def rabbit_queue(rabbit_url):
    queue = "batch-" + uuid.uuid4().hex[:8]
    yield queue
    delete_queue(rabbit_url, queue)


@pytest.mark.services
def test_a_good_file_is_sent_whole_on_rabbitmq(rabbit_url, rabbit_queue, tmp_path):
    env = cli_env(CELERY_BROKER_URL=rabbit_url, KLING_QUEUE=rabbit_queue, KLING_HOME=str(tmp_path / "home"))
    done = run_cli(["enqueue", "--batch", str(write(tmp_path / "jobs.jsonl", GOOD)), "--json"], env)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert [p["line"] for p in printed] == [1, 2, 3]
    assert printed[0]["job_id"] == "batch-1" and printed[2]["job_id"] == "batch-3"
    assert uuid.UUID(printed[1]["job_id"])  # no job_id on the line: the Celery task id is the job id
    assert drain(rabbit_url, rabbit_queue) == [("kling.generate", line) for line in GOOD]

    # From standard input, and as a table when not asked for JSON.
    done = run_cli(["enqueue", "--batch", "-"], env, stdin=json.dumps(GOOD[0]) + "\n")
    assert done.returncode == 0 and done.stdout.split() == ["line", "job_id", "1", "batch-1"]
    done = run_cli(["enqueue", "a cat", "--job-id", "one-1", "--json"], env)
    assert done.returncode == 0 and json.loads(done.stdout) == {"job_id": "one-1"}
    assert [kwargs["job_id"] for _, kwargs in drain(rabbit_url, rabbit_queue)] == ["batch-1", "one-1"]


@pytest.mark.services
@pytest.mark.slow
def test_a_batch_is_recorded_by_a_worker_and_waited_for(pg_url, rabbit_url, sandbox, tmp_path):
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path)
    worker = Worker(env, tmp_path, concurrency=4).wait_ready()
    try:
        file = write(tmp_path / "jobs.jsonl", GOOD)
        done = run_cli(["enqueue", "--batch", str(file), "--wait", "--timeout", "60", "--json"], cli_env(**env))
    finally:
        worker.stop()
    assert done.returncode == 0, done.stderr + worker.output()
    rows = json.loads(done.stdout)
    assert [r["status"] for r in rows] == ["succeeded"] * 3
    assert rows[0]["id"] == "batch-1" and rows[0]["metadata"] == {"row": 1} and len(rows[0]["result_urls"]) == 2
    assert rows[2]["callback"] == {"task": "orders.ready", "queue": "orders"}
    assert "succeeded" in done.stderr  # the progress, on stderr
    delete_queue(rabbit_url, env["KLING_QUEUE"])


def test_a_broker_that_refuses_is_one_line_for_one_job_a_batch_and_a_retry(sqlite_url, configure, tmp_path):
    import socket

    from models.job import Job
    from worker import resources

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    configure(DATABASE_URL=sqlite_url)
    with resources.get().transaction() as s:
        s.add(Job(id="f1", status="failed", request={"prompt": "p"}, error_code="429"))
    env = cli_env(CELERY_BROKER_URL=f"amqp://guest:secret-pw@127.0.0.1:{port}//", DATABASE_URL=sqlite_url)
    one = run_cli(["enqueue", "a cat"], env)
    assert one.returncode == 2 and one.stdout == "" and one.stderr.count("\n") == 1
    assert one.stderr.startswith("kling-worker: the broker refused the message (") and "CELERY_BROKER_URL" in one.stderr
    many = run_cli(["enqueue", "--batch", str(write(tmp_path / "jobs.jsonl", GOOD))], env)
    assert many.returncode == 2 and many.stdout == ""
    assert many.stderr.startswith("kling-worker: the broker refused line 1 (") and "0 of 3 sent" in many.stderr
    again = run_cli(["jobs", "retry", "f1", "--json"], env)
    assert again.returncode == 1 and json.loads(again.stdout)[0]["action"] == "not sent"
    for done in (one, many, again):
        assert "Traceback" not in done.stderr and "secret-pw" not in done.stderr + done.stdout
