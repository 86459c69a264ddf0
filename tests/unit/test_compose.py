"""docker-compose.yml and deploy/prometheus.yml, checked without the Docker engine: the Compose
Specification's JSON schema (tests/data/compose-spec.json), then what this stack needs."""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from worker import config
from worker.config import Settings
from worker.dev.processes import ROOT

SCHEMA = json.loads((Path(__file__).parents[1] / "data" / "compose-spec.json").read_text())
# Values the stack may hold in clear: the development defaults the README and the file document.
DEV_DEFAULTS = {"kling", "kling-minio-secret", "sandbox-key"}
_SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|PASS\b|TOKEN", re.I)
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
_CREDENTIALS = re.compile(r"://([^:/@\s]+):([^@\s]+)@")


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def interpolated(value: object) -> str:
    """A value as Compose gives it with nothing set on the host: `${X:-default}` is the default."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", str(value)).replace("$$", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def healthcheck_code(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[3]


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return compose()


def test_the_compose_file_follows_the_compose_specification(stack):
    assert SCHEMA["title"] == "Compose Specification"
    assert schema_errors(stack) == []
    # What the schema leaves open, Compose refuses: every dependency is a service of the file.
    for name, service in stack["services"].items():
        for needed in service.get("depends_on") or {}:
            assert needed in stack["services"], f"{name} depends on {needed}, which is not a service"


@pytest.mark.parametrize(
    "break_it, where",
    [
        (lambda s: s["services"]["worker"]["healthcheck"].update(intervall="5s"), "services/worker/healthcheck"),
        (lambda s: s["services"]["worker"]["depends_on"]["migrate"].update(condition="done"), "condition"),
        (lambda s: s["services"]["flower"].update(ports={"5555": 5555}), "services/flower/ports"),
        (lambda s: s["services"]["prometheus"].update(image=["prom/prometheus"]), "services/prometheus/image"),
        (lambda s: s.update(servics={}), "servics"),
    ],
)
def test_a_broken_copy_fails_the_schema(stack, break_it, where):
    broken = copy.deepcopy(stack)
    break_it(broken)
    errors = schema_errors(broken)
    assert errors and any(where in e for e in errors), errors


def _command_help(command: list[str], tmp_path: Path) -> str:
    """The help of the command's (sub)command, run from the checkout as the image runs it."""
    if command[0] == "celery":
        assert command[1:3] == ["-A", "worker"], command  # the app the image holds
        args = [sys.executable, "-m", "celery", *command[1:4]]  # -A worker worker|beat
    else:
        words = list(itertools.takewhile(lambda a: not a.startswith("-"), command[1:]))  # db upgrade, sandbox
        args = [sys.executable, "-m", "worker.cli", *words]
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "DATABASE_URL")}
    env.update(KLING_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    done = subprocess.run([*args, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


def test_every_built_service_runs_a_command_that_exists_with_options_it_takes(stack, tmp_path):
    built = {name: s for name, s in stack["services"].items() if s.get("build") == "."}
    assert set(built) == {"migrate", "sandbox", "worker", "beat"}
    for name, service in built.items():
        command = service["command"]
        assert command[0] in ("kling-worker", "celery"), name
        shown = _command_help(command, tmp_path)
        for option in (a.split("=", 1)[0] for a in command if a.startswith("--")):
            assert option in shown, f"{name}: {option} is not an option of {command[:4]}"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet: the test reads exit codes, not logs."""


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_worker_healthcheck_asks_healthz_on_the_metrics_port_it_sets(stack, health_server):
    worker = stack["services"]["worker"]
    port = environment(worker)["KLING_METRICS_PORT"]
    assert Settings(metrics_port=port).metrics_port == 9808 and [str(p) for p in worker["expose"]] == [port]
    assert "ports" not in worker  # replicas would fight over a fixed host port
    code = healthcheck_code(worker)
    assert f"http://127.0.0.1:{port}/healthz" in code

    # The check itself, run against a real server standing in for the worker: healthy, then not.
    local = code.replace(f"127.0.0.1:{port}", f"127.0.0.1:{health_server.server_address[1]}")

    def run() -> int:
        return subprocess.run([sys.executable, "-c", local], capture_output=True, timeout=30).returncode

    assert run() == 0
    _Health.status = 503
    try:
        assert run() != 0
    finally:
        _Health.status = 200
    health_server.shutdown()
    health_server.server_close()
    assert run() != 0  # nothing listening


def test_flower_prometheus_and_rabbitmq_management_are_published(stack):
    services = stack["services"]
    published = {name: [str(p) for p in s.get("ports", [])] for name, s in services.items()}
    assert "127.0.0.1:5555:5555" in published["flower"]
    assert "127.0.0.1:9090:9090" in published["prometheus"]
    assert "127.0.0.1:15672:15672" in published["rabbitmq"]
    assert not published.get("postgres")  # would clash with a PostgreSQL on the host; see the file's header
    # Nothing in this stack asks for a password that is not a development default: host-only, all of it.
    assert all(p.startswith("127.0.0.1:") for ports in published.values() for p in ports), published

    flower = services["flower"]
    assert flower["image"].startswith("mher/flower:2.") and flower["command"][:2] == ["celery", "flower"]
    assert "--port=5555" in flower["command"]
    workers = environment(services["worker"])["CELERY_BROKER_URL"]
    assert environment(flower)["CELERY_BROKER_URL"] == workers == environment(services["beat"])["CELERY_BROKER_URL"]
    assert flower["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


def test_the_workers_wait_for_what_they_need_and_not_for_the_sandbox(stack):
    worker = stack["services"]["worker"]
    assert set(worker["depends_on"]) == {"rabbitmq", "migrate", "minio-bucket"}
    assert "profiles" not in stack["services"]["sandbox"]  # up by default: the default base URL is the sandbox
    assert interpolated(environment(worker)["MODELLIX_BASE_URL"]) == "http://sandbox:8080"


def test_no_secret_is_written_in_the_file_but_the_documented_dev_defaults(stack):
    found = 0
    for name, service in stack["services"].items():
        for key, raw in environment(service).items():
            value = interpolated(raw)
            for user, password in _CREDENTIALS.findall(value):
                found += 1
                assert {user, password} <= DEV_DEFAULTS, f"{name}.{key} holds credentials"
            if _SECRET_NAME.search(key) and value:
                found += 1
                assert value in DEV_DEFAULTS, f"{name}.{key} is hard-coded"
        for word in service.get("command") or []:
            for user, password in _CREDENTIALS.findall(str(word)):
                found += 1
                assert {user, password} <= DEV_DEFAULTS, f"{name}'s command holds credentials"
    assert found >= 10  # the check looked at the stack's credentials, not at nothing
    # The API key and the webhook secret come from the host (or Compose's .env): never written here.
    for name in ("worker", "beat", "migrate", "sandbox"):
        assert environment(stack["services"][name])["MODELLIX_API_KEY"] == "${MODELLIX_API_KEY:-sandbox-key}"
    assert environment(stack["services"]["worker"])["KLING_WEBHOOK_SECRET"] == "${KLING_WEBHOOK_SECRET:-}"


def test_the_shared_environment_is_what_a_worker_needs_and_its_settings_start(stack, monkeypatch, tmp_path):
    shared = {k: str(v) for k, v in stack["x-kling-env"].items()}
    needed = {"CELERY_BROKER_URL", "DATABASE_URL", "MODELLIX_BASE_URL", "MODELLIX_API_KEY", "KLING_ARCHIVE"}
    needed |= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}  # for boto3
    assert needed <= set(shared)
    for name in ("worker", "beat", "migrate"):
        assert environment(stack["services"][name]).items() >= shared.items(), name

    known = {config.variable(field) for field in Settings.model_fields}
    worker_env = environment(stack["services"]["worker"])
    ours = {k for k in worker_env if k.startswith(("KLING_", "MODELLIX_", "CELERY_", "DATABASE_"))}
    assert ours <= known, f"not settings of the service: {ours - known}"
    # The file's values, as Compose gives them with nothing set on the host, pass the start-up checks.
    for name in known | {"KLING_HOME"}:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    for key in ours:
        monkeypatch.setenv(key, interpolated(worker_env[key]))
    settings = Settings()
    assert settings.archive == "s3://kling-results/results" and settings.metrics_port == 9808
    assert settings.broker_url.startswith("amqp://") and settings.database_url.startswith("postgresql+psycopg://")


def test_prometheus_scrapes_every_worker_on_its_metrics_port(stack):
    prometheus = stack["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    mounts = [str(v) for v in prometheus["volumes"]]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert set(scrape) <= {"global", "scrape_configs", "rule_files", "alerting"}
    workers = jobs["kling-worker"]
    assert workers.get("metrics_path", "/metrics") == "/metrics"
    (discovery,) = workers["dns_sd_configs"]
    port = int(environment(stack["services"]["worker"])["KLING_METRICS_PORT"])
    assert discovery == {"names": ["worker"], "type": "A", "port": port, "refresh_interval": "15s"}


def test_the_image_holds_what_the_services_run_and_the_context_leaves_out_the_rest():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY")]
    copied = {source.rstrip("/") for sources in copies for source in sources}
    assert {"pyproject.toml", "worker", "models", "migrations", "alembic.ini"} <= copied
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".env", ".kling", ".git"} <= ignored  # 100 MB of virtualenv, and secrets, stay out
