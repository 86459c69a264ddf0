"""Settings from the environment (12-factor), each with an embedded default.

The embedded defaults need no server: SQLite for the job table, kombu's
filesystem transport as the broker and a folder for the result images, all
under ``KLING_HOME`` (``./.kling``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from worker.archive import DEFAULT_MAX_BYTES, ArchiveSpec
from worker.webhooks import WebhookSecret

DEFAULT_BASE_URL = "https://api.modellix.ai"
DEFAULT_SUBMIT_PATH = "/api/v1/image-to-image/kling/kling-image-o1/async"
# The longest a worker thread sleeps for the fleet's API budget (worker.limits):
# a claimed job can stay `submitting` this long before its POST even starts.
MAX_BUDGET_SLEEP = 5.0
# What a 5xx answer to a submit means (Settings.submit_5xx).
SUBMIT_5XX = ("unknown", "retry")
# How log lines look (Settings.log_format, worker.logs).
LOG_FORMATS = ("text", "json")


def _float(name: str, default: float) -> float:
    found = _optional_float(name)
    return default if found is None else found


def _int(name: str, default: int) -> int:
    found = _optional_int(name)
    return default if found is None else found


class ConfigError(ValueError):
    """A setting with a value the service cannot run with; the message names the variable."""


def _optional_float(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else None
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _optional_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else None
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None


def _hosts(name: str) -> frozenset[str] | None:
    """A comma-separated list of host names, lower-cased; unset or empty: None (any host)."""
    hosts = frozenset(h.strip().lower().rstrip(".") for h in os.environ.get(name, "").split(","))
    return (hosts - {""}) or None


def home() -> Path:
    return Path(os.environ.get("KLING_HOME", ".kling")).resolve()


def _embedded_broker() -> str:
    return "filesystem://localhost/"


def _embedded_database() -> str:
    return f"sqlite:///{home() / 'jobs.sqlite'}"


def _embedded_archive() -> str:
    return (home() / "results").as_uri()  # absolute (home() is resolved), spaces percent-encoded


@dataclass(frozen=True)
class Settings:
    broker_url: str = field(default_factory=lambda: os.environ.get("CELERY_BROKER_URL") or _embedded_broker())
    database_url: str = field(default_factory=lambda: os.environ.get("DATABASE_URL") or _embedded_database())
    # repr=False: the key must never show up in a log line or a traceback.
    api_key: str = field(default_factory=lambda: os.environ.get("MODELLIX_API_KEY", ""), repr=False)
    base_url: str = field(default_factory=lambda: os.environ.get("MODELLIX_BASE_URL") or DEFAULT_BASE_URL)
    submit_path: str = field(default_factory=lambda: os.environ.get("MODELLIX_SUBMIT_PATH") or DEFAULT_SUBMIT_PATH)
    queue: str = field(default_factory=lambda: os.environ.get("KLING_QUEUE") or "kling")

    connect_timeout: float = field(default_factory=lambda: _float("MODELLIX_CONNECT_TIMEOUT", 5.0))
    read_timeout: float = field(default_factory=lambda: _float("MODELLIX_READ_TIMEOUT", 30.0))
    # Transient errors (429/5xx/network): bounded exponential backoff with jitter.
    max_attempts: int = field(default_factory=lambda: _int("KLING_MAX_ATTEMPTS", 6))
    backoff_base: float = field(default_factory=lambda: _float("KLING_BACKOFF_BASE", 1.0))
    backoff_max: float = field(default_factory=lambda: _float("KLING_BACKOFF_MAX", 60.0))
    # A 5xx answer to a submit may come after the task was created. "unknown" (the
    # default, as Modellix's official CLI): the job fails as submit_unknown and is
    # never sent again. "retry" (as Modellix's REST documentation suggests): it is
    # sent again like a 503, at the risk of a second, billed task.
    submit_5xx: str = field(default_factory=lambda: os.environ.get("KLING_SUBMIT_5XX", "").strip() or "unknown")
    # 401/402: the account is blocked; jobs wait this long between tries, without limit.
    account_retry: float = field(default_factory=lambda: _float("KLING_ACCOUNT_RETRY", 60.0))

    # Status polling: first poll after poll_first seconds, each gap poll_factor times
    # the last, at most poll_max; a task not finished poll_deadline seconds after
    # submission fails as timed out.
    poll_first: float = field(default_factory=lambda: _float("KLING_POLL_FIRST", 2.0))
    poll_factor: float = field(default_factory=lambda: _float("KLING_POLL_FACTOR", 1.25))
    poll_max: float = field(default_factory=lambda: _float("KLING_POLL_MAX", 30.0))
    poll_deadline: float = field(default_factory=lambda: _float("KLING_POLL_DEADLINE", 900.0))
    # A job left in `submitting` this long (worker died during the POST) is resolved
    # by the sweeper; see tracking.resolve_interrupted.
    submit_grace: float = field(default_factory=lambda: _float("KLING_SUBMIT_GRACE", 120.0))
    sweep_interval: float = field(default_factory=lambda: _float("KLING_SWEEP_INTERVAL", 1.0))

    # Fleet-wide API budget (unset = unlimited).
    max_rps: float | None = field(default_factory=lambda: _optional_float("MODELLIX_MAX_RPS"))
    max_in_flight: int | None = field(default_factory=lambda: _optional_int("MODELLIX_MAX_IN_FLIGHT"))
    # HTTP and DB pools are sized to the worker's thread concurrency.
    concurrency: int = field(default_factory=lambda: _int("KLING_CONCURRENCY", 32))
    # Database connections per worker process (default: an eighth of the threads, at least 4).
    db_pool: int | None = field(default_factory=lambda: _optional_int("KLING_DB_POOL"))

    # Webhooks (worker.webhooks): the Standard Webhooks signing secret, `whsec_<base64>`
    # (repr=False, like the API key); the hosts a job's webhook may name (unset: any);
    # how long an event is retried after its first attempt; (connect, read) timeouts.
    # The read timeout is the specification's low end (15-30 s): the receiver's time to answer.
    webhook_secret: str = field(default_factory=lambda: os.environ.get("KLING_WEBHOOK_SECRET", "").strip(), repr=False)
    webhook_hosts: frozenset[str] | None = field(default_factory=lambda: _hosts("KLING_WEBHOOK_HOSTS"))
    webhook_retry_for: float = field(default_factory=lambda: _float("KLING_WEBHOOK_RETRY_FOR", 86400.0))
    webhook_timeout: tuple[float, float] = field(
        default_factory=lambda: (
            _float("KLING_WEBHOOK_CONNECT_TIMEOUT", 5.0),
            _float("KLING_WEBHOOK_READ_TIMEOUT", 15.0),
        )
    )
    # How long a worker may take over one delivery (an archive, a webhook) before the sweep
    # gives it to another: longer than archiving a job's images or a webhook's timeouts.
    delivery_lease: float = field(default_factory=lambda: _float("KLING_DELIVERY_LEASE", 120.0))
    # Result images (worker.archive): where they are kept (file:///dir, s3://bucket/prefix or off),
    # and the most bytes one image may have; a larger one is refused, not cut.
    archive: str = field(default_factory=lambda: os.environ.get("KLING_ARCHIVE", "").strip() or _embedded_archive())
    archive_max_bytes: int = field(default_factory=lambda: _int("KLING_ARCHIVE_MAX_BYTES", DEFAULT_MAX_BYTES))
    # Log lines (worker.logs): Celery's text, or one JSON object per line.
    log_format: str = field(default_factory=lambda: os.environ.get("KLING_LOG_FORMAT", "").strip().lower() or "text")

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("KLING_MAX_ATTEMPTS must be at least 1")
        if self.submit_5xx not in SUBMIT_5XX:
            raise ConfigError(f"KLING_SUBMIT_5XX must be one of {', '.join(SUBMIT_5XX)}, not {self.submit_5xx!r}")
        # The sweep fails a job left `submitting` longer than the grace as interrupted: the
        # grace must outlast a live submit (budget wait, connect, read), or a slow one is failed.
        longest = MAX_BUDGET_SLEEP + self.connect_timeout + self.read_timeout
        if self.submit_grace <= longest:
            raise ConfigError(
                f"KLING_SUBMIT_GRACE ({self.submit_grace:g}s) must be longer than a submit can take: "
                f"{MAX_BUDGET_SLEEP:g}s of budget wait + MODELLIX_CONNECT_TIMEOUT + MODELLIX_READ_TIMEOUT "
                f"= {longest:g}s"
            )
        if self.webhook_secret:
            try:
                WebhookSecret.parse(self.webhook_secret)
            except ValueError as exc:  # its message never holds the secret
                raise ConfigError(f"KLING_WEBHOOK_SECRET: {exc}") from None
        if self.webhook_retry_for < 0:
            raise ConfigError("KLING_WEBHOOK_RETRY_FOR must not be negative")
        if min(self.webhook_timeout) <= 0:
            raise ConfigError("KLING_WEBHOOK_CONNECT_TIMEOUT and KLING_WEBHOOK_READ_TIMEOUT must be positive")
        try:
            ArchiveSpec.parse(self.archive)  # at start-up rather than at a job's end
        except ValueError as exc:  # its message names KLING_ARCHIVE
            raise ConfigError(str(exc)) from None
        if self.archive_max_bytes < 1:
            raise ConfigError("KLING_ARCHIVE_MAX_BYTES must be at least 1")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"KLING_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")


def load() -> Settings:
    return Settings()
