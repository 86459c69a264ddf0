"""Signed webhook delivery, one attempt at a time: no Celery, no database here.

A job's event goes to its `webhook` URL as a JSON POST signed per the
Standard Webhooks specification, so its public verification libraries
(`standardwebhooks` on PyPI and npm, and others) check it unchanged:

    webhook-id:        the event's id, the same on every retry (receivers dedupe on it)
    webhook-timestamp: this attempt's unix time in seconds (verifiers allow 5 minutes)
    webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">

keyed with the base64-decoded part of KLING_WEBHOOK_SECRET (`whsec_<base64>`).

This module makes one attempt and says what came of it (`Attempt`); the
caller keeps the outbox, schedules the next attempt (`next_attempt_delay`)
and stops (`give_up`). What an answer means, after the specification's
"delivery success and failure":

| answer                                    | ok  | retryable |
|-------------------------------------------|-----|-----------|
| 2xx                                       | yes |           |
| 410 Gone: the receiver wants no more      | no  | no        |
| any other status, 3xx and 4xx included    | no  | yes       |
| no answer: refused, dropped, timed out    | no  | yes       |
| a URL requests cannot send to             | no  | no        |

Every non-2xx is retried (the issue's rule, and the specification's): a 4xx
from a receiver is usually a deployment or configuration problem on its side
(a route not deployed yet, a secret being rotated) that is fixed within the
retry window, and the event has no other way to reach it; a few dozen small
POSTs over a day cost nothing. Only 410 is the receiver's explicit "stop".

Redirects are not followed (a 3xx is a failure, as the specification says):
following one would let a receiver bounce a signed event to a host the
allow-list never saw. The answer's body is never read: a receiver cannot hold
a worker thread by trickling one, and its size does not matter.

The secret never appears in a repr or an error text, and this module logs
nothing. The session is the caller's and must not be the Modellix client's
(its headers carry the API key); `send` drops an Authorization header set on
the session all the same. Credentials in the webhook URL itself
(`https://user:pass@…`) are the receiver's and are sent as Basic auth.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from urllib3.util import parse_url

from worker.backoff import Jitter, delay, parse_retry_after
from worker.formats import checked_key, webhook_key

# The first retry comes at most this many seconds after a failed first attempt (5-10 s with the jitter).
FIRST_RETRY = 10.0
# Retries never wait longer than this: with FIRST_RETRY doubling, reached at the 10th attempt
# (about 1.4 h in), then a try every 30-60 minutes; about 40 attempts in 24 h.
MAX_DELAY = 3600.0
# A status the receiver sends to say "stop sending": the event is not retried.
GONE = 410
# The specification warns that an id containing "." could be re-split into another
# (id, timestamp) pair under the same signature: ids are kept to a plain alphabet.
_MSG_ID = re.compile(r"[A-Za-z0-9_:-]{1,128}")
_USER_AGENT = "kling-worker/webhooks"


class WebhookSecret:
    """The HMAC key from `whsec_<base64>`; its repr and str say only that it is one."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        self._key = checked_key(key)

    @classmethod
    def parse(cls, text: str) -> WebhookSecret:
        """Parse `whsec_<base64>` (worker.formats); the error message never contains the text."""
        return cls(webhook_key(text))

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The `webhook-signature` value for this id, timestamp and exact body: `v1,<base64>`."""
        if not _MSG_ID.fullmatch(msg_id):
            raise ValueError(f"a webhook id is 1-128 characters of [A-Za-z0-9_:-], not {msg_id!r}")
        digest = hmac.new(self._key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode("ascii")

    def __repr__(self) -> str:
        return "WebhookSecret(***)"

    __str__ = __repr__


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt came to. `status` is None when no answer came back;
    `retry_after` is the receiver's Retry-After in seconds, if it sent one."""

    ok: bool
    status: int | None
    error: str | None
    retryable: bool
    retry_after: float | None = None


def encode(event: Mapping[str, Any]) -> bytes:
    """An event as the body to send: compact JSON, ASCII only (so every verifier reads the same text)."""
    return json.dumps(event, separators=(",", ":")).encode("ascii")


def refused(url: str, secret: str, allowed_hosts: frozenset[str] | None) -> str | None:
    """None if this fleet may send events to `url`, else why not: it needs a secret
    (KLING_WEBHOOK_SECRET, as configured), as events are only sent signed, and a URL check_url accepts.
    Asked when a job asks for the webhook, and again when its event is sent."""
    if not secret:
        return "this service has no KLING_WEBHOOK_SECRET, and events are only sent signed"
    return check_url(url, allowed_hosts)


def check_url(url: str, allowed_hosts: frozenset[str] | None) -> str | None:
    """None if `url` may receive webhooks, else why not. `allowed_hosts`: lower-case
    host names (KLING_WEBHOOK_HOSTS); None allows any host."""
    if any(ch <= " " or ch in "\\\x7f" for ch in url):
        # urllib and urllib3 read a backslash or stray whitespace differently: what one
        # takes as the host, the other may not. Such a URL is never a real endpoint.
        return "the URL contains whitespace, a control character or a backslash"
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        return f"only http and https URLs are accepted, not {scheme or 'a URL without a scheme'}"
    if not urlsplit(url).hostname:
        return "the URL has no host"
    # The host as requests will connect to it: the same preparation send() goes through.
    prepared = requests.PreparedRequest()
    try:
        prepared.prepare_url(url, None)
    except (requests.RequestException, ValueError):
        return "the URL is not valid (its host or port cannot be parsed)"
    host = (parse_url(prepared.url or "").host or "").strip("[]").lower().rstrip(".")
    if not host:
        return "the URL has no host"
    if allowed_hosts is not None and host not in allowed_hosts:
        return f"the host {host!r} is not in KLING_WEBHOOK_HOSTS"
    return None


def send(
    session: requests.Session,
    url: str,
    msg_id: str,
    body: bytes,
    secret: WebhookSecret,
    timeout: tuple[float, float],
    now: float | None = None,
) -> Attempt:
    """POST `body` to `url` once, signed for `msg_id` at `now` (default: the current time).

    `body` is sent and signed byte for byte (see `encode`). Raises ValueError for an
    id the signature scheme cannot carry; every network outcome is an Attempt.
    """
    timestamp = int(time.time() if now is None else now)
    headers: dict[str, str | None] = {
        "Content-Type": "application/json",
        "User-Agent": _USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": secret.sign(msg_id, timestamp, body),
        # None drops a session-level header: whatever session this is, no API key leaves with the event.
        "Authorization": None,
    }
    connect, read = timeout
    try:
        # stream=True: only the status line and headers are read, never the body.
        with session.post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False, stream=True
        ) as response:
            return _judge(response)
    except requests.ConnectTimeout:
        return Attempt(False, None, f"no connection within {connect:g}s", True)
    except requests.Timeout:
        return Attempt(False, None, f"no answer within {read:g}s", True)
    except requests.ConnectionError as exc:
        return Attempt(False, None, f"connection failed: {_reason(exc)}", True)
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema):
        return Attempt(False, None, "the URL cannot be sent to (see check_url)", False)
    except requests.RequestException as exc:
        return Attempt(False, None, f"request failed: {type(exc).__name__}", True)


def next_attempt_delay(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 = the first delivery).

    Exponential backoff with jitter: attempt 1 waits 5-10 s, each next one up to twice
    as long, at most MAX_DELAY (30-60 min). The jitter spreads the retries of many events
    that failed together (a receiver's outage) so they do not all come back at once.
    A receiver's Retry-After is a floor, itself capped at MAX_DELAY.
    """
    if attempt < 1:
        raise ValueError(f"attempts are numbered from 1, not {attempt}")
    floor = min(retry_after or 0.0, MAX_DELAY)
    return delay(attempt, base=FIRST_RETRY, cap=MAX_DELAY, jitter=Jitter.equal, at_least=floor)


def give_up(first_attempt_at: float, now: float, retry_for: float) -> bool:
    """True once `retry_for` seconds (KLING_WEBHOOK_RETRY_FOR) have passed since the
    first attempt: no further attempt is made. Unix times in seconds."""
    return now - first_attempt_at >= retry_for


def _judge(response: requests.Response) -> Attempt:
    status = response.status_code
    if 200 <= status < 300:
        return Attempt(True, status, None, False)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if status == GONE:
        return Attempt(False, status, "answered 410 Gone: the receiver wants no more deliveries", False, retry_after)
    if 300 <= status < 400:
        error = f"answered {status}, a redirect, not followed: the webhook URL must be the final one"
    else:
        error = f"answered {status}"
    return Attempt(False, status, error, True, retry_after)


def _reason(exc: BaseException) -> str:
    """The root cause of a connection error, without the URL (it can carry credentials)."""
    seen: set[int] = set()
    cause: BaseException = exc
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "reason", None) or (cause.args[0] if cause.args else None)
        if isinstance(inner, BaseException):
            cause = inner
        elif len(cause.args) > 1 and isinstance(cause.args[1], BaseException):
            cause = cause.args[1]  # urllib3's ProtocolError("Connection aborted.", the cause)
        elif cause.__context__ is not None:
            cause = cause.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return type(cause).__name__
