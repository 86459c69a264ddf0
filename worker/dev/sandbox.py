"""A sandbox Modellix server: the API contract of shared/modellix-api.md, with faults on demand.

Tests, the demo and the benchmarks run against it; nothing here talks to the
real API. Requests are validated with the project's own schemas. Control
endpoints under /_sandbox/ let another process read counters and set faults.

Two kinds of faults: `Faults` are shares and switches that apply to every
request (load tests), and a *script* of `Step`s answers the next matching
requests in order (tests that must know exactly which request fails).
Every API request is logged with its time, its client (the User-Agent, which
kling-worker's client sets per process) and its answer, so a test can see
what each worker did and when (`/_sandbox/requests`).

Result images are served at `/results/<task_id>/<k>.png` without a key, like
the signed URLs the real API returns: a real PNG, different for each task and
index, that expires (403, as an expired signed URL) `result_ttl` seconds after
its task finished. A download that carries an Authorization header is refused
with a 400, as S3 refuses a presigned URL sent with a second credential. They
are not API requests: a script step reaches them only with `on="result"`.

A task takes `task_seconds`: a number (every task alike), or a range
(lo, hi), "8-40" on the command line, where each request shape (resolution,
n, input images: worker.polling.schedule.Shape) gets its own base duration, fixed
within the range by a hash of the shape (`base_seconds`), and each task that
base ±JITTER (so a task may end up to 15 % outside the range). When each task
was created and finishes is at `/_sandbox/tasks`, in epoch seconds.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import struct
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from worker.config import DEFAULT_SUBMIT_PATH
from worker.polling.schedule import Shape, shape_of
from worker.schemas import GenerationRequestSchema

# Ours (configurable in the worker) and the newer documented one (modellix-api.md).
SUBMIT_PATHS = (DEFAULT_SUBMIT_PATH, "/api/v1/kling/kling-image-o1/async")
MODEL_ID = "kling-image-o1"
_TASK = re.compile(r"^/api/v1/tasks/([^/]+)$")
_RESULT = re.compile(r"^/results/([^/]+)/(\d+)\.png$")
VALIDATE_PATH = "/api/v1/apikey/validate"
BALANCE_PATH = "/api/v1/team/balance"
_ARRIVALS_KEPT = 200_000  # enough for max_requests_per_second at any rate a benchmark reaches

Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, JSON body, extra headers
# A status of DROP tells the HTTP handler to close the connection without answering;
# HTML, to answer 502 with the body's "page" as text/html; ENDLESS, to stream a
# result image that never ends (chunked, no Content-Length).
DROP = -1
HTML = -2
ENDLESS = -3
# Scripted answers besides plain HTTP error statuses (see Step).
SPECIAL = ("drop", "no_task_id", "wrong_task_id", "no_results", "echo", "html", "not_image", "endless")
# What a step with on="result" may answer a result download, besides an HTTP error status.
RESULT_ANSWERS = ("drop", "not_image", "endless")
# An endless result stops here all the same, so a client that keeps reading cannot fill a disk.
ENDLESS_CAP = 256 * 1024 * 1024
# A task of a shape takes its base duration times 1 ± up to this (task_seconds as a range).
JITTER = 0.15

TaskSeconds = float | tuple[float, float]


def parse_task_seconds(text: str) -> TaskSeconds:
    """ "2.5" (every task) or "8-40" (a range across request shapes)."""
    lo, sep, hi = text.partition("-")
    try:
        if not sep:
            return _number("task_seconds", float(text))
        low, high = _number("task_seconds", float(lo)), _number("task_seconds", float(hi))
    except ValueError:
        raise ValueError(f"task_seconds must be a number of seconds or a range LOW-HIGH, not {text!r}") from None
    if low > high:
        raise ValueError(f"task_seconds range {text!r}: LOW must not exceed HIGH")
    return (low, high)


def base_seconds(span: tuple[float, float], shape: Shape) -> float:
    """A shape's base duration within `span`: the same in every sandbox, spread by a hash of the shape."""
    digest = hashlib.blake2b(f"{shape.resolution}/{shape.n}/{shape.images}".encode(), digest_size=8).digest()
    share = int.from_bytes(digest, "big") / 2**64
    return span[0] + share * (span[1] - span[0])


@dataclass
class Step:
    """One scripted answer, used by the next `times` API requests that match `on`.

    `answer` is an HTTP error status (401, 402, 404, 429, 500, 503 ...) given in
    the API's error shape, or one of:
    - "drop": the request is carried out (a submit creates its task), then the
      connection is closed without an answer: the worst case of a lost answer;
    - "no_task_id": a submit answered 200 without a task id (the task exists);
    - "wrong_task_id": a poll answered with another task's id;
    - "no_results": a poll answered `success` with no result;
    - "echo": a 400 whose message echoes the request's headers, as a careless
      proxy might: the key reaches the client's error text unless it scrubs it;
    - "html": a 502 with an HTML page instead of the API's JSON, as a proxy in front of it sends;
    - "status:WORD": a poll answered with the task status WORD;
    and for a result download (on="result" only, which "any" does not include):
    an HTTP error status, "drop", "not_image" (a 200 whose body is an HTML page
    although its Content-Type says image/png) or "endless" (a 200 PNG that never
    ends, chunked, without a Content-Length).
    """

    answer: int | str
    on: str = "any"  # "submit", "poll", "any" (any API request) or "result" (a result download)
    times: int = 1
    retry_after: float | None = None  # sent with the answer, when set

    def __post_init__(self) -> None:
        if self.on not in ("submit", "poll", "any", "result"):
            raise ValueError("on must be submit, poll, any or result")
        if isinstance(self.answer, bool) or not (
            (isinstance(self.answer, int) and 400 <= self.answer <= 599)
            or self.answer in SPECIAL
            or (isinstance(self.answer, str) and self.answer.startswith("status:"))
        ):
            raise ValueError(f"answer must be an HTTP error status or one of {', '.join(SPECIAL)}, status:WORD")
        if self.on == "result" and not (isinstance(self.answer, int) or self.answer in RESULT_ANSWERS):
            raise ValueError(f'on="result" takes an HTTP error status or one of {", ".join(RESULT_ANSWERS)}')
        if self.on != "result" and self.answer in ("not_image", "endless"):
            raise ValueError(f'{self.answer} answers result downloads: on="result"')
        if isinstance(self.times, bool) or not isinstance(self.times, int) or self.times < 1:
            raise ValueError("times must be a positive integer")
        if self.retry_after is not None:
            self.retry_after = _number("retry_after", self.retry_after)

    def applies(self, kind: str) -> bool:
        if kind == "result" or self.on == "result":
            return kind == self.on  # downloads are not API requests: "any" leaves them alone
        if kind == "other" or self.on not in ("any", kind):
            return False
        if self.answer == "no_task_id":
            return kind == "submit"
        if self.answer in ("wrong_task_id", "no_results") or str(self.answer).startswith("status:"):
            return kind == "poll"
        return True


@dataclass
class Faults:
    rate_429: float = 0.0  # share of API requests answered 429 (with Retry-After)
    rate_500: float = 0.0
    rate_503: float = 0.0
    retry_after: float = 1.0  # seconds, sent with every 429
    latency: float = 0.0  # added before every API answer
    fail_rate: float = 0.0  # share of submitted tasks that end `failed`
    reject_key: bool = False  # 401 for everything
    no_balance: bool = False  # 402 for everything


def png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    """A valid solid-colour RGB PNG: clients that decode results get a real image."""
    return _png(width, height, bytes(rgb) * (width * height), level=6)


def result_png(task_id: str, index: int, side: int = 8) -> bytes:
    """A task's result image: a valid side x side RGB PNG of noise seeded by (task, index),
    so every image differs (and so do their digests) and the same URL always gives the same bytes.
    Stored uncompressed: noise does not compress, and a 1 MiB image (side 592) costs no CPU to make."""
    seed = hashlib.blake2b(f"{task_id}/{index}".encode(), digest_size=16).digest()
    return _png(side, side, random.Random(seed).randbytes(3 * side * side), level=0)


def _png(width: int, height: int, pixels: bytes, level: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    stride = 3 * width
    rows = b"".join(b"\x00" + pixels[row * stride : (row + 1) * stride] for row in range(height))  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(rows, level)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


_CATEGORIES = {
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Answer:
    return status, {"code": status, "message": message}, headers or {}


@dataclass
class _Task:
    created: float
    wall: float  # time.time() at creation: /_sandbox/tasks reports times in epoch seconds
    processing: float  # pending until then
    finishes: float  # fixed at submit, so a later task_seconds change cannot rewrite history
    n: int
    fails: bool


class SandboxServer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = "sandbox-key",
        task_seconds: TaskSeconds = 2.0,
        faults: Faults | None = None,
        seed: int | None = None,
        result_ttl: float | None = None,
        result_side: int = 8,
        balance: float = 100.0,
    ):
        self.api_key = api_key
        # The account balance GET /api/v1/team/balance answers; settable (also through /_sandbox/config).
        self.balance = balance
        self.task_seconds = task_seconds
        # Seconds after its task finished that a result URL answers 403 (None: never). Read at each
        # download, unlike task_seconds: a test can expire the URLs of tasks that already finished.
        self.result_ttl = result_ttl
        self.result_side = result_side  # pixels; 592 makes 1 MiB images
        self.faults = faults or Faults()
        self._random = random.Random(seed)
        self._lock = threading.Lock()  # the only lock; held for a few dict/counter operations
        self._schema = GenerationRequestSchema()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.sandbox = self
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None
        self._serving = False
        self.reset()

    # -- lifecycle -------------------------------------------------------
    def start(self) -> SandboxServer:
        self._serving = True
        # A short poll interval: stop() waits up to one interval, and test fixtures stop a sandbox each time.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="sandbox", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._serving = True
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        # shutdown() waits for the serve loop to end: it would hang if none ever ran.
        if self._serving:
            self._serving = False
            self._httpd.shutdown()
        if self._thread:
            self._thread.join(5)
        self._httpd.server_close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- state -----------------------------------------------------------
    def reset(self) -> None:
        """Forget tasks and counters (faults and task_seconds stay)."""
        with self._lock:
            self._tasks: dict[str, _Task] = {}
            self._bodies: set[bytes] = set()  # digests, not bodies: inline images can be 10 MB
            self._arrivals: deque[float] = deque(maxlen=_ARRIVALS_KEPT)
            self._counts = {
                "submits": 0,
                "polls": 0,
                "requests": 0,
                "errors_injected": 0,
                "duplicate_prompts": 0,
                "downloads": 0,  # result downloads; not API requests, so not in "requests"
            }
            self._status_counts: dict[str, int] = {}
            self._script: list[Step] = []
            self._log: deque[dict[str, Any]] = deque(maxlen=_ARRIVALS_KEPT)

    def script(self, *steps: Step) -> None:
        """Append scripted answers; each is used by the next requests it matches, in order."""
        with self._lock:
            self._script.extend(steps)

    def requests_log(self) -> list[dict[str, Any]]:
        """Every API request so far: {"at": epoch seconds, "client": User-Agent, "kind": "submit"|"poll"|"other",
        "status": answer status (-1: dropped, -2: the HTML 502 page)}, and for a poll "task": the task id."""
        with self._lock:
            return list(self._log)

    def set_faults(self, **changes: Any) -> None:
        """Update some Faults fields; all or nothing, so a bad value leaves the faults as they were."""
        kinds = {f.name: f.type for f in fields(Faults)}  # type names: annotations are strings here
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in kinds:
                raise ValueError(f"unknown fault {name!r}")
            if kinds[name] == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false")
                checked[name] = value
            else:
                checked[name] = _number(name, value, top=1.0 if "rate" in name else None)
        with self._lock:
            for name, value in checked.items():
                setattr(self.faults, name, value)

    def task_ids(self) -> set[str]:
        """The ids of every task created so far: each is a billed generation someone must follow."""
        with self._lock:
            return set(self._tasks)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            arrivals = list(self._arrivals)
            spans = [(t.created, t.finishes) for t in self._tasks.values()]
            result: dict[str, Any] = dict(
                self._counts,
                status_counts=dict(self._status_counts),
                tasks=len(self._tasks),
                faults=asdict(self.faults),
                task_seconds=self.task_seconds,
                result_ttl=self.result_ttl,
                balance=self.balance,
            )
        # Computed here, not per request: stats are read rarely, requests are the hot path.
        result["max_requests_per_second"] = _max_in_window(arrivals, 1.0)
        result["unfinished"] = sum(1 for _, end in spans if end > now)
        result["max_unfinished"] = _max_overlap(spans)
        return result

    # -- the API ---------------------------------------------------------
    def handle_api(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        arrived = time.time()
        with self._lock:  # the clock read inside the lock keeps arrivals sorted for the window scan
            self._arrivals.append(time.monotonic())
            self._counts["requests"] += 1
        kind = (
            "submit"
            if method == "POST" and path in SUBMIT_PATHS
            else "poll"
            if (method == "GET" and _TASK.match(path))
            else "other"
        )
        answer = self._answer(method, path, kind, headers, raw)
        with self._lock:
            key = str(answer[0])
            self._status_counts[key] = self._status_counts.get(key, 0) + 1
            entry = {"at": arrived, "client": headers.get("User-Agent", ""), "kind": kind, "status": answer[0]}
            if kind == "poll":
                entry["task"] = path.rsplit("/", 1)[-1]
            self._log.append(entry)
        return answer

    def _answer(self, method: str, path: str, kind: str, headers: dict[str, str], raw: bytes) -> Answer:
        valid = headers.get("Authorization") == f"Bearer {self.api_key}"
        if method == "GET" and path == VALIDATE_PATH:
            # The one endpoint that answers a wrong or missing key with 200: it exists to say so.
            return (
                200,
                {"code": 0, "message": "success", "data": {"is_valid": valid and not self.faults.reject_key}},
                {},
            )
        if not valid:
            return _error(401, "Unauthorized: invalid or missing API key")
        if self.faults.latency:
            time.sleep(self.faults.latency)
        step = self._next_step(kind)
        if step is not None:
            return self._scripted(step, kind, path, headers, raw)
        fault = self._fault()
        if fault:
            with self._lock:
                self._counts["errors_injected"] += 1
            return fault
        if kind == "submit":
            return self._submit(raw)
        if kind == "poll":
            return self._task(_TASK.match(path)[1])  # type: ignore[index]
        if method == "GET" and path == BALANCE_PATH:
            return 200, {"code": 0, "message": "success", "data": {"balance": self.balance}}, {}
        return _error(404, f"Not Found: no endpoint {method} {path}")

    def _next_step(self, kind: str) -> Step | None:
        with self._lock:
            for i, step in enumerate(self._script):
                if step.applies(kind):
                    step.times -= 1
                    if step.times == 0:
                        del self._script[i]
                    return step
        return None

    def _scripted(self, step: Step, kind: str, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        extra = {"Retry-After": f"{step.retry_after:g}"} if step.retry_after is not None else {}
        answer = step.answer
        if isinstance(answer, int):
            with self._lock:
                self._counts["errors_injected"] += 1
            return _error(answer, f"{_CATEGORIES.get(answer, 'Error')}: scripted", extra)
        if answer == "html":
            return HTML, {"page": "<html><body><h1>502 Bad Gateway</h1></body></html>"}, extra
        if answer == "echo":
            echoed = json.dumps({"path": path, "headers": headers}, sort_keys=True)
            return _error(400, f"Bad Request: could not parse request {echoed}", extra)
        if kind == "submit":  # "drop" or "no_task_id": the task is created, its answer lost or broken
            status, body, _ = self._submit(raw)
            if status != 200:
                return status, body, extra
            if answer == "drop":
                return DROP, {}, {}
            del body["data"]["task_id"]
            return status, body, extra
        task_id = _TASK.match(path)[1]  # type: ignore[index]
        status, body, _ = self._task(task_id)
        if status != 200:
            return status, body, extra
        data = body["data"]
        if answer == "drop":
            return DROP, {}, {}
        if answer == "wrong_task_id":
            data["task_id"] = task_id + "-other"
        elif answer == "no_results":
            data.update(status="success", result={"resources": []})
        else:  # status:WORD
            data["status"] = str(answer).split(":", 1)[1]
            data.pop("result", None)
        return status, body, extra

    def _fault(self) -> Answer | None:
        f = self.faults
        if f.reject_key:
            return _error(401, "Unauthorized: invalid or expired API key")
        if f.no_balance:
            return _error(402, "Payment Required: insufficient balance")
        # One roll across the three rates, so rate_429=0.5 and rate_503=0.5 together fault every request.
        roll = self._random.random()
        for rate, status, message in (
            (f.rate_429, 429, "Too Many Requests: rate limit exceeded"),
            (f.rate_500, 500, "Internal Server Error: sandbox fault"),
            (f.rate_503, 503, "Service Unavailable: circuit breaker open"),
        ):
            if roll < rate:
                return _error(status, message, {"Retry-After": f"{f.retry_after:g}"} if status == 429 else None)
            roll -= rate
        return None

    def _submit(self, raw: bytes) -> Answer:
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "Bad Request: body is not valid JSON")
        errors = self._schema.validate(body) if isinstance(body, dict) else {"_schema": ["must be a JSON object"]}
        if errors:
            return _error(400, f"Bad Request: {json.dumps(errors, separators=(',', ':'), sort_keys=True)}")
        if self.balance <= 0:  # as Modellix: an account without credit creates no task
            return _error(402, "Payment Required: insufficient balance")
        digest = hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).digest()
        created, wall = time.monotonic(), time.time()
        with self._lock:
            task_id = f"task-{self._random.getrandbits(64):016x}"
            fails = self._random.random() < self.faults.fail_rate
            seconds = self._seconds(body)
            self._tasks[task_id] = _Task(
                created, wall, created + seconds * 0.25, created + seconds, body.get("n", 1), fails
            )
            self._counts["submits"] += 1
            if digest in self._bodies:
                self._counts["duplicate_prompts"] += 1
            self._bodies.add(digest)
        return (
            200,
            {
                "code": 0,
                "message": "success",
                "data": {
                    "status": "pending",
                    "task_id": task_id,
                    "model_id": MODEL_ID,
                    "get_result": {"method": "GET", "url": f"{self.url}/api/v1/tasks/{task_id}"},
                },
            },
            {},
        )

    def _seconds(self, body: dict[str, Any]) -> float:
        """How long a new task takes (called under the lock: it draws from the shared random)."""
        span = self.task_seconds
        if not isinstance(span, tuple):
            return span
        return base_seconds(span, shape_of(body)) * (1 + self._random.uniform(-JITTER, JITTER))

    def tasks(self) -> dict[str, dict[str, float]]:
        """Each task's creation and end, in epoch seconds: {"created": ..., "finishes": ...}."""
        with self._lock:
            return {
                task_id: {"created": t.wall, "finishes": t.wall + (t.finishes - t.created)}
                for task_id, t in self._tasks.items()
            }

    def _task(self, task_id: str) -> Answer:
        with self._lock:
            task = self._tasks.get(task_id)
            if task:
                self._counts["polls"] += 1
        if task is None:
            return _error(404, f"Not Found: task {task_id} not found")
        now = time.monotonic()
        data: dict[str, Any] = {"task_id": task_id, "model_id": MODEL_ID}
        if now < task.processing:
            data["status"] = "pending"
        elif now < task.finishes:
            data["status"] = "processing"
        elif task.fails:
            data.update(
                status="failed",
                error={"code": "generation_failed", "message": "Generation failed: content could not be generated"},
            )
        else:
            data.update(
                status="success",
                result={
                    "resources": [
                        {"url": f"{self.url}/results/{task_id}/{k}.png", "type": "image"} for k in range(task.n)
                    ]
                },
            )
        return 200, {"code": 0, "message": "success", "data": data}, {}

    # -- result images (no key: public, signed URLs in the real API) ----
    def handle_result(self, task_id: str, index: int, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        """A result download: (status, body, headers); a status of DROP or ENDLESS for the handler to act out."""
        with self._lock:
            self._counts["downloads"] += 1
        if headers.get("Authorization"):
            # S3 answers so when a presigned URL comes with a key too: whoever sent the API key here leaks it.
            return _xml(400, "InvalidArgument", "Only one auth mechanism allowed")
        step = self._next_step("result")
        if step is not None:
            if isinstance(step.answer, int):
                return _xml(step.answer, _CATEGORIES.get(step.answer, "Error").replace(" ", ""), "scripted")
            if step.answer == "drop":
                return DROP, b"", {}
            if step.answer == "endless":
                return ENDLESS, b"", {"Content-Type": "image/png"}
            return 200, b"<html><body><h1>Sign in to continue</h1></body></html>", {"Content-Type": "image/png"}
        with self._lock:
            task = self._tasks.get(task_id)
        # An unknown task's path is served (the demo uses one as an input image); a known task's
        # images exist once it succeeded, and only as many as it made.
        if task is not None:
            now = time.monotonic()
            if now < task.finishes or task.fails or index >= task.n:
                return _xml(404, "NoSuchKey", "The specified key does not exist.")
            if self.result_ttl is not None and now >= task.finishes + self.result_ttl:
                return _xml(403, "AccessDenied", "Request has expired")
        return 200, result_png(task_id, index, self.result_side), {"Content-Type": "image/png"}

    # -- control (no auth: tests in other processes drive the sandbox) ---
    def handle_control(self, method: str, path: str, raw: bytes) -> Answer:
        if method == "GET" and path == "/_sandbox/stats":
            return 200, self.stats(), {}
        if method == "GET" and path == "/_sandbox/requests":
            return 200, {"requests": self.requests_log()}, {}
        if method == "GET" and path == "/_sandbox/tasks":
            return 200, {"tasks": self.tasks()}, {}
        if method == "POST" and path == "/_sandbox/script":
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict) or not isinstance(body.get("steps"), list):
                    raise TypeError('body must be {"steps": [...]}')
                steps = [Step(**step) for step in body["steps"]]
            except (TypeError, ValueError) as exc:
                return _error(400, f"Bad Request: {exc}")
            self.script(*steps)
            return 200, {"queued": len(steps)}, {}
        if method == "POST" and path == "/_sandbox/reset":
            self.reset()
            return 200, {"ok": True}, {}
        if method == "POST" and path in ("/_sandbox/faults", "/_sandbox/config"):
            # Both accept fault fields, task_seconds (a number, "LOW-HIGH" or [LOW, HIGH]), result_ttl
            # (null: never expire) and balance (any number, negative too): one call can set up a whole scenario.
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise TypeError("body must be a JSON object")
                task_seconds = body.pop("task_seconds", None)
                if isinstance(task_seconds, list) and len(task_seconds) == 2:  # [low, high]
                    task_seconds = "-".join(str(_number("task_seconds", x)) for x in task_seconds)
                if task_seconds is not None:
                    task_seconds = parse_task_seconds(str(task_seconds))
                set_ttl = "result_ttl" in body
                result_ttl = body.pop("result_ttl", None)
                if result_ttl is not None:
                    result_ttl = _number("result_ttl", result_ttl)
                balance = body.pop("balance", None)
                if balance is not None and (isinstance(balance, bool) or not isinstance(balance, (int, float))):
                    raise ValueError("balance must be a number")
                self.set_faults(**body)
            except (TypeError, ValueError) as exc:
                return _error(400, f"Bad Request: {exc}")
            if task_seconds is not None:
                self.task_seconds = task_seconds
            if set_ttl:
                self.result_ttl = result_ttl
            if balance is not None:
                self.balance = float(balance)
            answer = {
                "faults": asdict(self.faults),
                "task_seconds": self.task_seconds,
                "result_ttl": self.result_ttl,
                "balance": self.balance,
            }
            return 200, answer, {}
        return _error(404, f"Not Found: no endpoint {method} {path}")


def _xml(status: int, code: str, message: str) -> tuple[int, bytes, dict[str, str]]:
    """An error in the shape S3 (and the CDNs in front of it) answers a signed URL with."""
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return status, body.encode(), {"Content-Type": "application/xml"}


def _number(name: str, value: Any, top: float | None = None) -> float:
    # bool is an int in Python, but `true` is no number of seconds.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (top is not None and value > top):
        raise ValueError(f"{name} must be a number from 0" + (f" to {top:g}" if top is not None else ""))
    return float(value)


def _max_in_window(times: list[float], window: float) -> int:
    """The most sorted timestamps within any half-open window of that length."""
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    # An end sorts before a start at the same instant: a task finished is not unfinished.
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not keep stop() or the process waiting
    request_queue_size = 1024  # a burst of new connections from many workers must not be refused
    sandbox: SandboxServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (its read timeout) is expected here, not a fault.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so pooled clients reuse connections
    # Headers and body leave in two writes; with Nagle on, the body waits for
    # the client's delayed ACK and every answer takes 40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True  # the body's end is unknown: the connection cannot be reused
            return self._json(*_error(400, "Bad Request: invalid Content-Length"))
        raw = self.rfile.read(length) if length > 0 else b""
        sandbox = self.server.sandbox
        result = _RESULT.match(path) if method == "GET" else None
        if result:
            status, body, headers = sandbox.handle_result(result[1], int(result[2]), dict(self.headers.items()))
            if status == DROP:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            if status == ENDLESS:
                return self._endless(headers)
            return self._send(status, body, headers)
        if path.startswith("/_sandbox/"):
            return self._json(*sandbox.handle_control(method, path, raw))
        status, payload, headers = sandbox.handle_api(method, path, dict(self.headers.items()), raw)
        if status == DROP:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if status == HTML:
            return self._send(502, payload["page"].encode(), {"Content-Type": "text/html", **headers})
        self._json(status, payload, headers)

    def _endless(self, headers: dict[str, str]) -> None:
        """A PNG that never ends (up to ENDLESS_CAP): chunked, so no Content-Length warns the client."""
        self.close_connection = True  # the client hangs up mid-body: the connection is done
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = bytes(64 * 1024)
        try:
            for k in range(ENDLESS_CAP // len(piece)):
                data = b"\x89PNG\r\n\x1a\n" + piece[8:] if k == 0 else piece
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading, as it should

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # per-request logging would make the sandbox the benchmark's bottleneck
