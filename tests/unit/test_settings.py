"""The documented defaults that shape a worker: poll schedule, pools, delivery settings."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import worker
from worker import config, resources
from worker.config import Settings
from worker.dev.processes import ROOT
from worker.modellix import policy
from worker.polling import schedule


def test_poll_schedule_is_2s_then_times_1_25_capped_at_30s():
    cfg = Settings()
    gaps = [schedule.gap(i, cfg) for i in range(20)]
    due = [round(sum(gaps[: i + 1]), 1) for i in range(5)]
    assert due == [2.0, 4.5, 7.6, 11.5, 16.4]  # the README's figures
    assert max(gaps) == 30.0 and gaps[-1] == 30.0


def test_retry_backoff_doubles_with_jitter_and_honours_retry_after():
    cfg = Settings(backoff_base=1.0, backoff_max=60.0)
    for attempt, ceiling in ((1, 1), (2, 2), (3, 4), (8, 60), (20, 60)):
        delays = [policy.retry_delay(attempt, cfg) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert policy.retry_delay(1, cfg, retry_after=9) == 9


def test_the_submit_grace_must_outlast_a_live_submit():
    # 5 s of budget wait + 5 s connect + 30 s read: a shorter grace would fail live submits as interrupted.
    with pytest.raises(ValueError, match="KLING_SUBMIT_GRACE .* 40s"):
        Settings(submit_grace=40)
    assert Settings(submit_grace=41).submit_grace == 41
    assert Settings(submit_grace=10, connect_timeout=1, read_timeout=3).submit_grace == 10


def test_at_least_one_attempt():
    with pytest.raises(ValueError, match="KLING_MAX_ATTEMPTS"):
        Settings(max_attempts=0)
    assert Settings(max_attempts=1).max_attempts == 1


@pytest.mark.parametrize("concurrency, db_pool, expected", [("128", None, 16), ("16", None, 4), ("32", "7", 7)])
def test_database_pool_is_an_eighth_of_the_threads_at_least_four(configure, concurrency, db_pool, expected):
    configure(KLING_CONCURRENCY=concurrency, **({"KLING_DB_POOL": db_pool} if db_pool else {}))
    assert resources.get().db_pool_size == expected


def test_http_pool_holds_a_connection_per_thread(configure):
    configure(KLING_CONCURRENCY="48", MODELLIX_BASE_URL="http://127.0.0.1:9")
    adapter = resources.get().client.session.get_adapter("http://127.0.0.1:9")
    assert adapter._pool_maxsize >= 48


def test_delivery_settings_lose_no_message(configure, tmp_path):
    configure(KLING_HOME=str(tmp_path))
    from worker.wiring.app import app

    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost  # a killed worker's message is requeued
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_pool == "threads"
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"


def test_kling_home_holds_the_embedded_database(monkeypatch, tmp_path):
    from worker import config

    monkeypatch.setenv("KLING_HOME", str(tmp_path / "h"))
    assert config.home() == tmp_path / "h"
    assert Settings().database_url == f"sqlite:///{tmp_path / 'h' / 'jobs.sqlite'}"
    monkeypatch.delenv("KLING_HOME")
    monkeypatch.chdir(tmp_path)
    assert config.home() == tmp_path / ".kling"


def test_celery_finds_the_app_as_worker_celery(configure, tmp_path):
    configure(KLING_HOME=str(tmp_path))
    import worker
    from worker.wiring.app import app

    assert worker.celery is app  # what `celery -A worker` looks up
    with pytest.raises(AttributeError):
        _ = worker.nothing_here


def test_the_job_row_as_json_has_the_documented_columns():
    from models.job import Job

    documented = {
        "id",
        "status",
        "modellix_task_id",
        "request",
        "metadata",
        "result_urls",
        "error_code",
        "error_message",
        "attempts",
        "polls",
        "next_poll_at",
        "last_response",
        "created_at",
        "updated_at",
        "submitted_at",
        "finished_at",
        "webhook",
        "callback",
        "files",
        "retry_of",
        "tenant",
        "priority",
        "due_at",
    }
    assert set(Job(id="j", status="queued", request={}).to_dict()) == documented


# -- configuration checked at start ----------------------------------------------------------

# Every variable Settings reads, and KLING_HOME: cleared so that the machine's own settings
# (or a .env in the checkout) do not stand in for the defaults under test.
VARIABLES = sorted({config.variable(name) for name in Settings.model_fields} | {"KLING_HOME"})


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """No setting in the environment, and the current folder an empty one (no .env)."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("KLING_CONCURRENCY", "abc", "KLING_CONCURRENCY='abc' is not a whole number"),
        ("KLING_DB_POOL", "2.5", "KLING_DB_POOL='2.5' is not a whole number"),
        ("MODELLIX_READ_TIMEOUT", "soon", "MODELLIX_READ_TIMEOUT='soon' is not a number"),
        ("MODELLIX_MAX_RPS", "nan", "MODELLIX_MAX_RPS='nan' is not a finite number"),
        ("KLING_SUBMIT_5XX", "sometimes", "KLING_SUBMIT_5XX must be one of unknown, retry, not 'sometimes'"),
        ("KLING_LOG_FORMAT", "xml", "KLING_LOG_FORMAT must be one of text, json, not 'xml'"),
        ("KLING_MAX_ATTEMPTS", "0", "KLING_MAX_ATTEMPTS must be at least 1, not '0'"),
        ("KLING_CONCURRENCY", "0", "KLING_CONCURRENCY must be at least 1, not '0'"),
        ("MODELLIX_MAX_IN_FLIGHT", "0", "MODELLIX_MAX_IN_FLIGHT must be at least 1, not '0'"),
        ("MODELLIX_MAX_RPS", "0", "MODELLIX_MAX_RPS must be more than 0, not '0'"),
        ("KLING_POLL_FACTOR", "0.5", "KLING_POLL_FACTOR must be at least 1, not '0.5'"),
        ("KLING_SWEEP_INTERVAL", "-1", "KLING_SWEEP_INTERVAL must be more than 0, not '-1'"),
        ("KLING_WEBHOOK_READ_TIMEOUT", "0", "KLING_WEBHOOK_READ_TIMEOUT must be more than 0, not '0'"),
        ("KLING_METRICS_PORT", "65536", "KLING_METRICS_PORT must be at most 65535, not '65536'"),
        ("KLING_METRICS_PORT", "http", "KLING_METRICS_PORT='http' is not a whole number"),
        ("KLING_QUEUE", " ", "KLING_QUEUE must be a name, not blank, not ' '"),
        ("KLING_ARCHIVE", "ftp://x", "KLING_ARCHIVE must be file:///absolute/dir, s3://bucket/prefix or off"),
        ("KLING_SUBMIT_GRACE", "30", "KLING_SUBMIT_GRACE (30s) must be longer than a submit can take"),
    ],
)
def test_a_bad_value_fails_at_start_naming_its_variable_and_what_it_accepts(clean, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(config.ConfigError) as caught:
        Settings()
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text
    assert "pydantic" not in text and "http" not in text.replace("'http'", "")  # no library's wording or links
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_every_bad_variable_gets_one_line(clean, monkeypatch):
    monkeypatch.setenv("KLING_CONCURRENCY", "many")
    monkeypatch.setenv("KLING_SUBMIT_5XX", "maybe")
    monkeypatch.setenv("KLING_POLL_MAX", "-3")
    with pytest.raises(config.ConfigError) as caught:
        Settings()
    assert sorted(str(caught.value).splitlines()) == [
        "KLING_CONCURRENCY='many' is not a whole number",
        "KLING_POLL_MAX must be more than 0, not '-3'",
        "KLING_SUBMIT_5XX must be one of unknown, retry, not 'maybe'",
    ]


def test_a_dotenv_file_is_read_and_the_environment_wins_over_it(clean, monkeypatch):
    (clean / ".env").write_text(
        "# a comment\n"
        "KLING_CONCURRENCY=7\n"
        "KLING_QUEUE=from-file\n"
        "KLING_HOME=dotenv-home\n"
        "KLING_METRICS_PORT=9808\n"
        "KLING_WEBHOOK_HOSTS=a.example, B.example\n"
        "MINIO_ROOT_USER=kling\n"  # a docker-compose variable in the same file: not ours, not refused
    )
    monkeypatch.setenv("KLING_QUEUE", "from-env")
    settings = Settings()
    assert (settings.concurrency, settings.queue, settings.metrics_port) == (7, "from-env", 9808)
    assert settings.webhook_hosts == frozenset({"a.example", "b.example"})
    assert config.home() == clean / "dotenv-home"  # KLING_HOME too, and what is made under it
    assert settings.database_url == f"sqlite:///{clean / 'dotenv-home' / 'jobs.sqlite'}"

    (clean / ".env").write_text("KLING_LOG_FORMAT=yaml\n")
    with pytest.raises(config.ConfigError, match="^KLING_LOG_FORMAT must be one of text, json, not 'yaml'$"):
        Settings()


def test_secrets_stay_out_of_reprs_and_error_messages(clean, monkeypatch):
    key = "mx-key-" + "k" * 20
    secret = "whsec_" + base64.b64encode(b"w" * 32).decode()
    settings = Settings(api_key=key, webhook_secret=secret)
    assert (settings.api_key, settings.webhook_secret) == (key, secret)
    for text in (repr(settings), str(settings), f"{settings!r}", repr([settings])):
        assert key not in text and secret[6:] not in text

    bad = "whsec_" + base64.b64encode(b"short secret").decode()
    monkeypatch.setenv("KLING_WEBHOOK_SECRET", bad)
    monkeypatch.setenv("MODELLIX_API_KEY", key)
    monkeypatch.setenv("KLING_CONCURRENCY", "x")  # another bad value: the message lists both
    with pytest.raises(config.ConfigError) as caught:
        Settings()
    lines = str(caught.value).splitlines()
    assert lines[0] == "KLING_CONCURRENCY='x' is not a whole number"
    assert lines[1].startswith("KLING_WEBHOOK_SECRET: a webhook secret must decode to")
    for text in (str(caught.value), repr(caught.value)):
        assert bad[6:] not in text and key not in text
    assert caught.value.__context__ is None  # pydantic's error, which holds the raw values, is not kept


def _readme_defaults() -> dict[str, str]:
    """The configuration table of the README: each variable with its documented default, as written."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    table = re.search(r"^\| variable \|.*?(?=\n\n)", section, re.M | re.S)
    assert table, "the configuration table"
    defaults: dict[str, str] = {}
    for row in table.group(0).splitlines()[2:]:
        names_cell, default_cell = row.split(" | ")[:2]
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", names_cell)
        values = re.findall(r"`([^`]*)`", default_cell)
        if len(values) < len(names):  # `unset (…)`, `empty`, a rule in words: one for all
            values = [default_cell.strip()] * len(names)
        defaults.update(zip(names, values[: len(names)], strict=True))  # then words on where it lives
    return defaults


def test_the_defaults_are_the_readme_table(clean):
    documented = _readme_defaults()
    assert set(documented) == set(VARIABLES)  # every setting documented, nothing documented that is not read
    settings = Settings()
    kling_home = clean / ".kling"
    assert config.home() == kling_home and documented["KLING_HOME"] == "./.kling"
    for name in VARIABLES:
        if name == "KLING_HOME":
            continue
        field = next(f for f in Settings.model_fields if config.variable(f) == name)
        value, text = getattr(settings, field), documented[name].replace("$KLING_HOME", str(kling_home))
        if text.startswith(("unset", "concurrency / 8")):
            assert value is None, name
        elif text == "empty":
            assert value == "", name
        elif name == "KLING_ARCHIVE":
            assert value == Path(text.removeprefix("file://")).as_uri(), name
        elif isinstance(value, bool):
            assert str(value).lower() == text, name
        elif isinstance(value, int | float):
            assert value == float(text), name
        else:
            assert value == text.split(" ")[0], name


def _started_with(args: list[str], tmp_path: Path, **bad: str) -> subprocess.CompletedProcess[str]:
    """`args` run as a user would, from the checkout, with the bad settings in its environment."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(KLING_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), **bad)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_the_cli_says_a_bad_setting_in_one_line_and_exits_2(tmp_path):
    done = _started_with([sys.executable, "-m", "worker.cli", "jobs", "list"], tmp_path, KLING_CONCURRENCY="abc")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "kling-worker: KLING_CONCURRENCY='abc' is not a whole number\n"


def test_a_celery_worker_with_a_bad_setting_stops_at_import_in_one_line_per_variable(tmp_path):
    celery = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO"]
    done = _started_with(celery, tmp_path, KLING_CONCURRENCY="abc", KLING_SUBMIT_5XX="always")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == (
        "kling-worker: KLING_SUBMIT_5XX must be one of unknown, retry, not 'always'\n"
        "KLING_CONCURRENCY='abc' is not a whole number\n"
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"max_attempts": 1.5}, "KLING_MAX_ATTEMPTS=1.5 is not a whole number"),  # int_from_float
        ({"max_attempts": [1]}, "KLING_MAX_ATTEMPTS=[1] is not a whole number"),  # int_type
        ({"connect_timeout": [1]}, "MODELLIX_CONNECT_TIMEOUT=[1] is not a number"),  # float_type
        ({"webhook_hosts": 5}, "KLING_WEBHOOK_HOSTS: Input should be a valid frozenset"),  # pydantic's own words
        ({"api_key": 5}, "MODELLIX_API_KEY: Input should be a valid string"),
    ],
)
def test_values_set_in_python_are_described_like_variables(clean, values, message):
    with pytest.raises(config.ConfigError) as caught:
        Settings(**values)
    assert str(caught.value) == message


# _describe on errors no field of today produces, so a field added later still gets its line right.
SECRET = "mx-secret-value"


@pytest.mark.parametrize(
    "error, line",
    [
        # a secret's value stays out of the line, whatever the check that failed
        (
            {"type": "int_parsing", "loc": ("MODELLIX_API_KEY",), "input": SECRET},
            "MODELLIX_API_KEY is not a whole number",
        ),
        (
            {"type": "greater_than", "loc": ("api_key",), "ctx": {"gt": 3}, "input": SECRET},
            "MODELLIX_API_KEY must be more than 3",
        ),
        (
            {"type": "string_too_short", "loc": ("KLING_WEBHOOK_SECRET",), "ctx": {}, "input": SECRET},
            "KLING_WEBHOOK_SECRET must be a name, not blank",
        ),
        (
            {"type": "less_than", "loc": ("KLING_METRICS_PORT",), "ctx": {"lt": 10}, "input": 12},
            "KLING_METRICS_PORT must be less than 10, not 12",
        ),
        ({"type": "missing", "loc": ("NOT_OURS",), "msg": "Field required"}, "NOT_OURS: Field required"),
        ({"type": "missing", "loc": ("queue",), "msg": "Field required"}, "KLING_QUEUE: Field required"),
        # our own checks: the message as written, without pydantic's prefix
        ({"type": "value_error", "loc": (), "msg": "Value error, X must be Y"}, "X must be Y"),
        (
            {
                "type": "value_error",
                "loc": ("KLING_ARCHIVE",),
                "msg": "Value error, pydantic's copy",
                "ctx": {"error": ValueError("KLING_ARCHIVE: the check's own words")},
            },
            "KLING_ARCHIVE: the check's own words",
        ),
    ],
)
def test_each_error_becomes_one_line(error, line):
    assert config._describe(error) == line


def test_a_secret_with_a_choice_shows_the_choices_not_its_value():
    line = config._describe({"type": "literal_error", "loc": ("MODELLIX_API_KEY",), "input": SECRET})
    assert line.rstrip() == "MODELLIX_API_KEY must be one of"  # str has no choices; the value is not shown


# -- `celery -A worker` in this process: worker.__getattr__ ------------------------------


def test_the_package_hands_celery_its_app_under_both_names():
    from worker.wiring.app import app  # imported here, as celery -A worker does: building the app

    assert worker.app is app and worker.celery is app
    with pytest.raises(AttributeError) as caught:
        worker.nothing_here  # noqa: B018
    assert caught.value.args == ("nothing_here",)


def test_the_package_says_a_bad_setting_in_one_line_and_exits_2(monkeypatch, capsys):
    broken = types.ModuleType("worker.wiring.app")

    def refuse(name: str):
        raise config.ConfigError("KLING_CONCURRENCY='abc' is not a whole number")

    broken.__getattr__ = refuse  # the app's module failing at its settings, as on import
    monkeypatch.setitem(sys.modules, "worker.wiring.app", broken)
    with pytest.raises(SystemExit) as caught:
        worker.app  # noqa: B018
    assert caught.value.code == 2 and caught.value.__cause__ is None and caught.value.__suppress_context__
    assert capsys.readouterr() == ("", "kling-worker: KLING_CONCURRENCY='abc' is not a whole number\n")
