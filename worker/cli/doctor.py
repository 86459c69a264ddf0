# mypy: disallow-untyped-calls=False
# (kombu's Connection is untyped; the broker checks call it.)
"""`kling-worker doctor`: is this host's configuration able to run jobs? One verdict per check.

Each check is one function returning a `Check`; `run()` calls them in order and
passes on what a later check needs, so a check that cannot run because an
earlier one failed says so instead of raising. No check prints the API key:
the client scrubs it from its errors, and the broker URL is shown with its
password masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker import resources
from worker.config import DEFAULT_BASE_URL, Settings, home
from worker.modellix import AccountError, ModellixClient, ModellixError, NetworkError, ServerError

BROKER_TIMEOUT = 5.0
# What the consumers check says where the transport cannot count consumers (all but AMQP).
CONSUMERS_UNKNOWN = "consumers: unknown for this transport"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _short(exc: BaseException) -> str:
    """An error's first line, without its traceback-length tail."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _skipped(name: str, because: str) -> Check:
    return Check(name, False, f"not checked: {because}")


# -- the broker ---------------------------------------------------------------


def check_broker(cfg: Settings) -> tuple[Check, Any]:
    """Connect to the broker; returns the check and the open connection (None when it failed)."""
    from kombu.connection import Connection

    if cfg.broker_url.startswith("filesystem"):
        folder = home() / "broker" / "queue"
        found = "exists" if folder.is_dir() else "not created yet (a worker or enqueue creates it)"
        return Check("broker", True, f"embedded filesystem broker, folder {folder} {found}"), None
    conn = Connection(cfg.broker_url, connect_timeout=BROKER_TIMEOUT)
    where = conn.as_uri()  # the password masked
    try:
        conn.connect()
    except Exception as exc:  # any transport's own error: a verdict, not a traceback
        conn.release()
        return Check("broker", False, f"{where} unreachable: {_short(exc)}"), None
    return Check("broker", True, f"{where} reachable"), conn


def check_consumers(cfg: Settings, conn: Any, broker: Check) -> Check:
    """Workers consuming the queue: a passive declare on AMQP; other transports cannot tell."""
    name = "consumers"
    if not broker.ok:
        return _skipped(name, "the broker is unreachable")
    if conn is None or conn.transport.driver_type != "amqp":
        return Check(name, True, CONSUMERS_UNKNOWN)
    try:
        channel = conn.channel()
        try:
            _, messages, consumers = channel.queue_declare(queue=cfg.queue, passive=True)
        finally:
            try:
                channel.close()
            except Exception:  # a passive declare of a missing queue already closed it
                pass
    except Exception as exc:
        if getattr(exc, "code", None) == 404:
            return Check(name, False, f"queue {cfg.queue!r} does not exist: no worker has started on it")
        return Check(name, False, f"queue {cfg.queue!r}: {_short(exc)}")
    detail = f"queue {cfg.queue!r}: {consumers} consumer(s), {messages} message(s) waiting"
    if consumers < 1:
        return Check(name, False, detail + ": no worker is taking jobs")
    return Check(name, True, detail)


def check_queue(cfg: Settings) -> tuple[Check, Check]:
    """The broker and consumers checks together, the connection opened and closed here
    (doctor, and `enqueue --wait` asking why a job stays queued)."""
    broker, conn = check_broker(cfg)
    try:
        return broker, check_consumers(cfg, conn, broker)
    finally:
        if conn is not None:
            conn.release()


# -- the database -------------------------------------------------------------


def check_database(res: resources.Resources) -> Check:
    """Reachable, and at the migrations' head revision."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    import migrations

    name = "database"
    head = ScriptDirectory(str(Path(migrations.__file__).parent)).get_current_head()
    engine = res.engine
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except Exception as exc:
        return Check(name, False, f"{where} unreachable: {_short(exc)}")
    if current is None:
        return Check(name, False, f"{where} not migrated (no revision; head is {head}): run kling-worker db upgrade")
    if current != head:
        return Check(name, False, f"{where} at revision {current}, head is {head}: run kling-worker db upgrade")
    return Check(name, True, f"{where} reachable, at head ({head})")


def check_pause(res: resources.Resources, database: Check) -> Check:
    """Any fleet-wide pause (after a 429, 401 or 402), with its reason and the seconds left."""
    from worker.cli import fleet

    name = "pause"
    if not database.ok:
        return _skipped(name, "the database is not ready")
    try:
        with res.transaction() as s:
            found = fleet.status(res.settings, s)
    except Exception as exc:
        return Check(name, False, f"could not read the budget row: {_short(exc)}")
    if found["paused_for"]:
        return Check(name, False, f"the fleet is paused for {found['paused_for']:g}s more: {found['pause_reason']}")
    return Check(name, True, "no fleet pause")


def check_line(res: resources.Resources, database: Check) -> Check:
    """What waits in the line, per tenant (queued, in flight, caps): informative, never a failure."""
    from worker.cli.tenants import listing

    name = "line"
    if not database.ok:
        return _skipped(name, "the database is not ready")
    try:
        with res.transaction() as s:
            rows = listing(s)
    except Exception as exc:
        return Check(name, False, f"could not read the line: {_short(exc)}")
    busy = [r for r in rows if r["queued"] or r["in_flight"]]
    if not busy:
        return Check(name, True, "no job waiting or in flight")
    parts = []
    for r in busy:
        caps = [f"max {r['max_in_flight']} in flight"] if r["max_in_flight"] else []
        caps += [f"max {r['max_rps']:g}/s"] if r["max_rps"] else []
        shown = f"{r['tenant']}: {r['queued']} queued, {r['in_flight']} in flight, weight {r['weight']:g}"
        parts.append(shown + (f" ({', '.join(caps)})" if caps else ""))
    return Check(name, True, "; ".join(parts))


# -- the API ------------------------------------------------------------------


def check_base_url(cfg: Settings) -> Check:
    if cfg.base_url.rstrip("/") == DEFAULT_BASE_URL:
        return Check("base url", True, f"the real Modellix API ({DEFAULT_BASE_URL}): jobs are billed")
    return Check("base url", True, f"not the real API: {cfg.base_url} (a sandbox or a proxy)")


def ask_key(client: ModellixClient) -> bool | ModellixError:
    """One call to the key-validation endpoint (it answers 200 whatever the key): the api and key
    checks both read its outcome, so doctor asks the API once."""
    try:
        return client.validate_key()
    except ModellixError as exc:
        return exc


def check_api(base_url: str, answer: bool | ModellixError) -> Check:
    """The API answers."""
    name = "api"
    if isinstance(answer, NetworkError):
        return Check(name, False, f"{base_url} unreachable: {answer.message}")
    if isinstance(answer, ServerError):
        return Check(name, False, f"{base_url} answers {answer.status}: {answer.message}")
    if isinstance(answer, ModellixError):  # an answer all the same: the key check says what it means
        return Check(name, True, f"{base_url} reachable (answered {answer.status})")
    return Check(name, True, f"{base_url} reachable")


def check_key(cfg: Settings, api: Check, answer: bool | ModellixError) -> Check:
    name = "key"
    if not cfg.api_key:
        return Check(name, False, "MODELLIX_API_KEY is not set")
    if not api.ok:
        return _skipped(name, "the API is unreachable")
    if isinstance(answer, AccountError):
        return Check(name, False, f"key invalid ({answer.status}: {answer.message})")
    if isinstance(answer, ModellixError):
        return Check(name, False, f"could not validate the key: {answer.message}")
    return Check(name, True, "key valid") if answer else Check(name, False, "key invalid: the API does not take it")


def check_balance(client: ModellixClient, key: Check) -> Check:
    name = "balance"
    if not key.ok:
        return _skipped(name, "no valid key")
    try:
        balance = client.balance()
    except ModellixError as exc:
        return Check(name, False, f"could not read the balance: {exc.message}")
    if balance <= 0:
        return Check(name, False, f"balance {balance:g}: submits will be refused (402)")
    return Check(name, True, f"balance {balance:g}")


# -- all of them ----------------------------------------------------------------


def run() -> list[Check]:
    """Every check, in order; none raises."""
    res = resources.get()
    cfg = res.settings
    broker, consumers = check_queue(cfg)
    database = check_database(res)
    pause = check_pause(res, database)
    line = check_line(res, database)
    client = res.client
    answer = ask_key(client)
    api = check_api(client.base_url, answer)
    key = check_key(cfg, api, answer)
    balance = check_balance(client, key)
    return [broker, consumers, database, api, key, balance, pause, line, check_base_url(cfg)]
