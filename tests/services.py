"""What the tests need from the machine (servers), and what happens when it is missing:
a failure under CI, where everything is required, and a skip naming what is missing elsewhere."""

from __future__ import annotations

import os
import socket

import pytest


def in_ci() -> bool:
    """CI sets CI to a true value (true, 1, yes, on): there every service is required."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def missing(what: str) -> None:
    """A required service is absent: a failure in CI, a skip naming it elsewhere."""
    if in_ci():
        pytest.fail(f"required in CI but missing: {what}", pytrace=False)
    pytest.skip(f"missing: {what}")


def require(host: str, port: int, name: str) -> None:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        missing(f"{name} is not reachable on {host}:{port} ({exc})")
