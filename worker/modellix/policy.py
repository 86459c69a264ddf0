"""What to do about an error from the Modellix API: one policy for submits and polls.

| answer                         | a submit                                   | a poll                           |
|--------------------------------|--------------------------------------------|----------------------------------|
| 429                            | retry after Retry-After (or the backoff)   | poll again, no sooner than that  |
| refused (nothing sent)         | retry with backoff, at most                | poll again at the next gap       |
|                                | KLING_MAX_ATTEMPTS, then fail              |                                  |
| 5xx                            | KLING_SUBMIT_5XX=unknown (default): fail   | poll again at the next gap       |
|                                | as submit_unknown, never resent;           | (no sooner than Retry-After)     |
|                                | =retry: as "refused", with a WARNING       |                                  |
| 401, 402                       | wait KLING_ACCOUNT_RETRY in `queued`; the  | poll again after                 |
|                                | attempt does not count; never fails        | KLING_ACCOUNT_RETRY              |
| 404                            | fail with the API's code and message       | fail (the task is gone)          |
| 400, 403, 405, 413, 415, 422   | fail with the API's code and message       | poll again (the task may be fine)|
| outcome unknown: a timeout or  | fail as submit_unknown, never resent       | poll again at the next gap       |
| dropped connection after the   |                                            |                                  |
| POST was sent, any other       |                                            |                                  |
| answer (a 200 without task id) |                                            |                                  |

Only the submit's definite rejections (modellix.SAFE_REJECTIONS) and a
connection that was never made prove that no task exists; the default
resends nothing else, so a job is never billed twice.

A 429 pauses the whole fleet for its Retry-After, and a 401/402 for
KLING_ACCOUNT_RETRY: every worker would get the same answer. During a 402
pause the sweep asks for the balance instead of letting jobs try paid submits
(worker.fleet.pause.watch_balance), and the held jobs look again every
BALANCE_RECHECK seconds, so the fleet resumes soon after a top-up. Exponential
backoff with equal jitter (worker.backoff); Retry-After is always a floor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from worker import backoff, modellix
from worker.config import Settings


class Action(enum.Enum):
    retry = "retry"  # try the same call again after `delay`
    fail = "fail"  # the job fails with the error


@dataclass(frozen=True)
class Verdict:
    action: Action
    delay: float = 0.0  # seconds until the next try
    pause: float = 0.0  # seconds the whole fleet stops calling the API (0: no pause)
    pause_reason: str = ""
    counts: bool = True  # whether the try counts against KLING_MAX_ATTEMPTS
    account: bool = False  # the account is refused: worth an ERROR on every try
    error_code: str | None = None  # what the job records, if not the error's own stored_code
    resubmits_unknown: bool = False  # the retry may create a second task (KLING_SUBMIT_5XX=retry)


def retry_delay(attempt: int, settings: Settings, retry_after: float | None = None) -> float:
    """Exponential backoff with equal jitter for attempt 1, 2, ...; Retry-After is a floor."""
    return backoff.delay(
        attempt,
        base=settings.backoff_base,
        cap=settings.backoff_max,
        jitter=backoff.Jitter.equal,
        at_least=retry_after or 0.0,
    )


def judge_submit(exc: modellix.ModellixError, attempt: int, settings: Settings) -> Verdict:
    """A submit failed on its `attempt`-th try."""
    if isinstance(exc, modellix.AccountError):
        return _account(exc, settings)
    if isinstance(exc, modellix.ServerError) and settings.submit_5xx == "unknown":
        return Verdict(Action.fail, error_code=modellix.AmbiguousSubmit.code)
    if isinstance(exc, modellix.TransientError):
        delay = retry_delay(attempt, settings, exc.retry_after)
        pause = (exc.retry_after or delay) if isinstance(exc, modellix.RateLimited) else 0.0
        if attempt >= settings.max_attempts:
            return Verdict(Action.fail, pause=pause, pause_reason=_RATE_LIMITED)
        unknown = isinstance(exc, modellix.ServerError)
        return Verdict(Action.retry, delay, pause=pause, pause_reason=_RATE_LIMITED, resubmits_unknown=unknown)
    return Verdict(Action.fail)  # 400, 404, ambiguous: trying again cannot help, or could bill twice


def judge_poll(exc: modellix.ModellixError, next_gap: float, settings: Settings) -> Verdict:
    """A poll failed; `next_gap` is when the schedule would poll next anyway."""
    if isinstance(exc, modellix.AccountError):
        return _account(exc, settings, floor=next_gap)
    if isinstance(exc, modellix.NotFound):
        return Verdict(Action.fail)
    delay = max(next_gap, exc.retry_after or 0.0)
    pause = delay if isinstance(exc, modellix.RateLimited) else 0.0
    return Verdict(Action.retry, delay, pause=pause, pause_reason=_RATE_LIMITED)


# A pause's reason is "<HTTP status> <message>": operators read it, and worker.fleet.pause.kind_of
# tells the kind of pause from its status.
_RATE_LIMITED = "429 from Modellix"
# While the fleet waits for credit (a 402 pause), a job held back looks again this often: the
# pause is lifted as soon as the balance is positive, and the jobs should not sleep through it.
BALANCE_RECHECK = 15.0


def _account(exc: modellix.ModellixError, settings: Settings, floor: float = 0.0) -> Verdict:
    # Every job would fail the same way: pause the fleet and keep the jobs,
    # rather than burn through the queue marking each one failed.
    wait = settings.account_retry
    look_again = min(wait, BALANCE_RECHECK) if exc.status == 402 else wait
    return Verdict(
        Action.retry,
        max(floor, retry_delay(1, settings, look_again)),
        pause=wait,
        pause_reason=f"{exc.status} {exc.message}",
        counts=False,
        account=True,
    )


# The codes of a failed job whose Modellix task, if it had one, has ended for sure: Modellix said it
# failed or had no results, or it was gone (404). Written by worker.polling.tracking.
_TASK_ENDED = frozenset({"task_failed", "no_results", "404"})
# A submit cut off by the worker's death, resolved by the sweep (worker.polling.tracking.resolve_interrupted).
SUBMIT_INTERRUPTED = "submit_interrupted"


def task_may_exist(error_code: str | None, modellix_task_id: str | None) -> str | None:
    """Why a failed job may have left a Modellix task behind (running, or billed), so that sending its
    request again could create a second one; None when its failure proves there is none."""
    if modellix_task_id:
        if error_code in _TASK_ENDED:
            return None
        return f"its Modellix task {modellix_task_id} may still be running (and is billed): it failed as {error_code}"
    if error_code in (modellix.AmbiguousSubmit.code, SUBMIT_INTERRUPTED):
        return f"{error_code}: its submit may have created a Modellix task (billed) whose id is unknown"
    if error_code is not None and error_code.isdigit() and int(error_code) >= 500:
        # Only with KLING_SUBMIT_5XX=retry: each 5xx answer may have come after a task was created.
        return f"its submits were answered {error_code}: a Modellix task may exist for any of them"
    return None
