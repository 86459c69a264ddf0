"""Real worker processes, a separate producer process, real brokers and databases, the sandbox."""
from __future__ import annotations

import time
import uuid

import pytest
import requests
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from models import TERMINAL
from models.job import Job
from tests.processes import Worker, produce

pytestmark = pytest.mark.services


def worker_env(broker: str, database: str, sandbox, tmp_path, **extra) -> dict[str, str]:
    env = {
        "CELERY_BROKER_URL": broker,
        "DATABASE_URL": database,
        "MODELLIX_BASE_URL": sandbox.url,
        "MODELLIX_API_KEY": sandbox.api_key,
        "KLING_QUEUE": f"kling-test-{uuid.uuid4().hex[:8]}",
        "KLING_HOME": str(tmp_path / "home"),
        "KLING_POLL_FIRST": "0.3",
        "KLING_POLL_MAX": "1",
        "KLING_SWEEP_INTERVAL": "1",
        "KLING_SUBMIT_GRACE": "3",
        "KLING_BACKOFF_BASE": "0.2",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def rows(database: str) -> dict[str, Job]:
    engine = create_engine(database.replace("postgresql://", "postgresql+psycopg://"))
    with Session(engine) as s:
        found = {j.id: j for j in s.scalars(select(Job))}
    engine.dispose()
    return found


def wait_terminal(database: str, count: int, timeout: float, workers: list[Worker]) -> dict[str, Job]:
    deadline = time.monotonic() + timeout
    found: dict[str, Job] = {}
    while time.monotonic() < deadline:
        found = rows(database)
        if len(found) >= count and all(j.status in TERMINAL for j in found.values()):
            return found
        time.sleep(0.3)
    statuses = {j.id: j.status for j in found.values() if j.status not in TERMINAL}
    logs = "\n".join(w.output() for w in workers)
    pytest.fail(f"{len(found)}/{count} rows, not terminal: {statuses}\n{logs}")


def valid(tag: str, i: int) -> dict:
    return {"request": {"prompt": f"{tag} picture {i} of <<<image_1>>>", "n": 1 + i % 2,
                        "image_list": [{"image": f"https://img.example/{i}.png"}]},
            "job_id": f"{tag}-{i}", "metadata": {"i": i}}


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
            {"request": {"prompt": "see <<<image_2>>>", "image_list": [{"image": "ftp://a/b.png"}]},
             "job_id": f"{tag}-bad-image"},
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
        time.sleep(2)
        found = wait_terminal(pg_url, 5, 30, workers)
    finally:
        for w in workers:
            w.stop()
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
    killed_at = sandbox.stats()["submits"]
    assert 15 <= killed_at < len(messages), "the kill must land mid-batch"

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


def test_only_json_is_accepted_from_the_broker(rabbit_url, pg_url, sandbox, tmp_path):
    env = worker_env(rabbit_url, pg_url, sandbox, tmp_path)
    worker = Worker(env, tmp_path).wait_ready()
    try:
        from celery import Celery

        producer = Celery(broker=rabbit_url)
        producer.conf.accept_content = ["json", "pickle"]
        producer.send_task("kling.generate", kwargs=valid("pickled", 0), queue=env["KLING_QUEUE"],
                           serializer="pickle")
        produce(rabbit_url, env["KLING_QUEUE"], [valid("json", 0)])
        found = wait_terminal(pg_url, 1, 30, [worker])
        time.sleep(1)
    finally:
        worker.stop()
    assert set(rows(pg_url)) == {"json-0"} and found["json-0"].status == "succeeded"
    assert "ContentDisallowed" in worker.output() or "Refusing to deserialize" in worker.output()
    assert sandbox.stats()["submits"] == 1
