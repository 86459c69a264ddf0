"""Log lines (worker.ops.logs): one JSON object per line with KLING_LOG_FORMAT=json, the job a line is about,
an event name on every line, and the per-second sweep kept at DEBUG. Real workers: tests/e2e/test_logs.py."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import uuid

import pytest
from celery.app import trace
from celery.utils.log import ColorFormatter

from worker.config import ConfigError, Settings
from worker.ops import logs


def record(msg: str, *args: object, level: int = logging.INFO, name: str = "kling_worker.test", **extra: object):
    made = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    made.__dict__.update(extra)
    return made


def through(handler_filters: list[logging.Filter], made: logging.LogRecord) -> logging.LogRecord | None:
    """The record as a handler with these filters passes it on (None: dropped)."""
    for f in handler_filters:
        if not f.filter(made):
            return None
    return made


# -- the JSON line -------------------------------------------------------------------


def test_a_json_line_has_the_documented_fields_and_nothing_else():
    made = record(
        "job %s submitted as Modellix task %s",
        "job-1",
        "task-9",
        event="job_submitted",
        job_id="job-1",
        modellix_task_id="task-9",
        data={"kwargs": "{'request': {'prompt': 'a secret prompt'}}"},  # as Celery puts a task's arguments
    )
    line = logs.JsonLines().format(made)
    assert "\n" not in line
    found = json.loads(line)
    assert list(found) == ["time", "level", "logger", "process", "event", "message", "job_id", "modellix_task_id"]
    assert found["message"] == "job job-1 submitted as Modellix task task-9"
    assert (found["level"], found["logger"], found["event"]) == ("INFO", "kling_worker.test", "job_submitted")
    assert found["time"].endswith("+00:00")  # ISO 8601, UTC
    assert "secret prompt" not in line


def test_a_traceback_stays_on_the_one_line():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        made = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed:\n%s", ("two lines",), sys.exc_info())
    line = logs.JsonLines().format(made)
    assert "\n" not in line
    found = json.loads(line)
    assert found["message"] == "failed:\ntwo lines"
    assert "RuntimeError: boom" in found["exc_info"]


# -- the job a line is about ---------------------------------------------------------


def test_bound_values_reach_the_records_made_inside_the_block_only():
    context = logs.JobContext()
    with logs.bound(job_id="job-1", modellix_task_id=None):
        inside = through([context], record("in"))
        logs.bind(modellix_task_id="task-9")
        later = through([context], record("later"))
        with logs.bound(job_id="job-2"):
            nested = through([context], record("nested"))
        back = through([context], record("back"))
    after = through([context], record("after"))
    assert (inside.job_id, getattr(inside, "modellix_task_id", None)) == ("job-1", None)
    assert (later.job_id, later.modellix_task_id) == ("job-1", "task-9")
    assert (nested.job_id, nested.modellix_task_id) == ("job-2", "task-9")
    assert (back.job_id, back.modellix_task_id) == ("job-1", "task-9")
    assert not hasattr(after, "job_id") and not hasattr(after, "modellix_task_id")


def test_a_binding_stays_in_its_thread():
    context = logs.JobContext()
    seen: list[logging.LogRecord | None] = []
    with logs.bound(job_id="job-1"):
        other = threading.Thread(target=lambda: seen.append(through([context], record("other thread"))))
        other.start()
        other.join()
    assert not hasattr(seen[0], "job_id")


def test_what_a_call_passes_wins_over_the_binding():
    with logs.bound(job_id="bound"):
        made = through([logs.JobContext()], record("x", job_id="passed", event="mine"))
    assert (made.job_id, made.event) == ("passed", "mine")


def test_celery_lines_are_named_by_their_template_others_by_their_logger():
    context = logs.JobContext()
    data = {"id": "celery-id-1", "name": "kling.generate", "runtime": 0.1, "return_value": "'submitted'"}
    succeeded = through([context], record(trace.LOG_SUCCESS, data, name="celery.app.trace", data=data))
    assert succeeded.event == "task_succeeded"
    assert (succeeded.task_id, succeeded.task_name) == ("celery-id-1", "kling.generate")
    connected = through([context], record("Connected to %s", "amqp://", name="celery.worker.consumer.connection"))
    assert connected.event == "celery.worker.consumer.connection"


# -- the routine lines ------------------------------------------------------------------


def celery_line(template: str, task: str) -> logging.LogRecord:
    data = {"id": "id-1", "name": task, "runtime": 0.003, "return_value": "0", "args": "()", "kwargs": "{}"}
    return record(template, data, name="celery.app.trace", data=data)


@pytest.mark.parametrize(
    "made",
    [
        pytest.param(lambda: celery_line(trace.LOG_RECEIVED, "kling.sweep"), id="received"),
        pytest.param(lambda: celery_line(trace.LOG_SUCCESS, "kling.sweep"), id="succeeded"),
        pytest.param(
            lambda: record(logs.BEAT_SENDING, "kling-sweep", "kling.sweep", name="celery.beat"), id="beat-sending"
        ),
    ],
)
def test_the_per_second_sweep_lines_are_debug(made):
    assert through([logs.RoutineLines(logging.INFO)], made()) is None
    shown = through([logs.RoutineLines(logging.DEBUG)], made())
    assert (shown.levelno, shown.levelname) == (logging.DEBUG, "DEBUG")


@pytest.mark.parametrize(
    "made",
    [
        pytest.param(lambda: celery_line(trace.LOG_RECEIVED, "kling.generate"), id="a-job-received"),
        pytest.param(lambda: celery_line(trace.LOG_SUCCESS, "kling.deliver"), id="a-delivery-done"),
        pytest.param(lambda: record(logs.BEAT_SENDING, "nightly", "other.task", name="celery.beat"), id="other-beat"),
        pytest.param(lambda: record("job %s succeeded", "kling.sweep"), id="ours"),
    ],
)
def test_other_lines_keep_their_level(made):
    shown = through([logs.RoutineLines(logging.INFO)], made())
    assert shown is not None and shown.levelno == logging.INFO


# -- the setting and the installation ---------------------------------------------------------


def test_the_log_format_is_text_unless_json_is_asked_for(monkeypatch):
    monkeypatch.delenv("KLING_LOG_FORMAT", raising=False)
    assert Settings().log_format == "text"
    monkeypatch.setenv("KLING_LOG_FORMAT", " JSON ")
    assert Settings().log_format == "json"
    monkeypatch.setenv("KLING_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match=r"KLING_LOG_FORMAT must be one of text, json, not 'xml'"):
        Settings()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_only_the_handlers_celery_made_are_shaped(log_format):
    installer = logs._Installer()
    installer.log_format = log_format
    logger = logging.getLogger(f"kling_test_{uuid.uuid4().hex}")
    logger.propagate = False
    celerys, stream = logging.StreamHandler(io.StringIO()), io.StringIO()
    celerys.setFormatter(ColorFormatter("%(levelname)s %(message)s", use_color=False))
    theirs = logging.StreamHandler(stream)
    theirs.setFormatter(logging.Formatter("theirs: %(message)s"))
    logger.handlers = [celerys, theirs]
    logger.setLevel(logging.DEBUG)
    installer.after_setup(logger, loglevel=logging.INFO)
    installer.after_setup(logger, loglevel=logging.INFO)  # twice (a second setup) changes nothing more

    assert [type(f) for f in celerys.filters] == [logs.RoutineLines, logs.JobContext]
    assert theirs.filters == [] and stream.getvalue() == ""
    with logs.bound(job_id="job-1"):
        logger.info("job %s succeeded", "job-1", extra={"event": "job_succeeded"})
    logger.info(trace.LOG_RECEIVED, {"id": "x", "name": "kling.sweep", "args": "", "kwargs": "", "eta": None})
    written = celerys.stream.getvalue().splitlines()
    assert len(written) == 1  # the sweep's line is DEBUG, below the level asked for
    if log_format == "json":
        assert json.loads(written[0])["job_id"] == "job-1"
    else:
        assert written == ["INFO job job-1 succeeded"]
    assert stream.getvalue().count("theirs:") == 2  # someone else's handler is left as it was


# -- a real worker and its beat ----------------------------------------------------------------
