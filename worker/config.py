"""Settings from the environment (12-factor), each with an embedded default, checked at start.

The embedded defaults need no server: SQLite for the job table, kombu's
filesystem transport as the broker and a folder for the result images, all
under ``KLING_HOME`` (``./.kling``).

Each setting is read from its environment variable, else from a ``.env`` file in
the current folder, else its default (pydantic-settings). A value the service
cannot run with fails at construction as one ConfigError, one line per bad
variable, naming it and what it accepts, and never echoing a secret. KLING_ARCHIVE and
KLING_WEBHOOK_SECRET are checked with worker.formats, the parsers the archive and the webhooks use
at work: this module imports none of the service's other modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.formats import ArchiveSpec, webhook_key

DEFAULT_BASE_URL = "https://api.modellix.ai"
DEFAULT_SUBMIT_PATH = "/api/v1/image-to-image/kling/kling-image-o1/async"
# The longest a worker thread sleeps for the fleet's API budget (worker.fleet.slots):
# a claimed job can stay `submitting` this long before its POST even starts.
MAX_BUDGET_SLEEP = 5.0
# What a 5xx answer to a submit means (Settings.submit_5xx).
Submit5xx = Literal["unknown", "retry"]
SUBMIT_5XX: tuple[str, ...] = get_args(Submit5xx)
# What KLING_ARCHIVE_MAX_BYTES defaults to: a 2k PNG from kling-image-o1 is a few MB.
DEFAULT_ARCHIVE_MAX_BYTES = 50 * 1024 * 1024
# How log lines are written (Settings.log_format).
LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
# The file read for settings not in the environment, relative to the current folder.
ENV_FILE = ".env"


class ConfigError(ValueError):
    """A setting with a value the service cannot run with; the message names the variable."""


_SOURCES = SettingsConfigDict(
    env_file=ENV_FILE,
    env_file_encoding="utf-8",
    # Environment variables are case-sensitive on the hosts this runs on: KLING_QUEUE, not kling_queue.
    case_sensitive=True,
    # An empty variable (`KLING_ARCHIVE=` in a compose file) means its default, as an unset one.
    env_ignore_empty=True,
    # A .env shared with docker-compose holds its variables too (MINIO_ROOT_USER ...): not ours to refuse.
    extra="ignore",
)


class _Home(BaseSettings):
    model_config = _SOURCES
    kling_home: str = Field(".kling", validation_alias="KLING_HOME")


def home() -> Path:
    """KLING_HOME (environment, else .env, else ./.kling), absolute."""
    return Path(_Home().kling_home.strip() or ".kling").resolve()


def _embedded_broker() -> str:
    return "filesystem://localhost/"


def _embedded_database() -> str:
    return f"sqlite:///{home() / 'jobs.sqlite'}"


def _embedded_archive() -> str:
    return (home() / "results").as_uri()  # absolute (home() is resolved), spaces percent-encoded


def _hosts(value: object) -> object:
    """A comma-separated list of host names, lower-cased; empty: None (any host)."""
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list | tuple | set | frozenset):
        return frozenset(str(h).strip().lower().rstrip(".") for h in value) - {""} or None
    return value


def _webhook_secret(value: str) -> str:
    if value:
        try:
            webhook_key(value)
        except ValueError as exc:  # its message never holds the secret
            raise ValueError(f"KLING_WEBHOOK_SECRET: {exc}") from None
    return value


def _archive(value: str) -> str:
    ArchiveSpec.parse(value)  # at start-up rather than at a job's end; its message names KLING_ARCHIVE
    return value


def _word(value: Any) -> Any:
    """A choice as people type it: `JSON`, ` json ` and `json` are the same word."""
    return value.strip().lower() if isinstance(value, str) else value


def _env(name: str, default: Any, **checks: Any) -> Any:
    """A field read from the variable `name` (also settable by its field name in Python)."""
    if callable(default):
        return Field(default_factory=default, validation_alias=name, **checks)
    return Field(default, validation_alias=name, **checks)


# The names that hold secrets: their values stay out of repr(), str() and every error message.
SECRET_VARIABLES = frozenset({"MODELLIX_API_KEY", "KLING_WEBHOOK_SECRET"})


class Settings(BaseSettings):
    """Every setting of a process. `Settings()` reads the environment; `Settings(name=value)`
    sets fields by name (tests), the rest still from the environment."""

    model_config = SettingsConfigDict(
        **_SOURCES,
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        # A trailing newline from a secrets file or a copied value is not part of it.
        str_strip_whitespace=True,
        # nan passes every comparison below and would wreck a schedule: a number must be finite.
        allow_inf_nan=False,
    )

    broker_url: str = _env("CELERY_BROKER_URL", _embedded_broker)
    database_url: str = _env("DATABASE_URL", _embedded_database)
    # repr=False: the key must never show up in a log line or a traceback.
    api_key: str = _env("MODELLIX_API_KEY", "", repr=False)
    base_url: str = _env("MODELLIX_BASE_URL", DEFAULT_BASE_URL)
    submit_path: str = _env("MODELLIX_SUBMIT_PATH", DEFAULT_SUBMIT_PATH)
    queue: str = _env("KLING_QUEUE", "kling", min_length=1)

    connect_timeout: float = _env("MODELLIX_CONNECT_TIMEOUT", 5.0, gt=0)
    read_timeout: float = _env("MODELLIX_READ_TIMEOUT", 30.0, gt=0)
    # Transient errors (429/5xx/network): bounded exponential backoff with jitter.
    max_attempts: int = _env("KLING_MAX_ATTEMPTS", 6, ge=1)
    backoff_base: float = _env("KLING_BACKOFF_BASE", 1.0, ge=0)
    backoff_max: float = _env("KLING_BACKOFF_MAX", 60.0, ge=0)
    # A 5xx answer to a submit may come after the task was created. "unknown" (the
    # default, as Modellix's official CLI): the job fails as submit_unknown and is
    # never sent again. "retry" (as Modellix's REST documentation suggests): it is
    # sent again like a 503, at the risk of a second, billed task.
    submit_5xx: Annotated[Submit5xx, BeforeValidator(_word)] = _env("KLING_SUBMIT_5XX", "unknown")
    # 401/402: the account is blocked; jobs wait this long between tries, without limit.
    account_retry: float = _env("KLING_ACCOUNT_RETRY", 60.0, ge=0)

    # Status polling (worker.polling.schedule): first poll after poll_first seconds, each gap poll_factor
    # times the last, at most poll_max; a task not finished poll_deadline seconds after
    # submission fails as timed out.
    poll_first: float = _env("KLING_POLL_FIRST", 2.0, gt=0)
    poll_factor: float = _env("KLING_POLL_FACTOR", 1.25, ge=1)
    poll_max: float = _env("KLING_POLL_MAX", 30.0, gt=0)
    # The fleet learns each request shape's first poll from the tasks it saw (worker.polling.schedule):
    # never sooner than poll_min (nor than poll_first or poll_max if lower), never later than poll_max.
    # False: the configured schedule only, nothing read or written.
    poll_learn: bool = _env("KLING_POLL_LEARN", True)
    poll_min: float = _env("KLING_POLL_MIN", 1.0, gt=0)
    poll_deadline: float = _env("KLING_POLL_DEADLINE", 900.0, gt=0)
    # A job left in `submitting` this long (worker died during the POST) is resolved
    # by the sweeper; see tracking.resolve_interrupted.
    submit_grace: float = _env("KLING_SUBMIT_GRACE", 120.0)
    sweep_interval: float = _env("KLING_SWEEP_INTERVAL", 1.0, gt=0)

    # Fleet-wide API budget (unset = unlimited).
    max_rps: Annotated[float, Field(gt=0)] | None = _env("MODELLIX_MAX_RPS", None)
    max_in_flight: Annotated[int, Field(ge=1)] | None = _env("MODELLIX_MAX_IN_FLIGHT", None)
    # Within a tenant's line, each step of priority counts as this many seconds of waiting
    # (worker.fleet.share.line_of): a job waiting longer than that goes ahead of jobs of one step more.
    priority_aging: float = _env("KLING_PRIORITY_AGING", 60.0, gt=0)
    # HTTP and DB pools are sized to the worker's thread concurrency; each process takes jobs from
    # the line with as many submit threads (worker.wiring.dispatcher).
    concurrency: int = _env("KLING_CONCURRENCY", 32, ge=1)
    # Database connections per worker process (default: an eighth of the threads, at least 4).
    db_pool: Annotated[int, Field(ge=1)] | None = _env("KLING_DB_POOL", None)

    # Webhooks (worker.results.webhooks): the Standard Webhooks signing secret, `whsec_<base64>`
    # (repr=False, like the API key); the hosts a job's webhook may name (unset: any);
    # how long an event is retried after its first attempt; (connect, read) timeouts,
    # read together as `webhook_timeout`.
    # The read timeout is the specification's low end (15-30 s): the receiver's time to answer.
    webhook_secret: Annotated[str, AfterValidator(_webhook_secret)] = _env("KLING_WEBHOOK_SECRET", "", repr=False)
    # NoDecode: a comma-separated list, not the JSON pydantic-settings expects for a set.
    webhook_hosts: Annotated[frozenset[str] | None, NoDecode, BeforeValidator(_hosts)] = _env(
        "KLING_WEBHOOK_HOSTS", None
    )
    webhook_retry_for: float = _env("KLING_WEBHOOK_RETRY_FOR", 86400.0, ge=0)
    webhook_connect_timeout: float = _env("KLING_WEBHOOK_CONNECT_TIMEOUT", 5.0, gt=0)
    webhook_read_timeout: float = _env("KLING_WEBHOOK_READ_TIMEOUT", 15.0, gt=0)
    # How long a worker may take over one delivery (an archive, a webhook) before the sweep
    # gives it to another: longer than archiving a job's images or a webhook's timeouts.
    delivery_lease: float = _env("KLING_DELIVERY_LEASE", 120.0, gt=0)
    # Result images (worker.results.archive): where they are kept (file:///dir, s3://bucket/prefix or off),
    # and the most bytes one image may have; a larger one is refused, not cut.
    archive: Annotated[str, AfterValidator(_archive)] = _env("KLING_ARCHIVE", _embedded_archive)
    archive_max_bytes: int = _env("KLING_ARCHIVE_MAX_BYTES", DEFAULT_ARCHIVE_MAX_BYTES, ge=1)

    # Operations: the port of each worker process's metrics and health server (worker.ops.health;
    # unset: none served; 0: any free port, logged), and how log lines are written.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = _env("KLING_METRICS_PORT", None)
    log_format: Annotated[LogFormat, BeforeValidator(_word)] = _env("KLING_LOG_FORMAT", "text")
    # Celery's task events from the start (false: from when a monitor such as Flower asks, see app.py).
    task_events: bool = _env("KLING_TASK_EVENTS", False)

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - set(type(self).model_fields) - {"webhook_timeout"}
        if unknown:  # extra="ignore" is for .env's other lines, not for a misspelt keyword
            raise TypeError(f"Settings() has no field {', '.join(sorted(unknown))}")
        try:
            super().__init__(**values)
            return
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        # Raised outside the except block: the ValidationError, which holds the raw values
        # (a secret among them), is not kept as this error's context.
        raise ConfigError("\n".join(dict.fromkeys(_describe(error) for error in errors)))

    @model_validator(mode="before")
    @classmethod
    def _split_webhook_timeout(cls, data: Any) -> Any:
        """`Settings(webhook_timeout=(connect, read))` sets the two timeouts it is read from."""
        if isinstance(data, Mapping) and "webhook_timeout" in data:
            data = dict(data)
            timeout = data.pop("webhook_timeout")
            if isinstance(timeout, Sequence) and len(timeout) == 2:
                for field, seconds in zip(("webhook_connect_timeout", "webhook_read_timeout"), timeout, strict=True):
                    data.pop(field, None)
                    data[variable(field)] = seconds  # over what the environment gave under that name
            else:
                raise ValueError("webhook_timeout must be a (connect, read) pair")
        return data

    @model_validator(mode="after")
    def _submit_grace_outlasts_a_submit(self) -> Settings:
        # The sweep fails a job left `submitting` longer than the grace as interrupted: the
        # grace must outlast a live submit (budget wait, connect, read), or a slow one is failed.
        longest = MAX_BUDGET_SLEEP + self.connect_timeout + self.read_timeout
        if self.submit_grace <= longest:
            raise ValueError(
                f"KLING_SUBMIT_GRACE ({self.submit_grace:g}s) must be longer than a submit can take: "
                f"{MAX_BUDGET_SLEEP:g}s of budget wait + MODELLIX_CONNECT_TIMEOUT + MODELLIX_READ_TIMEOUT "
                f"= {longest:g}s"
            )
        return self

    @property
    def webhook_timeout(self) -> tuple[float, float]:
        """(connect, read) seconds for a webhook delivery, as requests takes them."""
        return (self.webhook_connect_timeout, self.webhook_read_timeout)


def variable(field: str) -> str:
    """The environment variable a field is read from."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else field.upper()


_VARIABLES = {variable(name): name for name in Settings.model_fields}


def _describe(error: Mapping[str, Any]) -> str:
    """One line for one of pydantic's errors: the variable, what it accepts, the value unless secret."""
    loc = error.get("loc") or ()
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "value_error" or not loc:  # our own checks: their messages name their variables
        return str(ctx.get("error") or error["msg"]).removeprefix("Value error, ")
    field = str(loc[0]) if str(loc[0]) in Settings.model_fields else _VARIABLES.get(str(loc[0]))
    if field is None:
        return f"{loc[0]}: {error['msg']}"
    name = variable(field)
    value = "" if name in SECRET_VARIABLES else f"={error.get('input')!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{name}{value} is not a whole number"
    if kind in ("float_parsing", "float_type"):
        return f"{name}{value} is not a number"
    if kind == "finite_number":
        return f"{name}{value} is not a finite number"
    if kind == "literal_error":
        choices = get_args(Settings.model_fields[field].annotation)
        shown = "" if name in SECRET_VARIABLES else f", not {error.get('input')!r}"
        return f"{name} must be one of {', '.join(choices)}{shown}"
    bounds = {
        "greater_than": "more than {gt:g}",
        "greater_than_equal": "at least {ge:g}",
        "less_than": "less than {lt:g}",
        "less_than_equal": "at most {le:g}",
        "string_too_short": "a name, not blank",
    }
    if kind in bounds:
        return f"{name} must be {bounds[kind].format(**ctx)}" + ("" if not value else f", not {error.get('input')!r}")
    return f"{name}: {error['msg']}"


def load() -> Settings:
    return Settings()
