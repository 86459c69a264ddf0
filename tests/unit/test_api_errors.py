"""The one API-error policy, answer by answer, for a submit and for a poll (the table in worker/modellix/policy.py)."""

from __future__ import annotations

import pytest

from worker import modellix
from worker.config import Settings
from worker.fleet.pause import PauseKind, kind_of
from worker.modellix.policy import BALANCE_RECHECK, Action, judge_poll, judge_submit

CFG = Settings(max_attempts=3, backoff_base=1.0, backoff_max=60.0, account_retry=60.0)


def error(cls: type[modellix.ModellixError], status: int, retry_after: float | None = None):
    return cls(f"HTTP {status}", status, retry_after)


RETRY_5XX = Settings(max_attempts=3, backoff_base=1.0, backoff_max=60.0, account_retry=60.0, submit_5xx="retry")


@pytest.mark.parametrize(
    "exc, cfg",
    [
        (modellix.NetworkError("refused"), CFG),
        (error(modellix.ServerError, 500), RETRY_5XX),
        (error(modellix.ServerError, 503), RETRY_5XX),
    ],
)
def test_a_submit_that_surely_created_nothing_is_retried_with_backoff_until_the_last_attempt(exc, cfg):
    first = judge_submit(exc, 1, cfg)
    assert first.action is Action.retry and 0.5 <= first.delay <= 1.0 and first.counts and not first.pause
    assert judge_submit(exc, 2, cfg).action is Action.retry
    assert judge_submit(exc, 3, cfg).action is Action.fail  # KLING_MAX_ATTEMPTS


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_by_default_a_5xx_to_a_submit_is_an_unknown_outcome_and_never_resent(status):
    verdict = judge_submit(error(modellix.ServerError, status), 1, CFG)
    assert CFG.submit_5xx == "unknown"
    assert verdict.action is Action.fail and verdict.error_code == "submit_unknown" and not verdict.pause


def test_resending_after_a_5xx_is_flagged_as_possibly_billing_twice():
    assert judge_submit(error(modellix.ServerError, 500), 1, RETRY_5XX).resubmits_unknown
    assert not judge_submit(modellix.NetworkError("refused"), 1, RETRY_5XX).resubmits_unknown
    assert not judge_submit(error(modellix.RateLimited, 429), 1, RETRY_5XX).resubmits_unknown


def test_the_5xx_setting_takes_only_its_two_values():
    with pytest.raises(ValueError, match="KLING_SUBMIT_5XX"):
        Settings(submit_5xx="sometimes")


def test_a_429_on_submit_pauses_the_fleet_for_its_retry_after():
    verdict = judge_submit(error(modellix.RateLimited, 429, retry_after=7), 1, CFG)
    assert verdict.action is Action.retry and verdict.delay >= 7 and verdict.pause == 7
    assert "429" in verdict.pause_reason
    without = judge_submit(error(modellix.RateLimited, 429), 2, CFG)
    assert 1 <= without.pause <= 2 and without.pause == without.delay  # no Retry-After: the backoff
    last = judge_submit(error(modellix.RateLimited, 429, retry_after=7), 3, CFG)
    assert last.action is Action.fail and last.pause == 7  # failing the job still pauses the others
    assert "429" in last.pause_reason


@pytest.mark.parametrize("status", [401, 402])
@pytest.mark.parametrize("judge", ["submit", "poll"])
def test_account_errors_pause_the_fleet_and_never_count(status, judge):
    exc = error(modellix.AccountError, status)
    verdict = judge_submit(exc, 99, CFG) if judge == "submit" else judge_poll(exc, 5.0, CFG)
    assert verdict.action is Action.retry and not verdict.counts and verdict.account
    assert verdict.pause == 60 and str(status) in verdict.pause_reason
    # A 401 waits out the pause; a 402 looks again sooner, as the sweep lifts its pause on a top-up.
    assert verdict.delay >= 60 if status == 401 else BALANCE_RECHECK <= verdict.delay < 60
    assert (kind_of(verdict.pause_reason) is PauseKind.no_balance) is (status == 402)


@pytest.mark.parametrize(
    "exc",
    [
        error(modellix.RequestRejected, 400),
        error(modellix.RequestRejected, 422),
        error(modellix.NotFound, 404),
        modellix.AmbiguousSubmit("read timeout"),
    ],
)
@pytest.mark.parametrize("cfg", [CFG, RETRY_5XX])
def test_a_submit_that_cannot_succeed_or_may_have_billed_fails_at_once(exc, cfg):
    verdict = judge_submit(exc, 1, cfg)
    assert verdict.action is Action.fail and not verdict.pause and verdict.error_code is None


def test_a_poll_of_a_task_that_is_gone_fails():
    assert judge_poll(error(modellix.NotFound, 404), 5.0, CFG).action is Action.fail


@pytest.mark.parametrize(
    "exc",
    [
        error(modellix.ServerError, 500),
        modellix.NetworkError("reset"),
        error(modellix.ProtocolError, 200),
        error(modellix.RequestRejected, 400),
    ],
)
def test_other_poll_errors_poll_again_at_the_next_gap(exc):
    verdict = judge_poll(exc, 4.5, CFG)
    assert verdict.action is Action.retry and verdict.delay == 4.5 and not verdict.pause


def test_a_429_while_polling_waits_its_retry_after_and_pauses_the_fleet():
    verdict = judge_poll(error(modellix.RateLimited, 429, retry_after=9), 4.5, CFG)
    assert verdict.action is Action.retry and verdict.delay == 9 and verdict.pause == 9
    short = judge_poll(error(modellix.RateLimited, 429, retry_after=1), 4.5, CFG)
    assert short.delay == 4.5 and short.pause == 4.5  # never sooner than the schedule


def test_stored_codes_are_the_apis_own_or_ours():
    assert error(modellix.RequestRejected, 400).stored_code == "400"
    assert error(modellix.RateLimited, 429).stored_code == "429"
    assert modellix.NetworkError("refused").stored_code == "network"
    assert modellix.AmbiguousSubmit("no task id", 200).stored_code == "submit_unknown"
