"""The sandbox server's own contract: the API shapes, faults, control endpoints and counters."""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from worker.dev.sandbox import Faults, SandboxServer, Step

SUBMIT = "/api/v1/image-to-image/kling/kling-image-o1/async"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def server():
    with SandboxServer(port=0, api_key="secret-test-key", task_seconds=0.3, seed=7) as s:
        yield s


@pytest.fixture
def http(server):
    """A keep-alive session carrying the right key, as the real client uses."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {server.api_key}"
        yield session


def submit(server, http, body=None) -> requests.Response:
    return http.post(server.url + SUBMIT, json=body if body is not None else {"prompt": "a cat"}, timeout=10)


def poll(server, http, task_id) -> requests.Response:
    return http.get(f"{server.url}/api/v1/tasks/{task_id}", timeout=10)


def stats(server) -> dict:
    return requests.get(server.url + "/_sandbox/stats", timeout=10).json()


def poll_until(server, http, task_id, status: str, timeout: float = 10) -> dict:
    """Poll until the task reports `status` (a generous deadline: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        data = poll(server, http, task_id).json()["data"]
        if data["status"] == status or time.monotonic() > deadline:
            return data
        time.sleep(0.02)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret-test-key"}])
def test_missing_or_wrong_key_is_401(server, headers):
    for answer in (
        requests.post(server.url + SUBMIT, json={"prompt": "x"}, headers=headers),
        requests.get(server.url + "/api/v1/tasks/task-1", headers=headers),
    ):
        assert answer.status_code == 401
        assert answer.json() == {"code": 401, "message": "Unauthorized: invalid or missing API key"}
    assert stats(server)["submits"] == 0


def test_valid_submit(server, http):
    answer = submit(server, http)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
    body = answer.json()
    data = body["data"]
    assert body["code"] == 0 and body["message"] == "success"
    assert data["status"] == "pending" and data["model_id"] == "kling-image-o1"
    assert data["task_id"].startswith("task-") and len(data["task_id"]) > len("task-")
    assert data["get_result"] == {"method": "GET", "url": f"{server.url}/api/v1/tasks/{data['task_id']}"}
    # The newer path is accepted too, and every task gets its own id.
    other = http.post(server.url + "/api/v1/kling/kling-image-o1/async", json={"prompt": "a dog"})
    assert other.status_code == 200 and other.json()["data"]["task_id"] != data["task_id"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "negative_prompt": "no"}, "negative_prompt"),
        ({"prompt": "x", "n": 10}, "n"),
        ({"prompt": "x", "aspect_ratio": "5:4"}, "aspect_ratio"),
        ({}, "prompt"),
        ([1, 2], "_schema"),
    ],
)
def test_invalid_body_is_400_naming_the_field(server, http, body, field):
    answer = submit(server, http, body)
    assert answer.status_code == 400
    assert answer.json()["code"] == 400
    assert answer.json()["message"].startswith("Bad Request: ") and field in answer.json()["message"]
    assert stats(server)["submits"] == 0


def test_invalid_json_is_400(server, http):
    answer = http.post(server.url + SUBMIT, data=b"{nope", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert answer.json() == {"code": 400, "message": "Bad Request: body is not valid JSON"}


def test_lifecycle_pending_processing_success_and_png(server, http):
    server.task_seconds = 4.0  # pending for 1 s, processing for 3 s: each phase seen on a busy machine
    task_id = submit(server, http, {"prompt": "two cats", "n": 2}).json()["data"]["task_id"]
    seen: list[str] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (not seen or seen[-1] != "success"):
        data = poll(server, http, task_id).json()["data"]
        assert data["task_id"] == task_id and data["model_id"] == "kling-image-o1"
        if not seen or seen[-1] != data["status"]:
            seen.append(data["status"])
        time.sleep(0.02)
    assert seen == ["pending", "processing", "success"]
    resources = data["result"]["resources"]
    assert [r["url"] for r in resources] == [f"{server.url}/results/{task_id}/{k}.png" for k in range(2)]
    assert all(r["type"] == "image" for r in resources)
    image = requests.get(resources[1]["url"])  # no key: result URLs are public
    assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"
    assert image.content.startswith(PNG_MAGIC) and image.content.endswith(b"IEND\xaeB`\x82")


def test_task_length_is_fixed_at_submit(server, http):
    task_id = submit(server, http).json()["data"]["task_id"]
    requests.post(server.url + "/_sandbox/config", json={"task_seconds": 60})
    assert poll_until(server, http, task_id, "success")["status"] == "success"
    assert poll(server, http, submit(server, http).json()["data"]["task_id"]).json()["data"]["status"] == "pending"


def test_unknown_task_is_404(server, http):
    answer = poll(server, http, "task-nope")
    assert answer.status_code == 404
    assert answer.json() == {"code": 404, "message": "Not Found: task task-nope not found"}
    assert stats(server)["polls"] == 0


def test_fail_rate_one_fails_every_task(server, http):
    server.set_faults(fail_rate=1.0)
    task_id = submit(server, http).json()["data"]["task_id"]
    data = poll_until(server, http, task_id, "failed")
    assert data["status"] == "failed" and "result" not in data
    assert data["error"]["code"] == "generation_failed" and data["error"]["message"]


def test_429_with_retry_after(server, http):
    server.set_faults(rate_429=1.0, retry_after=0.2)
    answer = submit(server, http)
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "0.2"
    assert answer.json() == {"code": 429, "message": "Too Many Requests: rate limit exceeded"}
    server.set_faults(retry_after=3)
    assert poll(server, http, "task-x").headers["Retry-After"] == "3"


@pytest.mark.parametrize(
    "fault, status, category",
    [
        ({"rate_500": 1.0}, 500, "Internal Server Error: "),
        ({"rate_503": 1.0}, 503, "Service Unavailable: "),
        ({"reject_key": True}, 401, "Unauthorized: "),
        ({"no_balance": True}, 402, "Payment Required: insufficient balance"),
    ],
)
def test_injected_errors(server, http, fault, status, category):
    server.set_faults(**fault)
    for answer in (submit(server, http), poll(server, http, "task-x")):
        assert answer.status_code == status and answer.json()["code"] == status
        assert answer.json()["message"].startswith(category)
    s = server.stats()
    assert s["submits"] == 0 and s["errors_injected"] == 2 and s["status_counts"] == {str(status): 2}


def test_fault_rates_are_shares(server, http):
    server.set_faults(rate_429=0.3, rate_503=0.2)
    codes = [submit(server, http, {"prompt": f"p{i}"}).status_code for i in range(400)]
    assert set(codes) == {200, 429, 503}
    assert 80 <= codes.count(429) <= 160 and 45 <= codes.count(503) <= 120
    assert server.stats()["submits"] == codes.count(200)  # a faulted submit creates no task


def test_latency_is_added(server, http):
    server.set_faults(latency=1.0)
    for call in (lambda: submit(server, http), lambda: poll(server, http, "task-x")):
        started = time.monotonic()
        call()
        assert time.monotonic() - started >= 1.0
    started = time.monotonic()
    requests.get(server.url + "/_sandbox/stats")  # control endpoints answer without it
    assert time.monotonic() - started < 1.0


def test_control_endpoints_update_faults_and_reset(server, http):
    r = requests.post(server.url + "/_sandbox/faults", json={"rate_503": 1.0, "retry_after": 0.5})
    assert r.status_code == 200
    assert r.json()["faults"] == dict(vars(Faults()), rate_503=1.0, retry_after=0.5)
    assert server.faults.rate_503 == 1.0 and server.faults.retry_after == 0.5
    assert submit(server, http).status_code == 503

    for bad in ({"bogus": 1}, {"rate_429": "lots"}, {"rate_500": 2}, {"reject_key": "yes"}, [1]):
        answer = requests.post(server.url + "/_sandbox/faults", json=bad)
        assert answer.status_code == 400 and answer.json()["message"].startswith("Bad Request: ")
    assert requests.post(server.url + "/_sandbox/faults", json={"rate_503": 0, "bogus": 1}).status_code == 400
    assert server.faults.rate_503 == 1.0  # all or nothing

    r = requests.post(server.url + "/_sandbox/config", json={"task_seconds": 5})
    assert r.status_code == 200 and server.task_seconds == 5.0
    s = stats(server)
    assert s["requests"] == 1 and s["errors_injected"] == 1 and s["status_counts"] == {"503": 1}

    assert requests.post(server.url + "/_sandbox/faults", json={"rate_503": 0}).status_code == 200
    task_id = submit(server, http).json()["data"]["task_id"]
    assert requests.post(server.url + "/_sandbox/reset").status_code == 200
    s = stats(server)
    assert (s["requests"], s["submits"], s["status_counts"], s["max_unfinished"]) == (0, 0, {}, 0)
    assert poll(server, http, task_id).status_code == 404  # tasks are forgotten too


def test_counters(server, http):
    for i in range(3):
        submit(server, http, {"prompt": f"unique {i}"})
    submit(server, http, {"prompt": "unique 0"})  # the same body again
    submit(server, http, {"prompt": "unique 0", "n": 1})  # a different body
    task_id = submit(server, http, {"prompt": "unique 9"}).json()["data"]["task_id"]
    poll(server, http, task_id)
    poll(server, http, "task-unknown")
    requests.get(server.url + SUBMIT)  # no key
    s = stats(server)
    assert s["submits"] == 6 and s["duplicate_prompts"] == 1 and s["polls"] == 1
    assert s["requests"] == 9 and s["status_counts"] == {"200": 7, "404": 1, "401": 1}
    assert s["errors_injected"] == 0 and s == {**server.stats(), "unfinished": s["unfinished"]}


def test_max_requests_per_second(server, http):
    started = time.monotonic()
    for _ in range(20):
        poll(server, http, "task-x")
    burst = time.monotonic() - started
    time.sleep(1.1)
    for _ in range(5):
        poll(server, http, "task-x")
    s = server.stats()
    assert s["requests"] == 25
    if burst < 1.0:  # nearly always; a machine too loaded to send 20 requests in a second proves nothing here
        assert s["max_requests_per_second"] == 20


def test_the_request_window_is_half_open():
    from worker.dev.sandbox import _max_in_window

    assert _max_in_window([0.0, 0.5, 0.99, 1.0, 1.5, 1.98, 2.5], 1.0) == 4  # 0.99 to 1.98
    assert _max_in_window([0.0, 1.0, 2.0], 1.0) == 1
    assert _max_in_window([], 1.0) == 0


def test_max_unfinished_and_unfinished(server, http):
    ids = [submit(server, http, {"prompt": f"first {i}"}).json()["data"]["task_id"] for i in range(3)]
    for task_id in ids:
        assert poll_until(server, http, task_id, "success")["status"] == "success"
    server.task_seconds = 30  # the next two stay unfinished however slow this machine is
    for i in range(2):
        submit(server, http, {"prompt": f"second {i}"})
    s = server.stats()
    assert s["max_unfinished"] == 3 and s["unfinished"] == 2


def test_concurrent_requests_all_succeed(server):
    server.task_seconds = 30
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=32)
    session.mount("http://", adapter)
    headers = {"Authorization": f"Bearer {server.api_key}"}

    def one(i: int) -> int:
        return session.post(server.url + SUBMIT, json={"prompt": f"p{i % 150}"}, headers=headers).status_code

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes == [200] * 200
    s = server.stats()
    assert s["submits"] == s["requests"] == 200 and s["duplicate_prompts"] == 50
    assert s["unfinished"] == s["max_unfinished"] == 200


def test_stop_without_start_returns():
    SandboxServer().stop()


# -- scripted answers and the request log --------------------------------------


def test_scripted_errors_answer_the_next_matching_requests_in_order(server, http):
    server.script(Step(429, on="submit", retry_after=3), Step(503, on="poll", times=2), Step(500))
    task_id = None
    answer = submit(server, http)
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "3"
    assert answer.json() == {"code": 429, "message": "Too Many Requests: scripted"}
    assert [poll(server, http, "task-x").status_code for _ in range(2)] == [503, 503]
    assert submit(server, http).status_code == 500  # "any" matches a submit too
    task_id = submit(server, http).json()["data"]["task_id"]  # the script is used up
    assert poll(server, http, task_id).status_code == 200
    s = server.stats()
    assert s["submits"] == 1 and s["errors_injected"] == 4


def test_a_step_waits_for_a_request_it_applies_to(server, http):
    server.script(Step("no_results"), Step("no_task_id"))
    answer = submit(server, http).json()  # no_results is for polls: the submit takes no_task_id
    assert answer["code"] == 0 and "task_id" not in answer["data"]
    assert server.stats()["submits"] == 1  # the task was created all the same
    task_id = submit(server, http).json()["data"]["task_id"]
    data = poll(server, http, task_id).json()["data"]
    assert data["status"] == "success" and data["result"] == {"resources": []}


def test_dropped_answer_still_creates_the_task(server, http):
    server.script(Step("drop", on="submit"))
    with pytest.raises(requests.ConnectionError):
        submit(server, http)
    assert server.stats()["submits"] == 1
    assert server.requests_log()[-1]["status"] == -1


def test_scripted_poll_answers(server, http):
    task_id = submit(server, http).json()["data"]["task_id"]
    server.script(Step("wrong_task_id"), Step("status:rendering"), Step(404, on="poll"))
    assert poll(server, http, task_id).json()["data"]["task_id"] == task_id + "-other"
    assert poll(server, http, task_id).json()["data"]["status"] == "rendering"
    assert poll(server, http, task_id).status_code == 404


def test_echo_puts_the_request_headers_in_the_error_text(server, http):
    server.script(Step("echo"))
    answer = submit(server, http)
    assert answer.status_code == 400 and server.api_key in answer.json()["message"]


def test_script_over_http_and_bad_steps(server, http):
    ok = requests.post(server.url + "/_sandbox/script", json={"steps": [{"answer": 402, "times": 2}]})
    assert ok.status_code == 200 and ok.json() == {"queued": 1}  # one step, used twice
    assert [submit(server, http).status_code for _ in range(3)] == [402, 402, 200]
    for bad in (
        {"steps": [{"answer": 200}]},
        {"steps": [{"answer": "explode"}]},
        {"steps": [{"answer": 429, "on": "both"}]},
        {"steps": [{"answer": 429, "times": 0}]},
        {"steps": "x"},
        [1],
    ):
        answer = requests.post(server.url + "/_sandbox/script", json=bad)
        assert answer.status_code == 400 and answer.json()["message"].startswith("Bad Request: ")


def test_request_log_names_client_kind_and_answer(server, http):
    http.headers["User-Agent"] = "worker-a"
    task_id = submit(server, http).json()["data"]["task_id"]
    poll(server, http, task_id)
    requests.get(
        server.url + "/api/v1/nowhere", headers={"Authorization": f"Bearer {server.api_key}", "User-Agent": "worker-b"}
    )
    before = time.time()
    log = requests.get(server.url + "/_sandbox/requests").json()["requests"]
    assert [(r["client"], r["kind"], r["status"]) for r in log] == [
        ("worker-a", "submit", 200),
        ("worker-a", "poll", 200),
        ("worker-b", "other", 404),
    ]
    assert all(before - 10 < r["at"] <= before for r in log)


# -- result images ---------------------------------------------------------------


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, raw rows) of an 8-bit RGB PNG, checking its signature, every chunk's CRC and the rows' size."""
    assert data.startswith(PNG_MAGIC)
    at, chunks = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        at += 12 + length
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (depth, colour) == (8, 2)
    rows = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(rows) == height * (1 + 3 * width)
    return width, height, rows


def finished_urls(server, http, n: int) -> list[str]:
    task_id = submit(server, http, {"prompt": f"cats {time.monotonic_ns()}", "n": n}).json()["data"]["task_id"]
    data = poll_until(server, http, task_id, "success")
    assert data["status"] == "success"
    return [r["url"] for r in data["result"]["resources"]]


def test_results_are_real_pngs_different_for_each_task_and_index(server, http):
    urls = finished_urls(server, http, 2) + finished_urls(server, http, 2)
    images = [requests.get(url, timeout=10) for url in urls]
    assert all(i.status_code == 200 and i.headers["Content-Type"] == "image/png" for i in images)
    assert all(decode_png(i.content)[:2] == (8, 8) for i in images)
    assert len({hashlib.sha256(i.content).hexdigest() for i in images}) == 4
    assert requests.get(urls[0], timeout=10).content == images[0].content  # the same URL, the same bytes
    server.result_side = 592  # a 1 MiB image, as the archive's benchmark downloads
    width, height, _ = decode_png(big := requests.get(urls[0], timeout=10).content)
    assert (width, height) == (592, 592) and 1024 * 1024 < len(big) < 1024 * 1024 + 5000


def test_results_expire_result_ttl_after_their_task_ended(server, http):
    (url,) = finished_urls(server, http, 1)
    assert server.result_ttl is None and requests.get(url, timeout=10).status_code == 200  # never, by default
    server.result_ttl = 0
    expired = requests.get(url, timeout=10)
    assert expired.status_code == 403 and b"<Code>AccessDenied</Code>" in expired.content
    assert b"Request has expired" in expired.content

    answer = requests.post(server.url + "/_sandbox/config", json={"result_ttl": 3})
    assert answer.status_code == 200 and answer.json()["result_ttl"] == 3.0 and server.result_ttl == 3.0
    assert stats(server)["result_ttl"] == 3.0
    (fresh,) = finished_urls(server, http, 1)
    ended = time.monotonic()
    assert requests.get(fresh, timeout=10).status_code == 200
    while requests.get(fresh, timeout=10).status_code == 200:  # until its three seconds are up
        assert time.monotonic() - ended < 30
        time.sleep(0.05)
    assert time.monotonic() - ended >= 2.9 - 0.5  # counted from the task's end (the poll saw it up to 0.5 s late)

    for bad in ({"result_ttl": -1}, {"result_ttl": "soon"}, {"result_ttl": 5, "bogus": 1}):
        assert requests.post(server.url + "/_sandbox/config", json=bad).status_code == 400
    assert server.result_ttl == 3.0  # all or nothing
    assert requests.post(server.url + "/_sandbox/config", json={"result_ttl": None}).json()["result_ttl"] is None
    assert requests.get(fresh, timeout=10).status_code == 200  # null: never again


def test_result_urls_refuse_a_key_and_images_that_do_not_exist(server, http):
    (url,) = finished_urls(server, http, 1)
    api_requests = stats(server)["requests"]
    with_key = requests.get(url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=10)
    assert with_key.status_code == 400 and b"Only one auth mechanism allowed" in with_key.content
    assert requests.get(url.replace("/0.png", "/1.png"), timeout=10).status_code == 404  # n was 1
    server.task_seconds = 30
    task_id = submit(server, http).json()["data"]["task_id"]
    assert requests.get(f"{server.url}/results/{task_id}/0.png", timeout=10).status_code == 404  # not finished
    # A task the sandbox never made (the demo's example input image) is served.
    assert decode_png(requests.get(server.url + "/results/example/0.png", timeout=10).content)[:2] == (8, 8)
    s = stats(server)
    assert s["downloads"] == 4 and s["requests"] == api_requests + 1  # the submit: downloads are no API requests


def test_scripted_result_answers(server, http):
    (url,) = finished_urls(server, http, 1)
    server.script(Step(401), Step(503, on="result"), Step("not_image", on="result"), Step("drop", on="result"))
    assert requests.get(url, timeout=10).status_code == 503  # on="any" steps leave downloads alone
    assert submit(server, http).status_code == 401  # and on="result" steps leave the API alone
    page = requests.get(url, timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"] == "image/png"
    assert not page.content.startswith(PNG_MAGIC)
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=10)
    assert requests.get(url, timeout=10).content.startswith(PNG_MAGIC)

    server.script(Step("endless", on="result"))
    with requests.get(url, stream=True, timeout=10) as endless:
        assert "Content-Length" not in endless.headers
        read = 0
        for piece in endless.iter_content(64 * 1024):
            assert read or piece.startswith(PNG_MAGIC)
            read += len(piece)
            if read > 4 * 1024 * 1024:
                break
    assert read > 4 * 1024 * 1024

    for bad in (
        {"answer": "not_image"},  # a download's answer, without on="result"
        {"answer": "endless", "on": "poll"},
        {"answer": "no_task_id", "on": "result"},
        {"answer": "status:failed", "on": "result"},
    ):
        answer = requests.post(server.url + "/_sandbox/script", json={"steps": [bad]})
        assert answer.status_code == 400, bad


# -- account endpoints (modellix-api.md, "Account endpoints") --------------------------


def test_validate_says_whether_the_key_is_valid(server, http):
    url = server.url + "/api/v1/apikey/validate"
    assert http.get(url, timeout=10).json() == {"code": 0, "message": "success", "data": {"is_valid": True}}
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        answer = requests.get(url, headers=headers, timeout=10)
        assert answer.status_code == 200
        assert answer.json()["data"] == {"is_valid": False}
    server.set_faults(reject_key=True)
    assert http.get(url, timeout=10).json()["data"] == {"is_valid": False}


def test_balance_is_settable_and_needs_the_key(server, http):
    url = server.url + "/api/v1/team/balance"
    assert http.get(url, timeout=10).json()["data"] == {"balance": 100.0}
    assert requests.get(url, headers={"Authorization": "Bearer wrong-key"}, timeout=10).status_code == 401
    server.balance = 2.5
    assert http.get(url, timeout=10).json()["data"] == {"balance": 2.5}
    answer = requests.post(server.url + "/_sandbox/config", json={"balance": 0})
    assert answer.status_code == 200 and answer.json()["balance"] == 0
    assert http.get(url, timeout=10).json()["data"] == {"balance": 0}
    assert server.stats()["balance"] == 0
    assert requests.post(server.url + "/_sandbox/config", json={"balance": "lots"}).status_code == 400
    assert requests.post(server.url + "/_sandbox/config", json={"balance": True}).status_code == 400
    assert server.balance == 0


def test_a_task_seconds_range_gives_each_shape_its_base_and_each_task_jitter(server, http):
    from worker.dev.sandbox import JITTER, base_seconds, parse_task_seconds
    from worker.polling.schedule import Shape

    assert parse_task_seconds("2.5") == 2.5 and parse_task_seconds("8-40") == (8.0, 40.0)
    with pytest.raises(ValueError, match="LOW-HIGH"):
        parse_task_seconds("fast")
    answer = http.post(server.url + "/_sandbox/config", json={"task_seconds": [8, 40]}, timeout=10)
    assert answer.json()["task_seconds"] == [8.0, 40.0]
    images = [{"image": "https://img.example/a.png"}]
    made = {
        submit(server, http, body).json()["data"]["task_id"]: body
        for body in [{"prompt": f"p{i}", "n": 2, "image_list": images} for i in range(5)] + [{"prompt": "q"}]
    }
    tasks = http.get(server.url + "/_sandbox/tasks", timeout=10).json()["tasks"]
    seconds = {task_id: tasks[task_id]["finishes"] - tasks[task_id]["created"] for task_id in made}
    for task_id, body in made.items():
        base = base_seconds((8, 40), Shape("1k", body.get("n", 1), len(body.get("image_list", []))))
        assert 8 <= base <= 40 and abs(seconds[task_id] / base - 1) <= JITTER + 1e-9
        assert abs(tasks[task_id]["created"] - time.time()) < 5  # epoch seconds
    shaped = [s for task_id, s in seconds.items() if made[task_id].get("n") == 2]
    assert len(set(shaped)) == 5  # jitter per task
