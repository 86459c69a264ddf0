"""The Modellix client's every path, against the sandbox server over real HTTP."""

from __future__ import annotations

import os
import socket
import time

import pytest

from worker import backoff, modellix
from worker.dev.sandbox import Step
from worker.modellix import ModellixClient

BODY = {"prompt": "a red fox in snow"}


@pytest.fixture
def client(sandbox):
    c = ModellixClient(sandbox.url, sandbox.api_key, read_timeout=5)
    yield c
    c.close()


def test_submit_then_poll_to_success(client, sandbox):
    sandbox.task_seconds = 4.0  # pending for a whole second: seen even on a loaded machine
    submission = client.submit({**BODY, "n": 3})
    assert submission.task_id.startswith("task-") and submission.status == "pending"
    state = client.get_task(submission.task_id)
    assert not state.finished and state.status == "pending"
    time.sleep(sandbox.task_seconds + 0.1)
    state = client.get_task(submission.task_id)
    assert state.succeeded and len(state.result_urls) == 3
    assert all(u.startswith(sandbox.url + "/results/") for u in state.result_urls)


def test_failed_task_carries_its_error(client, sandbox):
    sandbox.set_faults(fail_rate=1.0)
    task_id = client.submit(BODY).task_id
    time.sleep(sandbox.task_seconds + 0.1)
    state = client.get_task(task_id)
    assert state.failed and not state.succeeded
    assert "Generation failed" in state.error_message


@pytest.mark.parametrize(
    "fault, status, cls, retryable",
    [
        ({"rate_429": 1.0, "retry_after": 2.5}, 429, modellix.RateLimited, True),
        ({"rate_500": 1.0}, 500, modellix.ServerError, True),
        ({"rate_503": 1.0}, 503, modellix.ServerError, True),
        ({"reject_key": True}, 401, modellix.AccountError, False),
        ({"no_balance": True}, 402, modellix.AccountError, False),
    ],
)
def test_error_answers_are_typed(client, sandbox, fault, status, cls, retryable):
    sandbox.set_faults(**fault)
    with pytest.raises(cls) as info:
        client.submit(BODY)
    assert info.value.status == status and info.value.retryable is retryable
    assert info.value.message.split(":")[0]  # the API's "<Category>: <detail>" text
    if status == 429:
        assert info.value.retry_after == 2.5
    assert sandbox.stats()["submits"] == 0


def test_bad_request_and_unknown_task(client):
    with pytest.raises(modellix.RequestRejected) as info:
        client.submit({"prompt": ""})
    assert info.value.status == 400 and "prompt" in info.value.message
    with pytest.raises(modellix.NotFound) as info:
        client.get_task("task-missing")
    assert info.value.status == 404 and "task-missing" in info.value.message


def test_wrong_key_is_401_and_never_echoed(sandbox):
    secret = "sk-live-THIS-MUST-NOT-LEAK"
    c = ModellixClient(sandbox.url, secret)
    with pytest.raises(modellix.AccountError) as info:
        c.submit(BODY)
    assert info.value.status == 401
    assert secret not in str(info.value) and secret not in repr(c)


def test_key_is_scrubbed_from_an_answer_that_echoes_it(client, sandbox):
    # A server or proxy that echoes the request's headers must not carry the key into our exceptions.
    sandbox.script(Step("echo"), Step("echo"))
    for call in (lambda: client.submit(BODY), lambda: client.get_task("task-1")):
        with pytest.raises(modellix.RequestRejected) as info:
            call()
        text = str(info.value)
        assert "Bearer ***" in text  # the echo did reach the error text...
        assert sandbox.api_key not in text and sandbox.api_key not in repr(info.value.args)  # ...but not the key


def test_key_is_scrubbed_from_connection_error_text():
    # requests puts the URL in its connection errors; a key in the URL (a proxy path, say) must not follow.
    secret = "sk-in-the-path-123"
    c = ModellixClient(f"http://127.0.0.1:{_closed_port()}/{secret}", secret, connect_timeout=1)
    for call in (lambda: c.submit(BODY), lambda: c.get_task("task-1")):
        with pytest.raises(modellix.NetworkError) as info:
            call()
        assert "/***/api/v1/" in str(info.value) and secret not in str(info.value)


def test_every_request_names_the_client_process(client, sandbox):
    with pytest.raises(modellix.NotFound):
        client.get_task("task-1")
    assert sandbox.requests_log()[-1]["client"].endswith(f"(pid {os.getpid()})")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_connection_refused_is_retryable_even_for_submit():
    c = ModellixClient(f"http://127.0.0.1:{_closed_port()}", "k", connect_timeout=1)
    with pytest.raises(modellix.NetworkError) as info:
        c.submit(BODY)
    assert info.value.retryable  # nothing was sent, so trying again cannot duplicate


def test_read_timeout_on_submit_is_ambiguous_but_on_poll_retryable(client, sandbox):
    task_id = client.submit(BODY).task_id
    sandbox.set_faults(latency=0.6)
    slow = ModellixClient(sandbox.url, sandbox.api_key, read_timeout=0.2)
    with pytest.raises(modellix.AmbiguousSubmit) as info:
        slow.submit(BODY)
    assert not info.value.retryable
    with pytest.raises(modellix.NetworkError):
        slow.get_task(task_id)


def test_dropped_connection_after_a_submit_is_ambiguous(client, sandbox):
    sandbox.script(Step("drop", on="submit"))
    with pytest.raises(modellix.AmbiguousSubmit) as info:
        client.submit(BODY)
    assert not info.value.retryable and info.value.code == "submit_unknown"
    assert sandbox.stats()["submits"] == 1  # the task does exist


def test_dropped_connection_during_a_poll_is_retryable(client, sandbox):
    task_id = client.submit(BODY).task_id
    sandbox.script(Step("drop", on="poll"))
    with pytest.raises(modellix.NetworkError) as info:
        client.get_task(task_id)
    assert info.value.retryable


def test_submit_answered_without_a_task_id_is_ambiguous(client, sandbox):
    sandbox.script(Step("no_task_id"))
    with pytest.raises(modellix.AmbiguousSubmit) as info:
        client.submit(BODY)
    assert info.value.status == 200 and "task_id" in info.value.message


@pytest.mark.parametrize("status", [403, 405, 413, 415, 422])
def test_a_safe_rejection_of_a_submit_is_a_rejection(client, sandbox, status):
    sandbox.script(Step(status, on="submit"))
    with pytest.raises(modellix.RequestRejected) as info:
        client.submit(BODY)
    assert info.value.status == status and not info.value.retryable


@pytest.mark.parametrize("status", [408, 409, 410])
def test_any_other_4xx_to_a_submit_is_an_unknown_outcome_but_to_a_poll_a_rejection(client, sandbox, status):
    task_id = client.submit(BODY).task_id
    sandbox.script(Step(status, on="submit"))
    with pytest.raises(modellix.AmbiguousSubmit) as info:
        client.submit(BODY)
    assert info.value.status == status and info.value.stored_code == "submit_unknown"
    sandbox.script(Step(status, on="poll"))
    with pytest.raises(modellix.RequestRejected):
        client.get_task(task_id)


def test_poll_answered_for_another_task_is_a_protocol_error(client, sandbox):
    task_id = client.submit(BODY).task_id
    sandbox.script(Step("wrong_task_id"))
    with pytest.raises(modellix.ProtocolError) as info:
        client.get_task(task_id)
    assert info.value.retryable and task_id in info.value.message


def test_result_urls_are_parsed_tolerantly():
    assert modellix.result_urls({"result": {"resources": ["https://a/1.png", {"url": "http://b/2.png"}]}}) == [
        "https://a/1.png",
        "http://b/2.png",
    ]
    assert modellix.result_urls({"resources": [{"url": "https://old/x.png", "type": "image"}]}) == ["https://old/x.png"]
    assert modellix.result_urls({"result": {"resources": ["ftp://x/y", "javascript:alert(1)", 7, None]}}) == []


@pytest.mark.parametrize(
    "status, finished, succeeded",
    [
        ("SUCCESS", True, True),
        ("completed", True, True),
        ("Succeeded", True, True),
        ("failed", True, False),
        ("Cancelled", True, False),
        ("canceled", True, False),
        ("error", True, False),
        ("pending", False, False),
        ("rendering", False, False),
    ],
)
def test_status_mapping(status, finished, succeeded):
    state = modellix.TaskState("t", status, {})
    assert (state.finished, state.succeeded) == (finished, succeeded)


def test_retry_after_parsing():
    assert backoff.parse_retry_after("3") == 3.0
    assert backoff.parse_retry_after("0.25") == 0.25
    assert backoff.parse_retry_after(None) is None
    assert backoff.parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= backoff.parse_retry_after(future) <= 31


def test_an_error_page_instead_of_json_is_a_server_error_with_its_status(client, sandbox):
    sandbox.script(Step("html"))
    with pytest.raises(modellix.ServerError) as info:
        client.submit(BODY)
    assert info.value.status == 502 and info.value.message.startswith("HTTP 502: <html>")
    assert sandbox.stats()["submits"] == 0


def test_without_a_key_error_texts_are_left_as_they_are(sandbox):
    c = ModellixClient(sandbox.url, "")
    with pytest.raises(modellix.AccountError) as info:
        c.submit(BODY)
    assert info.value.message == "Unauthorized: invalid or missing API key"


def test_a_retry_after_date_in_the_past_means_now():
    past = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() - 30))
    assert backoff.parse_retry_after(past) == 0.0
