"""`kling-worker enqueue --batch FILE.jsonl`: every line checked before any is sent; all sent, or none."""

from __future__ import annotations

import json

import pytest

from tests.support.cli import GOOD_BATCH, cli_env, run_cli, write_batch
from worker import cli


def test_one_bad_line_and_nothing_is_sent_each_named_by_its_number(configure, tmp_path, capsys):
    configure(KLING_HOME=str(tmp_path / "home"), CELERY_BROKER_URL="filesystem://localhost/")
    lines = [
        GOOD_BATCH[0],
        '{"request": {"prompt": "x"},',
        "[1, 2]",
        {"request": {"prompt": "see <<<image_2>>>", "n": 12}},
        "",
        {"request": {"prompt": "y"}, "bogus": 1},
        {"request": {"prompt": "z"}, "job_id": "batch-1"},
        {"request": {"prompt": "w"}, "metadata": "not an object"},
        {"prompt": "a bare request"},
        GOOD_BATCH[2],
    ]
    code = cli.main(["enqueue", "--batch", str(write_batch(tmp_path / "jobs.jsonl", lines))])
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
        "file": str(write_batch(tmp_path / "good.jsonl", GOOD_BATCH)),
        "missing": str(tmp_path / "missing.jsonl"),
        "empty": str(write_batch(tmp_path / "empty.jsonl", ["", "  "])),
    }
    code = cli.main([arg.format(**files) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2 and said in err and err.count("\n") == 1 and "Traceback" not in err


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
    many = run_cli(["enqueue", "--batch", str(write_batch(tmp_path / "jobs.jsonl", GOOD_BATCH))], env)
    assert many.returncode == 2 and many.stdout == ""
    assert many.stderr.startswith("kling-worker: the broker refused line 1 (") and "0 of 3 sent" in many.stderr
    again = run_cli(["jobs", "retry", "f1", "--json"], env)
    assert again.returncode == 1 and json.loads(again.stdout)[0]["action"] == "not sent"
    for done in (one, many, again):
        assert "Traceback" not in done.stderr and "secret-pw" not in done.stderr + done.stdout
