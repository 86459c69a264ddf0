"""A sandbox Modellix server: the API contract of shared/modellix-api.md, with faults on demand.

Tests, the demo and the benchmarks run against it; nothing here talks to the
real API. Requests are validated with the project's own schemas. Control
endpoints under /_sandbox/ let another process read counters and set faults.
"""
from __future__ import annotations

import json
import random
import re
import struct
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from worker.schemas import GenerationRequestSchema

SUBMIT_PATHS = ("/api/v1/image-to-image/kling/kling-image-o1/async", "/api/v1/kling/kling-image-o1/async")
_TASK = re.compile(r"^/api/v1/tasks/([^/?]+)$")
_RESULT = re.compile(r"^/results/[^/]+/\d+\.png$")


@dataclass
class Faults:
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    retry_after: float = 1.0  # seconds, sent with every 429
    latency: float = 0.0  # added before every API answer
    fail_rate: float = 0.0  # share of tasks that end `failed`
    reject_key: bool = False  # 401 for everything
    no_balance: bool = False  # 402 for everything


def png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


RESULT_PNG = png()


@dataclass
class _Task:
    created: float
    n: int
    fails: bool


class SandboxServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: str = "sandbox-key",
                 task_seconds: float = 2.0, faults: Faults | None = None, seed: int | None = None):
        self.api_key = api_key
        self.task_seconds = task_seconds
        self.faults = faults or Faults()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._schema = GenerationRequestSchema()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.sandbox = self
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None
        self.reset()

    # -- lifecycle -------------------------------------------------------
    def start(self) -> "SandboxServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="sandbox", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "SandboxServer":
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- state -----------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self._tasks: dict[str, _Task] = {}
            self._bodies: set[str] = set()
            self._arrivals: deque[float] = deque(maxlen=200_000)
            self._finish_times: list[float] = []
            self._counts = {"submits": 0, "polls": 0, "requests": 0, "errors_injected": 0, "duplicate_prompts": 0}
            self._status_counts: dict[str, int] = {}

    def set_faults(self, **changes: Any) -> None:
        names = {f.name for f in fields(Faults)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        with self._lock:
            for key, value in changes.items():
                setattr(self.faults, key, value)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            arrivals = list(self._arrivals)
            spans = sorted((t.created, t.created + self.task_seconds) for t in self._tasks.values())
            result: dict[str, Any] = dict(self._counts, status_counts=dict(self._status_counts),
                                          tasks=len(self._tasks), faults=asdict(self.faults),
                                          task_seconds=self.task_seconds)
        result["max_requests_per_second"] = _max_in_window(arrivals, 1.0)
        result["unfinished"] = sum(1 for start, end in spans if end > now)
        result["max_unfinished"] = _max_overlap(spans)
        return result

    # -- the API ---------------------------------------------------------
    def _submit(self, body: Any) -> tuple[int, dict[str, Any]]:
        errors = self._schema.validate(body) if isinstance(body, dict) else {"_body": ["must be a JSON object"]}
        if errors:
            return 400, {"code": 400, "message": f"Bad Request: {json.dumps(errors, separators=(',', ':'))}"}
        task_id = "task-" + uuid.uuid4().hex[:16]
        key = json.dumps(body, sort_keys=True)
        with self._lock:
            fails = self._random.random() < self.faults.fail_rate
            self._tasks[task_id] = _Task(time.monotonic(), body.get("n", 1), fails)
            self._counts["submits"] += 1
            if key in self._bodies:
                self._counts["duplicate_prompts"] += 1
            self._bodies.add(key)
        return 200, {"code": 0, "message": "success", "data": {
            "status": "pending", "task_id": task_id, "model_id": "kling-image-o1",
            "get_result": {"method": "GET", "url": f"{self.url}/api/v1/tasks/{task_id}"}}}

    def _task(self, task_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            task = self._tasks.get(task_id)
            if task:
                self._counts["polls"] += 1
        if task is None:
            return 404, {"code": 404, "message": f"Not Found: task {task_id} not found"}
        age = time.monotonic() - task.created
        data: dict[str, Any] = {"task_id": task_id, "model_id": "kling-image-o1"}
        if age < self.task_seconds * 0.25:
            data["status"] = "pending"
        elif age < self.task_seconds:
            data["status"] = "processing"
        elif task.fails:
            data.update(status="failed", error={"code": "generation_failed",
                                                "message": "Generation failed: content could not be generated"})
        else:
            data.update(status="success", result={"resources": [
                {"url": f"{self.url}/results/{task_id}/{k}.png", "type": "image"} for k in range(task.n)]})
        return 200, {"code": 0, "message": "success", "data": data}

    def _fault(self) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        f = self.faults
        if f.latency:
            time.sleep(f.latency)
        if f.reject_key:
            return 401, {"code": 401, "message": "Unauthorized: invalid or expired API key"}, {}
        if f.no_balance:
            return 402, {"code": 402, "message": "Payment Required: insufficient balance"}, {}
        roll = self._random.random()
        for rate, status, message in ((f.rate_429, 429, "Too Many Requests: rate limit exceeded"),
                                      (f.rate_500, 500, "Internal Server Error: sandbox fault"),
                                      (f.rate_503, 503, "Service Unavailable: circuit breaker open")):
            if roll < rate:
                headers = {"Retry-After": f"{f.retry_after:g}"} if status == 429 else {}
                return status, {"code": status, "message": message}, headers
            roll -= rate
        return None

    def handle_api(self, method: str, path: str, auth: str | None,
                   body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            self._arrivals.append(time.monotonic())
            self._counts["requests"] += 1
        answer: tuple[int, dict[str, Any], dict[str, str]] | None
        if auth != f"Bearer {self.api_key}":
            answer = 401, {"code": 401, "message": "Unauthorized: invalid or missing API key"}, {}
        else:
            answer = self._fault()
            if answer:
                with self._lock:
                    self._counts["errors_injected"] += 1
            elif method == "POST" and path in SUBMIT_PATHS:
                answer = (*self._submit(body), {})
            elif method == "GET" and _TASK.match(path):
                answer = (*self._task(_TASK.match(path)[1]), {})  # type: ignore[index]
            else:
                answer = 404, {"code": 404, "message": f"Not Found: no endpoint {method} {path}"}, {}
        with self._lock:
            key = str(answer[0])
            self._status_counts[key] = self._status_counts.get(key, 0) + 1
        return answer

    def handle_control(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path == "/_sandbox/stats":
            return 200, self.stats()
        if method == "POST" and path == "/_sandbox/reset":
            self.reset()
            return 200, {"ok": True}
        if method == "POST" and path in ("/_sandbox/faults", "/_sandbox/config") and isinstance(body, dict):
            try:
                task_seconds = body.pop("task_seconds", None)
                self.set_faults(**body)
            except (TypeError, ValueError) as exc:
                return 400, {"code": 400, "message": f"Bad Request: {exc}"}
            if task_seconds is not None:
                self.task_seconds = float(task_seconds)
            return 200, {"faults": asdict(self.faults), "task_seconds": self.task_seconds}
        return 404, {"code": 404, "message": f"Not Found: no endpoint {method} {path}"}


def _max_in_window(times: list[float], window: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
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
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if method == "GET" and _RESULT.match(path):
            return self._send(200, RESULT_PNG, {"Content-Type": "image/png"})
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = ...
        sandbox = self.server.sandbox
        if path.startswith("/_sandbox/"):
            status, payload = sandbox.handle_control(method, path, body)
            return self._json(status, payload, {})
        if body is ...:
            return self._json(400, {"code": 400, "message": "Bad Request: body is not valid JSON"}, {})
        self._json(*sandbox.handle_api(method, path, self.headers.get("Authorization"), body))

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # per-request logging would make the sandbox the benchmark's bottleneck
