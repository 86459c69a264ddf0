"""Per-process resources: settings, the Modellix client, database sessions.

Built on first use in each process (never inherited across a fork), because
neither a requests Session nor a database pool survives one.
"""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager
from functools import lru_cache

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from models import db
from worker.config import Settings, load
from worker.modellix import ModellixClient

_lock = threading.Lock()
_clients: dict[int, ModellixClient] = {}


@lru_cache(maxsize=1)
def settings() -> Settings:
    return load()


def client() -> ModellixClient:
    pid = os.getpid()
    found = _clients.get(pid)
    if found is None:
        with _lock:
            found = _clients.get(pid)
            if found is None:
                s = settings()
                found = ModellixClient(
                    s.base_url, s.api_key, s.submit_path, s.connect_timeout, s.read_timeout, pool_size=s.concurrency + 4
                )
                _clients[pid] = found
    return found


def _pool_size() -> int:
    # Threads hold a connection only for a statement or two, never across an
    # HTTP call, so an eighth of the threads is plenty, and a fixed cap per
    # process keeps a fleet of workers under PostgreSQL's connection limit.
    return settings().db_pool or max(4, settings().concurrency // 8)


def session() -> AbstractContextManager[Session]:
    """An ORM session in one transaction."""
    return db.session(settings().database_url, _pool_size())


def connect() -> AbstractContextManager[Connection]:
    """A Core connection for the single-statement hot paths."""
    return db.connect(settings().database_url, _pool_size())


def reset() -> None:
    """Forget this process's client (tests that change settings between cases)."""
    with _lock:
        for found in _clients.values():
            found.close()
        _clients.clear()
