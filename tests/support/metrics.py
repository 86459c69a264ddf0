"""What a worker's /metrics and health endpoints say, read over HTTP or from this process's registry."""

from __future__ import annotations

import re
from typing import Any

import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.support.jobs import wait_for
from worker.dev.processes import Worker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def family(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def by(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """A family's values keyed by the values of the labels `keys`."""
    return {tuple(dict(labels)[k] for k in keys): v for labels, v in family(samples, name).items()}


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    answer = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    return answer.status_code, answer.json()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


SERVING = re.compile(r"metrics and health on http://0\.0\.0\.0:(\d+)")


def served_port(worker: Worker) -> int:
    found = wait_for(lambda: SERVING.search(worker.output(10**7)), 30, "the metrics server started", [worker])
    return int(found[1])
