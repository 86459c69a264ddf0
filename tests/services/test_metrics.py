"""The outbox backlog and /readyz through a database outage (a TCP proxy cut in front of PostgreSQL); and
tests/unit/test_metrics.py's database tests again, on PostgreSQL."""

from __future__ import annotations

import pytest
import requests
from celery import Celery

from tests.support.metrics import family, get, scrape, value
from tests.unit.test_metrics import *  # noqa: F403
from worker.dev.proxy import TcpProxy
from worker.ops import health, metrics


@pytest.mark.services
def test_a_database_outage_leaves_the_backlog_out_of_metrics_and_makes_readyz_name_it(pg_url, rabbit_url):
    db_proxy, broker_proxy = TcpProxy("127.0.0.1", 5432), TcpProxy("127.0.0.1", 5672)
    database = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{db_proxy.port}")
    app = Celery(broker=rabbit_url.replace(":5672", f":{broker_proxy.port}"))
    engine = health.probe_engine(database)
    backlog = health.Cached(lambda: health.read_backlog(engine), ttl=0)
    snapshot = metrics.Snapshot(lambda: (0.0, ""), lambda: 0, backlog.get)
    ready = {
        "broker": health.Cached(lambda: health.broker_problem(app), ttl=0),
        "database": health.Cached(lambda: health.database_problem(engine), ttl=0),
    }
    server = health.HealthServer(
        0, lambda: None, lambda: {k: c.get() for k, c in ready.items()}, snapshot, address="127.0.0.1"
    ).start()
    try:
        assert get(server.port, "/readyz") == (200, {"status": "ok", "broker": "ok", "database": "ok"})
        assert value(scrape(server.port), "kling_delivery_backlog", channel="archive", state="pending") == 0

        db_proxy.cut()
        status, body = get(server.port, "/readyz")
        assert (status, body["status"], body["broker"]) == (503, "unavailable", "ok"), body
        assert body["database"].startswith("cannot connect: OperationalError"), body
        samples = scrape(server.port)  # still 200, without the series it could not read
        assert value(samples, "kling_scrape_errors_total") == 1
        assert not family(samples, "kling_delivery_backlog") and value(samples, "kling_poller_backlog") == 0
        db_proxy.restore()

        broker_proxy.cut()
        status, body = get(server.port, "/readyz")
        assert (status, body["database"]) == (503, "ok") and body["broker"].startswith("cannot connect"), body
        broker_proxy.restore()
        assert get(server.port, "/readyz")[0] == 200
        assert get(server.port, "/healthz") == (200, {"status": "ok"})
        missing = requests.get(f"http://127.0.0.1:{server.port}/nothing", timeout=5)
        assert missing.status_code == 404 and "/metrics" in missing.text
    finally:
        server.stop()
        db_proxy.close()
        broker_proxy.close()
