"""`kling-worker`: enqueue jobs, query and manage the job table, run a worker, the sandbox, the demo, doctor.

The command tree is click's; `main` runs it and turns every mistake into one
line on stderr and exit code 2, never a traceback: a bad option (click), a
setting the service cannot run with (ConfigError), an invalid request
(ValidationError), a missing job database, or a database or broker that
cannot be used. The commands live in cli_enqueue and cli_jobs; what they
print, in tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from kombu.exceptions import OperationalError
from marshmallow import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from worker import resources
from worker.cli import printing
from worker.cli.enqueue import PartlySent, build_request, enqueue
from worker.cli.jobs import jobs, results
from worker.cli.params import UsageError
from worker.cli.tenants import tenants_
from worker.config import ConfigError, home
from worker.ops import outages
from worker.schemas import errors_line

__all__ = ["build_request", "cli", "main"]

PROG = "kling-worker"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """Enqueue kling-image-o1 jobs, follow them in the job table, retry or prune them, and run the service.

    Settings come from the environment (see the README); `kling-worker doctor` checks them.
    """


cli.add_command(enqueue)
cli.add_command(jobs)
cli.add_command(results)
cli.add_command(tenants_)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code (0 done, 1 not done, 2 a mistake, 130 interrupted)."""
    try:
        code = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.format_message(), file=sys.stderr)
        return 2
    except click.ClickException as exc:  # a bad option or argument: click found it before the command ran
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else PROG
        hint = f" (see `{where} --help`)" if isinstance(exc, click.UsageError) else ""
        print(f"{where}: {_one_line(exc.format_message())}{hint}", file=sys.stderr)
        return 2
    except click.exceptions.Abort:
        return 130
    except ValidationError as exc:
        print(f"{PROG}: the request is not valid: {errors_line(exc.messages)}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        for line in str(exc).splitlines():  # one line per bad variable
            print(f"{PROG}: {line}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"{PROG}: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        # Not migrated, or not reachable: the operator's to fix, said in one line.
        print(
            f"{PROG}: the job database is not usable ({outages.reason(exc)}); "
            "is DATABASE_URL right, and has `kling-worker db upgrade` run?",
            file=sys.stderr,
        )
        return 2
    except PartlySent as exc:  # one message (`enqueue PROMPT`): nothing was sent
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OperationalError as exc:
        print(f"{PROG}: the broker is not usable ({_one_line(str(exc))}); is CELERY_BROKER_URL right?", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


@cli.group("db")
def db_group() -> None:
    """The job database."""


@db_group.command("upgrade")
def db_upgrade() -> int:
    """Apply the Alembic migrations (also: alembic upgrade head)."""
    from models.migrate import upgrade

    upgrade(resources.settings().database_url)
    printing.say("database is at the latest revision")
    return 0


@cli.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", default=None, help="Default: MODELLIX_API_KEY, else 'sandbox-key'.")
@click.option(
    "--task-seconds",
    default="2",
    show_default=True,
    help="Every task's duration, or a range LOW-HIGH: a base per request shape within it, ±15 % per task.",
)
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--rate-429", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--rate-500", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--rate-503", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True)
def run_sandbox(
    host: str,
    port: int,
    api_key: str | None,
    task_seconds: str,
    latency: float,
    rate_429: float,
    rate_500: float,
    rate_503: float,
    fail_rate: float,
) -> int:
    """Run the sandbox Modellix API server (for tests and the demo)."""
    from worker.dev.sandbox import Faults, SandboxServer, parse_task_seconds

    try:
        seconds = parse_task_seconds(task_seconds)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--task-seconds") from None
    faults = Faults(latency=latency, rate_429=rate_429, rate_500=rate_500, rate_503=rate_503, fail_rate=fail_rate)
    key = api_key or resources.settings().api_key or "sandbox-key"
    server = SandboxServer(host, port, api_key=key, task_seconds=seconds, faults=faults)
    printing.say(f"sandbox Modellix API on http://{host}:{port}")
    server.serve_forever()
    return 0


@cli.command("worker")
@click.option("--sandbox", "with_sandbox", is_flag=True, help="Also run the sandbox API and point the worker at it.")
@click.option(
    "--sandbox-port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="The sandbox's port on 127.0.0.1 (0: any free port).",
)
@click.option("--concurrency", type=click.IntRange(min=1), help="Threads (default: KLING_CONCURRENCY).")
def run_worker(with_sandbox: bool, sandbox_port: int, concurrency: int | None) -> int:
    """Run a worker and the sweep here (the embedded defaults unless configured).

    After `make demo`, this is how a newcomer keeps a worker running and enqueues jobs to it.
    """
    import os
    import signal
    import subprocess

    from models.migrate import upgrade

    cfg = resources.settings()
    upgrade(cfg.database_url)
    env = dict(os.environ)
    server = None
    if with_sandbox:
        from worker.dev.sandbox import SandboxServer

        key = cfg.api_key or "sandbox-key"
        try:
            server = SandboxServer(port=sandbox_port, api_key=key).start()
        except OSError as exc:
            raise UsageError(f"the sandbox cannot listen on 127.0.0.1:{sandbox_port}: {exc.strerror or exc}") from None
        env.update(MODELLIX_BASE_URL=server.url, MODELLIX_API_KEY=key)
        print(f"sandbox Modellix API at {server.url} (key {'from MODELLIX_API_KEY' if cfg.api_key else 'sandbox-key'})")
        if not (cfg.base_url == server.url and cfg.api_key == key):
            # doctor, run from another terminal, checks the API the settings name: tell it about this one.
            print(
                f"for doctor in another terminal: MODELLIX_BASE_URL={server.url} MODELLIX_API_KEY={key}"
                if not cfg.api_key
                else f"for doctor in another terminal: MODELLIX_BASE_URL={server.url}"
            )
    base = env.get("MODELLIX_BASE_URL") or cfg.base_url
    print(f"worker: broker {cfg.broker_url}; database {cfg.database_url}; API {base}", flush=True)
    cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-B", "--loglevel=INFO"]
    cmd += [f"--schedule={Path(home()) / 'celerybeat-schedule'}"]
    if concurrency:
        cmd += [f"--concurrency={concurrency}"]
    proc = subprocess.Popen(cmd, env=env)
    # `kill` reaches only this process: pass it on, or the worker would outlive the sandbox it calls.
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # Celery got the same Ctrl-C and shuts down warmly
        return 130
    finally:
        if server is not None:
            server.stop()


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def run_doctor(as_json: bool) -> int:
    """Check the broker and its consumers, the database, the API, the key, the balance and any fleet pause.

    Exit code 1 on any FAIL.
    """
    from dataclasses import asdict

    from worker.cli import doctor

    checks = doctor.run()
    if as_json:
        print(json.dumps([asdict(check) for check in checks]))
    else:
        rows = [("ok" if check.ok else "FAIL", check.name, check.detail) for check in checks]
        printing.table(["", "check", "detail"], rows, header=False)
    return 0 if all(check.ok for check in checks) else 1


@cli.command("demo")
@click.option("--timeout", type=click.FloatRange(min=0), default=120.0, show_default=True)
def run_demo(timeout: float) -> int:
    """Run the whole service embedded (SQLite, file broker, sandbox) on four example jobs."""
    from worker.dev.demo import run

    return run(timeout)


if __name__ == "__main__":
    sys.exit(main())
