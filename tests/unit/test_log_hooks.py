"""The JSON log format's hooks into a worker's start and stop (worker.ops.logs._Installer): the banner as one
record, warnings before Celery's logging setup as JSON lines, the shutdown notice as a record.
Real workers: tests/e2e/test_logs.py."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from types import SimpleNamespace

import pytest

from worker.ops import logs


@pytest.fixture
def py_warnings(monkeypatch):
    """The early handler's stream (sys.__stderr__, replaced); py.warnings and warning capture as they were."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", stream)
    logger = logging.getLogger("py.warnings")
    handlers = list(logger.handlers)
    capturing = logging._warnings_showwarning is not None  # type: ignore[attr-defined]
    yield stream
    if not capturing:
        logging.captureWarnings(False)
    logger.handlers = handlers


class Starting(SimpleNamespace):
    """What the hooks use of Celery's WorkController (celeryd_init's and celeryd_after_setup's `instance`)."""

    def startup_info(self, artlines: bool = True) -> str:
        self.asked.append(artlines)
        return self.info

    def extra_info(self) -> str | None:
        return self.extra


def starting(info: str = "", extra: str | None = None) -> Starting:
    return Starting(quiet=False, asked=[], info=info, extra=extra)


def warn(text: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(text, UserWarning, stacklevel=1)


def test_before_setup_quiets_the_banner_and_logs_early_warnings_as_json(py_warnings):
    installer = logs._Installer()
    instance = starting()
    installer.before_setup(instance)
    assert instance.quiet is True
    early = installer._early
    assert early is not None and early in logging.getLogger("py.warnings").handlers

    warn("running a worker as root")
    [line] = [json.loads(text) for text in py_warnings.getvalue().splitlines()]
    assert (line["level"], line["logger"], line["event"]) == ("WARNING", "py.warnings", "py.warnings")
    assert line["message"].splitlines()[0].endswith(": UserWarning: running a worker as root")


def test_before_setup_without_a_worker_still_catches_warnings(py_warnings):
    installer = logs._Installer()
    installer.before_setup(None)
    warn("early")
    assert json.loads(py_warnings.getvalue())["event"] == "py.warnings"


def test_the_banner_is_one_record_and_the_early_handler_goes(py_warnings, caplog):
    installer = logs._Installer()
    installer.before_setup(starting())
    early = installer._early
    instance = starting(
        info="\n -------------- celery@BOX v5.7.0\n--- ***** -----\n",
        extra="[tasks]\n  . kling.generate\n  . kling.poll\n[host] BOX\n",
    )
    with caplog.at_level(logging.INFO, logger="kling_worker.logs"):
        installer.banner(instance)
    assert instance.asked == [False]  # no ASCII art: it would be a dozen lines of a JSON message
    assert early not in logging.getLogger("py.warnings").handlers and installer._early is None
    [record] = [r for r in caplog.records if r.name == "kling_worker.logs"]
    assert (record.levelno, record.event) == (logging.INFO, "worker_starting")
    assert record.getMessage() == (
        " -------------- celery@BOX v5.7.0\n--- ***** -----\n[tasks]\n  . kling.generate\n  . kling.poll\n[host] BOX"
    )

    warn("after the setup")
    assert py_warnings.getvalue() == ""  # the early handler has gone: Celery's handlers take it from here


def test_a_banner_without_extra_info_is_the_startup_info_alone(caplog):
    installer = logs._Installer()
    with caplog.at_level(logging.INFO, logger="kling_worker.logs"):
        installer.banner(starting(info="\n[config]\n.> app: kling_worker\n", extra=None))
        installer.banner(None)  # no worker (beat): nothing to say
    assert [r.getMessage() for r in caplog.records if r.name == "kling_worker.logs"] == [
        "[config]\n.> app: kling_worker"
    ]


def test_the_shutdown_notice_is_installed_again_without_its_line(monkeypatch):
    import celery.apps.worker

    installed: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(
        celery.apps.worker, "install_worker_term_handler", lambda *args, **kwargs: installed.append((args, kwargs))
    )
    installer = logs._Installer()
    controller = object()
    installer.quiet_shutdown_notice(SimpleNamespace(controller=controller))
    assert installed == [((controller,), {"verbose": False})]
    installer.quiet_shutdown_notice(SimpleNamespace())  # a sender without a controller
    installer.quiet_shutdown_notice(None)
    assert len(installed) == 1


def test_shutting_down_is_logged_as_a_record(caplog):
    installer = logs._Installer()
    with caplog.at_level(logging.INFO, logger="kling_worker.logs"):
        installer.shutting_down(how="Warm", sig="SIGTERM", exitcode=0)
        installer.shutting_down()
    found = [r for r in caplog.records if r.name == "kling_worker.logs"]
    assert [(r.levelno, r.event, r.getMessage()) for r in found] == [
        (logging.INFO, "worker_shutting_down", "worker: Warm shutdown"),
        (logging.INFO, "worker_shutting_down", "worker:  shutdown"),
    ]
