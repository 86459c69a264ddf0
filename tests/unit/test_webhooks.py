"""Webhook delivery over real HTTP to a receiver that verifies with the public `standardwebhooks` package."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import threading
import time

import pytest
import requests
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from worker.config import Settings
from worker.dev.receiver import WebhookReceiver
from worker.results import webhooks
from worker.results.webhooks import Attempt, WebhookSecret, check_url, give_up, next_attempt_delay, send

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BODY = webhooks.encode({"type": "job.succeeded", "data": {"job_id": "order-1", "result_urls": ["https://x/1.png"]}})
TIMEOUT = (2.0, 5.0)


@pytest.fixture
def receiver():
    with WebhookReceiver(SECRET) as r:
        yield r


@pytest.fixture
def session():
    with requests.Session() as s:
        yield s


def deliver(session, url, msg_id="msg_1", body=BODY, secret=SECRET, timeout=TIMEOUT, now=None) -> Attempt:
    return send(session, url, msg_id, body, WebhookSecret.parse(secret), timeout, now=now)


# Signing


def test_the_signature_matches_the_specifications_published_example():
    # The test vector of the standardwebhooks libraries (an independent computation of the scheme).
    secret = WebhookSecret.parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_delivery_verifies_with_the_standardwebhooks_library(receiver, session):
    attempt = deliver(session, receiver.url("/hooks/kling"), msg_id="msg_job-1")
    assert attempt == Attempt(ok=True, status=200, error=None, retryable=False)
    (delivery,) = receiver.deliveries()
    assert delivery.verified, delivery.error
    assert delivery.path == "/hooks/kling" and delivery.body == BODY
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["webhook-id"] == "msg_job-1"
    assert delivery.headers["webhook-signature"].startswith("v1,")
    # What a receiver's own code would do with it: the library hands back the event.
    assert Webhook(SECRET).verify(delivery.body, delivery.headers)["data"]["job_id"] == "order-1"


def test_the_timestamp_is_the_attempts_time_in_unix_seconds(receiver, session):
    before = int(time.time())
    deliver(session, receiver.url())
    stamp = receiver.deliveries()[0].headers["webhook-timestamp"]
    assert stamp.isdigit() and before <= int(stamp) <= time.time()


def test_a_wrong_secret_fails_verification(receiver, session):
    attempt = deliver(session, receiver.url(), secret=OTHER_SECRET)
    (delivery,) = receiver.deliveries()
    assert not delivery.verified and "No matching signature" in (delivery.error or "")
    # The receiver refuses it, which to the sender is a failure like any other non-2xx.
    assert attempt == Attempt(ok=False, status=401, error="answered 401", retryable=True)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(delivery.body, delivery.headers)


def test_a_changed_body_or_id_fails_verification(receiver, session):
    deliver(session, receiver.url(), msg_id="msg_a")
    headers = receiver.deliveries()[0].headers
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY.replace(b"order-1", b"order-2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, {**headers, "webhook-id": "msg_b"})


def test_retries_carry_the_same_id_and_a_fresh_timestamp(receiver, session):
    receiver.fail_next(2, how="500")
    start = time.time() - 120  # inside the verifiers' 5-minute tolerance
    attempts = [deliver(session, receiver.url(), msg_id="msg_retried", now=start + k * 60) for k in range(3)]
    assert [a.status for a in attempts] == [500, 500, 200] and [a.ok for a in attempts] == [False, False, True]
    deliveries = receiver.deliveries()
    assert [d.headers["webhook-id"] for d in deliveries] == ["msg_retried"] * 3
    assert [int(d.headers["webhook-timestamp"]) for d in deliveries] == [int(start + k * 60) for k in range(3)]
    assert all(d.verified for d in deliveries)  # each attempt is signed for its own timestamp


def test_an_old_timestamp_is_refused_by_verifiers(receiver, session):
    # `now` is what gets signed: an attempt must be signed when it is sent, not when the event was made.
    attempt = deliver(session, receiver.url(), now=time.time() - 600)
    assert attempt.status == 401 and "too old" in (receiver.deliveries()[0].error or "")


def test_no_authorization_header_leaves_with_an_event(receiver, session):
    session.headers["Authorization"] = "Bearer sk-modellix-key"  # as the Modellix client's session has
    assert deliver(session, receiver.url()).ok
    assert "authorization" not in receiver.deliveries()[0].headers


def test_an_id_with_a_dot_is_refused_before_sending(receiver, session):
    # The specification: a "." in the id would let one signature be re-split into another id and timestamp.
    for bad in ("job.1", "", "a" * 129, "msg 1", "msg\n1"):
        with pytest.raises(ValueError, match="webhook id"):
            deliver(session, receiver.url(), msg_id=bad)
    assert receiver.deliveries() == []


# Failures


def test_a_2xx_other_than_200_is_a_success(receiver, session):
    receiver.fail_next(1, how="204")
    assert deliver(session, receiver.url()) == Attempt(ok=True, status=204, error=None, retryable=False)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504])
def test_every_other_status_but_410_is_retried(receiver, session, status):
    receiver.fail_next(1, how=str(status))
    attempt = deliver(session, receiver.url())
    assert attempt == Attempt(ok=False, status=status, error=f"answered {status}", retryable=True)


def test_410_gone_stops_the_retries(receiver, session):
    receiver.fail_next(1, how="410")
    attempt = deliver(session, receiver.url())
    assert (attempt.ok, attempt.status, attempt.retryable) == (False, 410, False)
    assert "Gone" in (attempt.error or "")


def test_a_retry_after_is_reported_and_floors_the_next_delay(receiver, session):
    receiver.fail_next(1, how="429", headers={"Retry-After": "120"})
    attempt = deliver(session, receiver.url())
    assert (attempt.status, attempt.retryable, attempt.retry_after) == (429, True, 120.0)
    assert next_attempt_delay(1, attempt.retry_after) == 120.0
    assert next_attempt_delay(1, 10 * 86400) == webhooks.MAX_DELAY  # a receiver cannot park an event for days


def test_a_redirect_is_not_followed(receiver, session):
    receiver.fail_next(1, how="307", path="/old", headers={"Location": receiver.url("/new")})
    attempt = deliver(session, receiver.url("/old"))
    assert (attempt.ok, attempt.status, attempt.retryable) == (False, 307, True)
    assert "redirect" in (attempt.error or "")
    assert [d.path for d in receiver.deliveries()] == ["/old"]  # send() returned: nothing went to /new


def test_a_dropped_connection_is_retryable(receiver, session):
    receiver.fail_next(1, how="drop")
    attempt = deliver(session, receiver.url())
    assert (attempt.ok, attempt.status, attempt.retryable) == (False, None, True)
    assert (attempt.error or "").startswith("connection failed: ")
    assert receiver.deliveries()[0].verified  # it did arrive: the receiver dedupes the retry on webhook-id
    assert deliver(session, receiver.url()).ok  # and the next attempt goes through


def test_a_refused_connection_is_retryable(session):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    attempt = deliver(session, f"http://127.0.0.1:{port}/hook")
    assert attempt == Attempt(ok=False, status=None, error="connection failed: connection refused", retryable=True)


def test_a_receiver_slower_than_the_read_timeout_is_retryable(receiver, session):
    receiver.fail_next(1, how="slow", delay=5.0)
    started = time.monotonic()
    attempt = deliver(session, receiver.url(), timeout=(2.0, 0.5))
    assert time.monotonic() - started < 3.0  # the read timeout ended it, not the receiver's answer
    assert attempt == Attempt(ok=False, status=None, error="no answer within 0.5s", retryable=True)
    assert receiver.deliveries()[0].verified


def test_errors_never_hold_the_secret_or_the_urls_credentials(receiver, session):
    secret_text = SECRET[len("whsec_") :]
    receiver.fail_next(1, how="drop")
    attempt = deliver(session, receiver.url().replace("http://", "http://user:pw-123@"))
    assert attempt.error and "pw-123" not in attempt.error and secret_text not in attempt.error


def test_the_answers_body_is_not_read(session):
    # A receiver that sends its headers and then trickles its body: send() does not wait for it.
    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nx")
            done.wait(10)  # the rest never comes

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    started = time.monotonic()
    attempt = deliver(session, f"http://127.0.0.1:{server.getsockname()[1]}/hook", timeout=(2.0, 1.0))
    elapsed = time.monotonic() - started
    done.set()
    thread.join()
    server.close()
    assert attempt.ok and elapsed < 1.0  # reading the body would have ended in the 1 s read timeout


# check_url


@pytest.mark.parametrize(
    "url, allowed, reason",
    [
        ("https://hooks.example.com/kling", None, None),
        ("http://127.0.0.1:8080/x", None, None),
        ("https://Hooks.Example.COM./kling", frozenset({"hooks.example.com"}), None),  # case, FQDN dot
        ("https://user:pw@hooks.example.com/k?t=1", frozenset({"hooks.example.com"}), None),
        ("https://[::1]:8443/k", frozenset({"::1"}), None),
        ("ftp://hooks.example.com/x", None, "only http and https URLs are accepted, not ftp"),
        ("file:///etc/passwd", None, "only http and https URLs are accepted, not file"),
        ("hooks.example.com/x", None, "only http and https URLs are accepted, not a URL without a scheme"),
        ("https:///kling", None, "the URL has no host"),
        ("https://:443/kling", None, "the URL has no host"),
        ("https://hooks.example.com:99999/", None, "the URL is not valid (its host or port cannot be parsed)"),
        ("https://evil.example/kling", frozenset({"hooks.example.com"}), "the host 'evil.example' is not in"),
        ("https://hooks.example.com.evil.example/", frozenset({"hooks.example.com"}), "is not in"),
        ("https://hooks.example.com@evil.example/", frozenset({"hooks.example.com"}), "'evil.example' is not in"),
        # urllib takes evil.example for the host here, requests good.example: refused outright.
        ("http://good.example\\@evil.example/", None, "backslash"),
        ("http://good.example /x", None, "whitespace"),
    ],
)
def test_check_url(url, allowed, reason):
    found = check_url(url, allowed)
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found, found


def test_check_url_reads_the_host_as_requests_connects_to_it():
    # The allow-list is matched against the host the request goes to, not a second parser's reading.
    allowed = frozenset({"good.example"})
    assert check_url("http://good.example/hook", allowed) is None
    assert check_url("http://good.example#@evil.example/", allowed) is None  # the fragment holds "@evil…"
    assert check_url("http://x@evil.example#@good.example/", allowed) is not None


# The secret


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "must start with 'whsec_'"),
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with 'whsec_'"),
        ("whsk_" + "A" * 40, "must start with 'whsec_'"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2La-aSw", "standard base64"),  # URL-safe alphabet
        ("whsec_MfKQ9r8GKYqr TwjUPD8ILPZIo2LaLaSw", "standard base64"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwQ", "standard base64"),  # a length no base64 has
        ("whsec_" + base64.b64encode(b"k" * 23).decode(), "24-64 bytes, not 23"),
        ("whsec_" + base64.b64encode(b"k" * 65).decode(), "24-64 bytes, not 65"),
        ("whsec_", "24-64 bytes, not 0"),
    ],
)
def test_a_malformed_secret_is_refused_without_echoing_it(text, reason):
    with pytest.raises(ValueError, match=reason) as caught:
        WebhookSecret.parse(text)
    body = text[len("whsec_") :] if text.startswith("whsec_") else text
    assert (body or "\x00") not in str(caught.value)
    # Nor in a chained exception a traceback would print (binascii's error, say).
    assert caught.value.__cause__ is None and (caught.value.__context__ is None or caught.value.__suppress_context__)


def test_unpadded_secrets_parse_like_the_verifiers_read_them():
    key = os.urandom(32)  # 43 base64 characters without its "="
    unpadded = "whsec_" + base64.b64encode(key).decode().rstrip("=")
    signature = WebhookSecret.parse(unpadded).sign("msg_1", 1700000000, b"{}")
    assert signature == WebhookSecret(key).sign("msg_1", 1700000000, b"{}")


def test_the_secret_shows_in_no_repr():
    secret = WebhookSecret.parse(SECRET)
    body = SECRET[len("whsec_") :]
    key = base64.b64decode(body)
    # The key in every spelling a repr could give it: its base64, its bytes' repr, hex and text.
    spellings = {body, repr(key), key.hex(), key.decode("latin-1"), str(list(key))[1:-1]}
    for text in (repr(secret), str(secret), f"{secret}", repr([secret]), format(secret, "")):
        assert "whsec" not in text
        assert not [shown for shown in spellings if shown in text or shown[:12] in text]
    assert not hasattr(secret, "__dict__")  # vars() cannot list it either


def test_settings_validate_the_secret_without_echoing_it(monkeypatch):
    bad = "whsec_" + base64.b64encode(b"s" * 10).decode()
    with pytest.raises(ValueError, match="KLING_WEBHOOK_SECRET: .* not 10") as caught:
        Settings(webhook_secret=bad)
    assert bad[6:] not in str(caught.value)
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", SECRET + "\n")  # a trailing newline from a secrets file
    settings = Settings()
    assert settings.webhook_secret == SECRET and SECRET[6:] not in repr(settings)


def test_webhook_settings_from_the_environment(monkeypatch):
    defaults = Settings()
    assert (defaults.webhook_secret, defaults.webhook_hosts) == ("", None)
    assert (defaults.webhook_retry_for, defaults.webhook_timeout) == (86400.0, (5.0, 15.0))
    monkeypatch.setenv("KLING_WEBHOOK_HOSTS", " Hooks.Example.com, b.example.,, ")
    monkeypatch.setenv("KLING_WEBHOOK_RETRY_FOR", "3600")
    monkeypatch.setenv("KLING_WEBHOOK_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("KLING_WEBHOOK_READ_TIMEOUT", "20")
    settings = Settings()
    assert settings.webhook_hosts == frozenset({"hooks.example.com", "b.example"})
    assert (settings.webhook_retry_for, settings.webhook_timeout) == (3600.0, (2.0, 20.0))
    assert check_url("https://HOOKS.example.com/x", settings.webhook_hosts) is None
    monkeypatch.setenv("KLING_WEBHOOK_HOSTS", " , ")
    assert Settings().webhook_hosts is None
    with pytest.raises(ValueError, match="KLING_WEBHOOK_RETRY_FOR"):
        Settings(webhook_retry_for=-1)
    with pytest.raises(ValueError, match="KLING_WEBHOOK_CONNECT_TIMEOUT"):
        Settings(webhook_timeout=(0.0, 10.0))


# Backoff


def test_the_first_retry_comes_within_10_seconds():
    delays = [next_attempt_delay(1) for _ in range(200)]
    assert all(5.0 <= d <= 10.0 for d in delays)


def test_retries_double_up_to_an_hour_with_jitter():
    for attempt, ceiling in ((1, 10), (2, 20), (3, 40), (6, 320), (9, 2560), (10, 3600), (40, 3600), (10**6, 3600)):
        delays = [next_attempt_delay(attempt) for _ in range(100)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 90  # jittered: events that failed together do not come back together
    with pytest.raises(ValueError):
        next_attempt_delay(0)


def test_a_day_of_retries_is_a_few_dozen_attempts():
    random.seed(8)
    elapsed, attempts = 0.0, 1
    while not give_up(0.0, elapsed, 86400.0):
        elapsed += next_attempt_delay(attempts)
        attempts += 1
    assert 30 <= attempts <= 55  # retried all day (the spec asks for a schedule of days at most), not hammered


def test_give_up_after_retry_for():
    assert not give_up(1000.0, 1000.0, 86400.0)
    assert not give_up(1000.0, 1000.0 + 86399.9, 86400.0)
    assert give_up(1000.0, 1000.0 + 86400.0, 86400.0)
    assert give_up(1000.0, 1000.0 + 1.0, 0.0)  # KLING_WEBHOOK_RETRY_FOR=0: one attempt only


def test_encode_is_compact_ascii_json():
    body = webhooks.encode({"type": "job.failed", "data": {"message": "café"}})
    assert body == b'{"type":"job.failed","data":{"message":"caf\\u00e9"}}'
    assert json.loads(body)["data"]["message"] == "café"
