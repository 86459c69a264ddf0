"""The one backoff formula (worker.backoff.delay) and the numbers each of its callers keeps."""

from __future__ import annotations

import math

import pytest

from worker import facts
from worker.backoff import Jitter, delay
from worker.fleet import waiting
from worker.results import delivery


def test_without_jitter_the_wait_doubles_from_the_base_up_to_the_cap():
    assert [delay(attempt, base=2.0) for attempt in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert [delay(attempt, base=1.0, cap=5.0) for attempt in (1, 3, 4, 10)] == [1.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize(
    "jitter, low, high",
    [(Jitter.full, 0.0, 1.0), (Jitter.equal, 0.5, 1.0), (Jitter.added, 1.0, 1.5), (Jitter.none, 1.0, 1.0)],
)
def test_each_jitter_spreads_the_wait_within_its_bounds(jitter, low, high):
    for attempt, wait in ((1, 2.0), (3, 8.0), (9, 30.0)):  # the last one capped
        delays = [delay(attempt, base=2.0, cap=30.0, jitter=jitter, spread=wait / 2) for _ in range(200)]
        assert all(low * wait <= d <= high * wait for d in delays)
        if jitter is not Jitter.none:
            assert len(set(delays)) > 100  # spread, not one value


def test_a_servers_retry_after_is_a_floor():
    assert delay(1, base=1.0, jitter=Jitter.equal, at_least=9.0) == 9.0
    assert 0.5 <= delay(1, base=1.0, jitter=Jitter.equal, at_least=0.0) <= 1.0
    assert delay(2, base=1.0, at_least=None) == 2.0


def test_any_number_of_attempts_gives_the_cap():
    assert delay(5000, base=1.0, cap=30.0) == 30.0
    assert delay(5000, base=0.0, cap=30.0) == 0.0
    assert delay(5000, base=1.0) == math.inf


def test_a_held_fact_is_written_again_after_a_quarter_second_doubling_to_two():
    waits = [facts.FIRST_RETRY]
    for _ in range(5):
        waits.append(delay(2, base=waits[-1], cap=facts.MAX_RETRY))  # as facts._keep computes the next wait
    assert waits == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_an_image_is_archived_again_2_4_8_seconds_apart():
    assert [delivery._retry_delay(attempts) for attempts in (1, 2, 3, 6)] == [2.0, 4.0, 8.0, 64.0]


def test_a_job_sent_away_over_budget_comes_back_after_its_wait_and_up_to_a_second_more():
    found = [waiting.over(15.0, "402 Payment Required").retry_in for _ in range(200)]
    assert all(15.0 <= r <= 16.0 for r in found) and len(set(found)) > 100
