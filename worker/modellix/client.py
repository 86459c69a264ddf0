"""A thin client for the Modellix kling-image-o1 API: plain requests, no Celery, no DB.

Every call is one HTTP attempt; what to do about a failure is decided in one
place, worker.modellix.policy. The API's knowledge lives on these types: the
exception tree below (each with the code a job records), and a task's phase.

    ModellixError                the API's code: its HTTP status; ours otherwise
    ├── TransientError           worth trying again later
    │   ├── RateLimited          429 (Retry-After)
    │   ├── ServerError          5xx; for a submit the task may exist (KLING_SUBMIT_5XX decides)
    │   ├── NetworkError         nothing came back; for a submit, nothing was sent
    │   └── ProtocolError        a poll's answer that does not fit the documented shape
    ├── AmbiguousSubmit          a submit that may have created a task (submit_unknown)
    ├── AccountError             401/402: the key or the balance, for every job
    ├── RequestRejected          400 and other 4xx
    └── NotFound                 404

A submit's answer either proves that no task was created (SAFE_REJECTIONS, or
no connection made) or leaves the outcome unknown: AmbiguousSubmit, or a
ServerError, which Modellix's documentation says to retry and its own CLI
treats as unknown.
"""

from __future__ import annotations

import enum
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError

from worker.backoff import parse_retry_after
from worker.config import DEFAULT_SUBMIT_PATH

try:
    _VERSION = importlib.metadata.version("kling-worker")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
    _VERSION = "dev"

SUCCESS = frozenset({"completed", "succeeded", "success"})
FAILURE = frozenset({"canceled", "cancelled", "error", "failed"})
PENDING = frozenset({"pending"})
# Running states seen or documented; any other word is also taken as running, but logged.
RUNNING = frozenset({"processing", "running", "queued", "submitted"})


class TaskPhase(enum.Enum):
    """Where a Modellix task is, from its status word (as Modellix's own CLI reads them)."""

    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class ModellixError(Exception):
    """Base: `status` is the HTTP status (0 for network errors), `code` a stable short name."""

    retryable = False
    code = "api_error"

    def __init__(self, message: str, status: int = 0, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def stored_code(self) -> str:
        """What a job records as its error_code: the API's own code (its HTTP status) where it answered."""
        return str(self.status) if self.status else self.code


class TransientError(ModellixError):
    """429, 5xx and network trouble: worth trying again later."""

    retryable = True
    code = "unavailable"


class RateLimited(TransientError):
    code = "rate_limited"


class ServerError(TransientError):
    """5xx: Modellix failed. A poll tries again; whether a submit may is the operator's choice."""

    code = "server_error"


class NetworkError(TransientError):
    code = "network"


class AmbiguousSubmit(ModellixError):
    """The submit may have reached Modellix (read timeout, dropped connection, 200 without a task id):
    retrying could create and bill a second task, so it is not retried."""

    code = "submit_unknown"

    @property
    def stored_code(self) -> str:
        return self.code  # even after a 200: what matters is that the outcome is unknown


class AccountError(ModellixError):
    """401/402: the key or the balance is wrong for every job, not this one."""

    code = "account"


class RequestRejected(ModellixError):
    code = "bad_request"


class NotFound(ModellixError):
    code = "not_found"


class ProtocolError(TransientError):
    """An answer that does not fit the documented shape."""

    code = "protocol"


# The answers to a POST that prove no task was created (Modellix's official CLI
# retries a paid submission only after one of these); any other answer to a
# submit that was sent may have created a task.
SAFE_REJECTIONS = frozenset({400, 401, 402, 403, 404, 405, 413, 415, 422, 429})

_BY_STATUS: dict[int, type[ModellixError]] = {
    400: RequestRejected,
    401: AccountError,
    402: AccountError,
    404: NotFound,
    429: RateLimited,
}


@dataclass(frozen=True)
class Submission:
    task_id: str
    status: str
    raw: dict[str, Any]


@dataclass(frozen=True)
class TaskState:
    task_id: str
    status: str
    raw: dict[str, Any]
    result_urls: list[str] = field(default_factory=list)

    @property
    def phase(self) -> TaskPhase:
        word = self.status.lower()
        if word in SUCCESS:
            return TaskPhase.succeeded
        if word in FAILURE:
            return TaskPhase.failed
        return TaskPhase.pending if word in PENDING else TaskPhase.running

    @property
    def known_status(self) -> bool:
        return self.status.lower() in SUCCESS | FAILURE | PENDING | RUNNING

    @property
    def succeeded(self) -> bool:
        return self.phase is TaskPhase.succeeded

    @property
    def failed(self) -> bool:
        return self.phase is TaskPhase.failed

    @property
    def finished(self) -> bool:
        return self.phase in (TaskPhase.succeeded, TaskPhase.failed)

    @property
    def error_message(self) -> str:
        """Modellix does not document a failed task's error shape: take what is there."""
        for key in ("error", "error_message", "message", "reason", "fail_reason"):
            value = self.raw.get(key)
            if isinstance(value, dict):
                return str(value.get("message") or value)
            if value:
                return str(value)
        return f"task ended with status {self.status!r}"


def result_urls(data: dict[str, Any]) -> list[str]:
    """Image URLs from `data.result.resources` (or the older `data.resources`): http(s) only."""
    result = data.get("result")
    resources = result.get("resources") if isinstance(result, dict) else None
    if resources is None:
        resources = data.get("resources")
    urls = []
    for item in resources or []:
        url = item.get("url") if isinstance(item, dict) else item
        if isinstance(url, str) and urlsplit(url).scheme in ("http", "https") and urlsplit(url).netloc:
            urls.append(url)
    return urls


class ModellixClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        submit_path: str = DEFAULT_SUBMIT_PATH,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        pool_size: int = 32,
    ):
        self.base_url = base_url.rstrip("/")
        self.submit_url = self.base_url + "/" + submit_path.lstrip("/")
        self.timeout = (connect_timeout, read_timeout)
        self._secret = api_key
        self.session = requests.Session()
        # One pool for the one host we talk to, as large as the worker's concurrency,
        # so threads never wait for (or churn) connections.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # The pid tells one worker process from another in the API's (and the sandbox's) request logs.
        self.session.headers.update(
            {
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                "User-Agent": f"kling-worker/{_VERSION} (pid {os.getpid()})",
            }
        )
        # requests re-reads the proxy and CA environment on every call (a scan of
        # os.environ each time, a third of a poll's CPU here): read it once instead.
        self.session.proxies.update(requests.utils.get_environ_proxies(self.base_url))
        self._verify: bool | str = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self.session.verify = self._verify
        self.session.trust_env = False

    def __repr__(self) -> str:
        return f"ModellixClient({self.base_url!r})"

    def close(self) -> None:
        self.session.close()

    def submit(self, body: dict[str, Any]) -> Submission:
        data = self._call("POST", self.submit_url, json=body, submit=True)
        task_id = data.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            # A 200 without a task id: the task may exist, but we cannot follow it.
            raise AmbiguousSubmit("submit answered without a task_id", 200)
        return Submission(task_id, str(data.get("status", "pending")), data)

    def task_url(self, task_id: str) -> str:
        return f"{self.base_url}/api/v1/tasks/{task_id}"

    def get_task(self, task_id: str) -> TaskState:
        data = self._call("GET", self.task_url(task_id))
        if data.get("task_id") not in (None, task_id):
            raise ProtocolError(f"asked for task {task_id}, got {data.get('task_id')}", 200)
        return TaskState(task_id, str(data.get("status", "")), data, result_urls(data))

    def validate_key(self) -> bool:
        """Whether the API takes our key (GET /api/v1/apikey/validate, which answers 200 either way)."""
        valid = self._call("GET", f"{self.base_url}/api/v1/apikey/validate").get("is_valid")
        if not isinstance(valid, bool):
            raise ProtocolError("key validation answered without is_valid", 200)
        return valid

    def balance(self) -> float:
        """The account's balance (GET /api/v1/team/balance)."""
        value = self._call("GET", f"{self.base_url}/api/v1/team/balance").get("balance")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError("balance answered without a number", 200)
        return float(value)

    def _call(self, method: str, url: str, submit: bool = False, json: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._send(method, url, json)
        except requests.ConnectTimeout as exc:
            raise NetworkError(f"connect timeout: {self._scrub(exc)}") from None
        except requests.ConnectionError as exc:
            # Refused or unresolvable means nothing was sent; anything later is ambiguous.
            if submit and not _never_sent(exc):
                raise AmbiguousSubmit(f"connection lost during submit: {self._scrub(exc)}") from None
            raise NetworkError(f"connection error: {self._scrub(exc)}") from None
        except requests.Timeout as exc:
            if submit:
                raise AmbiguousSubmit(f"read timeout during submit: {self._scrub(exc)}") from None
            raise NetworkError(f"timeout: {self._scrub(exc)}") from None
        except requests.RequestException as exc:
            raise NetworkError(f"request failed: {self._scrub(exc)}") from None
        try:
            return self._parse(response)
        except (ProtocolError, RequestRejected) as exc:
            if submit and exc.status not in SAFE_REJECTIONS:
                # A 200 that does not fit, or a 4xx outside the safe list: a task may exist.
                raise AmbiguousSubmit(f"unexpected answer to a submit: {exc.message}", exc.status) from None
            raise

    def _send(self, method: str, url: str, body: dict[str, Any] | None) -> requests.Response:
        # Straight to the session's adapter: Session.request merges environment settings,
        # cookies, hooks and redirects we never use: a quarter of a call's CPU (0.80 -> 0.59 ms here).
        # A redirect is answered as it is: the API has none, and a submit must not follow one.
        request = requests.PreparedRequest()
        request.prepare(method=method, url=url, headers=self.session.headers, json=body)
        adapter = self.session.get_adapter(url)
        return adapter.send(request, timeout=self.timeout, verify=self._verify, proxies=self.session.proxies)

    def _parse(self, response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 200 and isinstance(body, dict) and body.get("code", 0) == 0:
            data = body.get("data")
            if isinstance(data, dict):
                return data
            raise ProtocolError("answer without a data object", 200)
        status = response.status_code if response.status_code != 200 else int(_get(body, "code", 500))
        message = self._scrub(_get(body, "message", None) or f"HTTP {status}: {response.text[:200]}")
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else RequestRejected)
        raise cls(message, status, retry_after)

    def _scrub(self, value: object) -> str:
        # Error texts can echo request details; the key must never leave this object.
        text = str(value)
        return text.replace(self._secret, "***") if self._secret else text


def _get(body: Any, key: str, default: Any) -> Any:
    return body.get(key, default) if isinstance(body, dict) else default


def _never_sent(exc: requests.ConnectionError) -> bool:
    """True when no connection was made (refused, unresolvable, unreachable): nothing was sent."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError)  # NameResolutionError is one too
