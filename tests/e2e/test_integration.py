"""Real worker processes, a separate producer process, real brokers and databases, the sandbox."""

from __future__ import annotations

import re
import time
import uuid

import pytest
import requests

from tests.support.jobs import wait_for, wait_terminal
from worker.dev.jobs import audit, rows, valid, worker_env
from worker.dev.processes import Worker, produce
from worker.dev.proxy import TcpProxy
from worker.dev.sandbox import Step

pytestmark = pytest.mark.services


def handled(workers: list[Worker]) -> int:
    """kling.generate messages the workers finished (Celery logs one line each at INFO)."""
    return sum(len(re.findall(r"Task kling\.generate\[[^]]+\] succeeded", w.output(10**7))) for w in workers)


@pytest.fixture(params=["rabbitmq", "redis"])
def broker(request) -> str:
    return request.getfixturevalue("rabbit_url" if request.param == "rabbitmq" else "redis_url")


def test_jobs_go_from_queue_to_succeeded_or_rejected(broker, pg_url, sandbox, tmp_path):
    env = worker_env(broker, pg_url, sandbox, tmp_path)
    workers = [Worker(env, tmp_path, beat=True), Worker(env, tmp_path)]
    try:
        for w in workers:
            w.wait_ready()
        tag = uuid.uuid4().hex[:6]
        good = [valid(tag, i) for i in range(30)]
        bad = [
            {"request": {"prompt": "x", "n": 10}, "job_id": f"{tag}-bad-n"},
            {"request": {"prompt": "x", "negative_prompt": "blur"}, "job_id": f"{tag}-bad-field"},
            {
                "request": {"prompt": "see <<<image_2>>>", "image_list": [{"image": "ftp://a/b.png"}]},
                "job_id": f"{tag}-bad-image",
            },
            {"metadata": {"case": "no-request"}},
            {"request": {"prompt": "x"}, "job_id": "has spaces/slash", "metadata": {"case": "bad-id"}},
        ]
        produce(broker, env["KLING_QUEUE"], good + bad)
        found = wait_terminal(pg_url, len(good) + len(bad), 90, workers)
    finally:
        for w in workers:
            w.stop()

    for message in good:
        job = found[message["job_id"]]
        assert job.status == "succeeded", (job.id, job.error_code, job.error_message)
        assert job.modellix_task_id and job.submitted_at and job.finished_at
        assert len(job.result_urls) == message["request"]["n"]
        assert job.meta == message["metadata"]
        assert job.request == message["request"]
    png = requests.get(found[good[0]["job_id"]].result_urls[0], timeout=5)
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")

    assert "n" in found[f"{tag}-bad-n"].error_message
    assert "negative_prompt" in found[f"{tag}-bad-field"].error_message
    image_error = found[f"{tag}-bad-image"].error_message
    assert "image_list" in image_error and "prompt" in image_error
    by_case = {j.meta.get("case"): j for j in found.values() if j.meta and "case" in j.meta}
    assert "request" in by_case["no-request"].error_message
    assert "job_id" in by_case["bad-id"].error_message
    for job in [found[m["job_id"]] for m in bad[:3]] + list(by_case.values()):
        assert (job.status, job.error_code, job.modellix_task_id) == ("rejected", "validation", None)

    stats = sandbox.stats()
    assert stats["submits"] == len(good)  # nothing invalid reached the API
    assert stats["duplicate_prompts"] == 0


def test_duplicate_job_ids_submit_once(rabbit_url, pg_url, sandbox, tmp_path):
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path)
    workers = [Worker(env, tmp_path, beat=True).wait_ready(), Worker(env, tmp_path).wait_ready()]
    try:
        tag = uuid.uuid4().hex[:6]
        messages = [valid(tag, i % 5) for i in range(40)]  # 5 jobs, 8 messages each
        produce(rabbit_url, env["KLING_QUEUE"], messages)
        wait_terminal(pg_url, 5, 60, workers)
        # The same messages again once the jobs have ended: still nothing new.
        produce(rabbit_url, env["KLING_QUEUE"], messages[:5])
        # Counted from the workers' own logs, so the check waits until every re-sent message was consumed.
        wait_for(lambda: handled(workers) >= len(messages) + 5, 60, "all 45 messages handled", workers)
        found = rows(pg_url)
    finally:
        for w in workers:
            w.stop()
    assert handled(workers) == len(messages) + 5
    assert len(found) == 5 and {j.status for j in found.values()} == {"succeeded"}
    assert {j.attempts for j in found.values()} == {1}
    assert sandbox.stats()["submits"] == 5


def test_worker_killed_mid_batch_loses_no_job(rabbit_url, pg_url, sandbox, tmp_path):
    sandbox.set_faults(latency=0.2)
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path)
    victim = Worker(env, tmp_path, concurrency=8).wait_ready()
    tag = uuid.uuid4().hex[:6]
    messages = [valid(tag, i) for i in range(80)]
    produce(rabbit_url, env["KLING_QUEUE"], messages)
    deadline = time.monotonic() + 30
    while sandbox.stats()["submits"] < 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.kill()
    submits_then = sandbox.stats()["submits"]
    assert 15 <= submits_then < len(messages), "the kill must land mid-batch"

    survivor = Worker(env, tmp_path, beat=True).wait_ready()
    try:
        found = wait_terminal(pg_url, len(messages), 120, [victim, survivor])
    finally:
        survivor.stop()
    assert set(found) == {m["job_id"] for m in messages}
    outcomes = {(j.status, j.error_code) for j in found.values()}
    # A job caught between `submitting` and its answer fails loudly rather than risk a double submission.
    assert outcomes <= {("succeeded", None), ("failed", "submit_interrupted")}
    stats = sandbox.stats()
    assert stats["duplicate_prompts"] == 0
    succeeded = sum(j.status == "succeeded" for j in found.values())
    assert succeeded >= len(messages) - 8  # at most one in-flight submit per thread of the victim
    assert succeeded <= stats["submits"] <= len(messages)
    # A task created by a submit the kill cut off is the only orphan there can be: its job was
    # claimed and not yet recorded (in flight), and the sweep failed it as submit_interrupted.
    result = audit(sandbox, messages, found)
    in_flight = sum(j.error_code == "submit_interrupted" for j in found.values())
    assert result["lost"] == [] and result["orphaned"] <= in_flight <= 8, (result, in_flight)
    print(f"SIGKILL: {in_flight} submits in flight at the kill, {result['orphaned']} tasks orphaned")


def test_only_json_is_accepted_from_the_broker(rabbit_url, pg_url, sandbox, tmp_path):
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path)
    worker = Worker(env, tmp_path).wait_ready()
    try:
        from celery import Celery

        producer = Celery(broker=rabbit_url)
        producer.conf.accept_content = ["json", "pickle"]
        producer.send_task("kling.generate", kwargs=valid("pickled", 0), queue=env["KLING_QUEUE"], serializer="pickle")
        produce(rabbit_url, env["KLING_QUEUE"], [valid("json", 0)])
        found = wait_terminal(pg_url, 1, 30, [worker])
        wait_for(
            lambda: "ContentDisallowed" in worker.output() or "Refusing to deserialize" in worker.output(),
            30,
            "the pickled message refused",
            [worker],
        )
    finally:
        worker.stop()
    assert set(rows(pg_url)) == {"json-0"} and found["json-0"].status == "succeeded"
    assert sandbox.stats()["submits"] == 1


def test_a_database_outage_delays_jobs_but_loses_none(rabbit_url, pg_url, sandbox, tmp_path):
    proxy = TcpProxy("127.0.0.1", 5432)
    database = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    env = worker_env(rabbit_url, database, sandbox, tmp_path)
    worker = Worker(env, tmp_path, concurrency=8, beat=True).wait_ready()
    try:
        tag = uuid.uuid4().hex[:6]
        messages = [valid(tag, i) for i in range(10)]
        proxy.cut()  # the database goes away before the jobs arrive
        produce(rabbit_url, env["KLING_QUEUE"], messages)
        wait_for(lambda: worker.output(10**7).count("retry: Retry in") >= 10, 30, "messages met the outage", [worker])
        assert worker.output(10**7).count("database unreachable") == 1 and "Traceback" not in worker.output(10**7)
        assert sandbox.stats()["submits"] == 0  # nothing is sent that could not be recorded
        proxy.restore()
        found = wait_terminal(pg_url, len(messages), 90, [worker])
    finally:
        worker.stop()
        proxy.close()
    assert {j.status for j in found.values()} == {"succeeded"}
    assert sandbox.stats()["submits"] == len(messages) and sandbox.stats()["duplicate_prompts"] == 0


def test_the_api_key_never_reaches_worker_logs_or_rows(rabbit_url, pg_url, sandbox, tmp_path):
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path, KLING_ACCOUNT_RETRY=1)
    # Answers that echo the request headers (key included), on a submit and on polls.
    sandbox.script(Step("echo", on="submit"), Step("echo", on="poll", times=2), Step(401, on="poll"))
    worker = Worker(env, tmp_path, concurrency=4, beat=True, loglevel="DEBUG").wait_ready()
    try:
        tag = uuid.uuid4().hex[:6]
        produce(rabbit_url, env["KLING_QUEUE"], [valid(tag, i) for i in range(3)])
        found = wait_terminal(pg_url, 3, 90, [worker])
    finally:
        worker.stop()
    log = worker.output(10**7)
    assert "Bearer ***" in log and "401" in log  # the echoes and the account error were logged...
    assert sandbox.api_key not in log  # ...without the key
    dumped = repr([j.to_dict() for j in found.values()])
    assert "Bearer ***" in dumped and sandbox.api_key not in dumped


def test_several_worker_processes_share_one_sqlite_database(rabbit_url, sandbox, tmp_path):
    database = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    from models.migrate import upgrade

    upgrade(database)
    sandbox.task_seconds = 1.0
    env = worker_env(rabbit_url, database, sandbox, tmp_path, MODELLIX_MAX_IN_FLIGHT=3)
    workers = [Worker(env, tmp_path, concurrency=8, beat=(i == 0)) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        tag = uuid.uuid4().hex[:6]
        produce(rabbit_url, env["KLING_QUEUE"], [valid(tag, i) for i in range(20)])
        found = wait_terminal(database, 20, 120, workers)
    finally:
        for w in workers:
            w.stop()
    assert {j.status for j in found.values()} == {"succeeded"}
    stats = sandbox.stats()
    assert stats["submits"] == 20 and stats["duplicate_prompts"] == 0
    assert stats["max_unfinished"] == 3, stats  # the in-flight limit holds on SQLite too
    clients = {r["client"] for r in sandbox.requests_log() if r["kind"] == "submit"}
    assert len(clients) == 2  # both processes did work
