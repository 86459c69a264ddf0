"""The sandbox server's own contract: control endpoints and the counters tests rely on."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import requests

SUBMIT = "/api/v1/image-to-image/kling/kling-image-o1/async"


def auth(sandbox) -> dict[str, str]:
    return {"Authorization": f"Bearer {sandbox.api_key}"}


def test_missing_key_and_bad_json(sandbox):
    r = requests.post(sandbox.url + SUBMIT, json={"prompt": "x"})
    assert r.status_code == 401 and r.json() == {"code": 401, "message": "Unauthorized: invalid or missing API key"}
    r = requests.post(sandbox.url + SUBMIT, data=b"{nope", headers=auth(sandbox))
    assert r.status_code == 400 and r.json()["message"].startswith("Bad Request:")


def test_lifecycle_pending_processing_success(sandbox):
    sandbox.task_seconds = 0.4
    task_id = requests.post(sandbox.url + SUBMIT, json={"prompt": "x"}, headers=auth(sandbox)).json()["data"]["task_id"]
    seen = []
    for _ in range(12):
        answer = requests.get(f"{sandbox.url}/api/v1/tasks/{task_id}", headers=auth(sandbox))
        seen.append(answer.json()["data"]["status"])
        time.sleep(0.05)
    assert seen[0] == "pending" and "processing" in seen and seen[-1] == "success"
    assert seen.index("processing") < seen.index("success")


def test_control_endpoints_drive_faults_from_another_process(sandbox):
    r = requests.post(sandbox.url + "/_sandbox/faults", json={"rate_503": 1.0, "task_seconds": 3})
    assert r.status_code == 200 and r.json()["faults"]["rate_503"] == 1.0 and sandbox.task_seconds == 3
    assert requests.post(sandbox.url + SUBMIT, json={"prompt": "x"}, headers=auth(sandbox)).status_code == 503
    assert requests.post(sandbox.url + "/_sandbox/faults", json={"bogus": 1}).status_code == 400
    stats = requests.get(sandbox.url + "/_sandbox/stats").json()
    assert stats["errors_injected"] == 1 and stats["status_counts"] == {"503": 1} and stats["submits"] == 0
    requests.post(sandbox.url + "/_sandbox/reset")
    assert requests.get(sandbox.url + "/_sandbox/stats").json()["requests"] == 0


def test_latency_is_added(sandbox):
    sandbox.set_faults(latency=0.3)
    started = time.monotonic()
    requests.post(sandbox.url + SUBMIT, json={"prompt": "x"}, headers=auth(sandbox))
    assert time.monotonic() - started >= 0.3


def test_counters_under_concurrency(sandbox):
    sandbox.task_seconds = 30
    session = requests.Session()
    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(lambda i: session.post(sandbox.url + SUBMIT, json={"prompt": f"p{i % 150}"},
                                                     headers=auth(sandbox)).status_code, range(200)))
    assert codes == [200] * 200
    stats = sandbox.stats()
    assert stats["submits"] == 200 and stats["duplicate_prompts"] == 50
    assert stats["unfinished"] == stats["max_unfinished"] == 200
    assert 1 <= stats["max_requests_per_second"] <= 200
