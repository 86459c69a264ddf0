"""A real webhook receiver for tests and bench/delivery.py: verifies with the public `standardwebhooks`
package (the `test` extra).

    with WebhookReceiver("whsec_...") as r:
        r.fail_next(2, how="500")             # the next 2 deliveries, to any path, answer 500
        r.fail_next(1, how="drop", path="/a")  # the next one to /a loses its connection
        send(session, r.url("/a"), ...)
        r.wait_for(1, timeout=5)               # the deliveries so far, once there are 1
        r.deliveries("/a")[0].verified

Each delivery is recorded (headers, body, whether the `standardwebhooks`
library verified it, what was answered) before it is answered, so a test
can count deliveries whose answer the client never waited for. A delivery
that verifies is answered 200, one that does not 401, unless a failure
was queued with `fail_next`: "500" or any other status ("302" adds a
Location header), "drop" (the connection closes without an answer) or
"slow" (the answer comes `delay` seconds late, past a client's timeout).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    verified: bool
    error: str | None  # why verification failed
    how: str  # "ok", "drop", "slow" or the failure status queued with fail_next
    status: int | None  # the status answered (for "slow", once the delay is over); None when dropped
    received_at: float  # time.time()


@dataclass(frozen=True)
class _Failure:
    how: str
    delay: float
    headers: dict[str, str]


class WebhookReceiver:
    def __init__(self, secret: str | None):
        self._webhook = Webhook(secret) if secret else None
        self._lock = threading.Condition()
        self._deliveries: list[Delivery] = []
        self._failures: dict[str | None, collections.deque[_Failure]] = collections.defaultdict(collections.deque)
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits for it, on every test's exit.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="webhook-receiver", daemon=True
        )

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()  # "slow" handlers stop waiting
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def fail_next(
        self,
        n: int,
        how: str = "500",
        *,
        path: str | None = None,
        delay: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next `n` deliveries to `path` (None: to any path) fail `how`: "500" or another
        status, "drop" or "slow" (answered after `delay` s); `headers` go with a status."""
        if how not in ("drop", "slow") and not (how.isdigit() and 100 <= int(how) <= 599):
            raise ValueError(f"how is 'drop', 'slow' or an HTTP status, not {how!r}")
        with self._lock:
            self._failures[path].extend(_Failure(how, delay, dict(headers or {})) for _ in range(n))

    def deliveries(self, path: str | None = None) -> list[Delivery]:
        with self._lock:
            return [d for d in self._deliveries if path is None or d.path == path]

    def wait_for(self, count: int, timeout: float = 10.0, path: str | None = None) -> list[Delivery]:
        """The deliveries (to `path`) once there are at least `count`; AssertionError after `timeout`."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.deliveries(path)) >= count, timeout):
                raise AssertionError(f"{len(self.deliveries(path))} deliveries after {timeout}s, expected {count}")
            return self.deliveries(path)

    def _next_failure(self, path: str) -> _Failure | None:
        for key in (path, None):
            if self._failures[key]:
                return self._failures[key].popleft()
        return None

    def _verify(self, body: bytes, headers: dict[str, str]) -> str | None:
        if self._webhook is None:
            return "the receiver has no secret"
        try:
            self._webhook.verify(body, headers, json_parse=False)
        except Exception as exc:  # WebhookVerificationError, or a header that does not even parse
            return f"{type(exc).__name__}: {exc}"
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                error = receiver._verify(body, headers)
                with receiver._lock:
                    failure = receiver._next_failure(self.path)
                    how = failure.how if failure else "ok"
                    if how == "drop":
                        status = None
                    elif how in ("ok", "slow"):
                        status = 200 if error is None else 401
                    else:
                        status = int(how)
                    receiver._deliveries.append(
                        Delivery(self.path, headers, body, error is None, error, how, status, time.time())
                    )
                    receiver._lock.notify_all()
                if status is None:
                    self.close_connection = True
                    return  # nothing written: the client sees the connection close
                if how == "slow" and failure and receiver._closing.wait(failure.delay):
                    return
                extra = failure.headers if failure else {}
                if 300 <= status < 400 and "Location" not in extra:
                    extra = {**extra, "Location": self.path.rstrip("/") + "/moved"}
                try:
                    self.send_response(status)
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # a "slow" answer's client has given up: that was the point

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the deliveries are the record

        return Handler
