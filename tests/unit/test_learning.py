"""The learned poll schedule: the rule (pure) and the shared table (on SQLite here, on PostgreSQL in
tests/services/test_learning.py). Real workers polling less: tests/e2e/test_learning.py."""

from __future__ import annotations

import logging
import math
import random
import time

from sqlalchemy import select, text

from models import PollShape, poll_shapes
from models.job import utcnow
from tests.support.jobs import handle, job
from worker import resources, submission
from worker.config import Settings
from worker.polling import learning, schedule, tracking
from worker.polling.schedule import Shape
from worker.polling.tracking import Ended, PollAgain

# -- the rule -------------------------------------------------------------------


def test_without_a_learned_value_the_configured_schedule_is_kept():
    cfg = Settings()
    assert [round(schedule.gap(i, cfg), 3) for i in range(3)] == [2.0, 2.5, 3.125]
    assert schedule.first(cfg) == schedule.first(cfg, None) == schedule.NextPoll(0, 2.0)


def test_a_learned_first_poll_sets_the_first_poll_and_scales_the_gaps_within_the_bounds():
    cfg = Settings(poll_min=1.0, poll_max=30.0, poll_factor=1.25)
    assert schedule.first(cfg, 20.0) == schedule.NextPoll(0, 20.0)
    assert [round(schedule.gap(i, cfg, 20.0), 3) for i in range(1, 4)] == [3.0, 3.75, 4.688]  # 15 % of F, x1.25
    assert schedule.gap(1, cfg, 6.0) == 1.0  # never below KLING_POLL_MIN
    assert schedule.first(cfg, 0.2).delay == 1.0  # the earliest first poll is KLING_POLL_MIN
    assert schedule.first(cfg, 90.0).delay == 30.0  # the latest is KLING_POLL_MAX
    assert schedule.gap(40, cfg, 20.0) == 30.0  # and so is every gap
    # KLING_POLL_MIN above KLING_POLL_FIRST: the lower one is the floor
    assert schedule.first(Settings(poll_first=0.3, poll_min=1.0), 0.1).delay == 0.3


def test_the_shape_is_resolution_n_and_input_images_with_the_api_defaults():
    assert schedule.shape_of({"prompt": "x"}) == Shape("1k", 1, 0)
    request = {"resolution": "2k", "n": 4, "image_list": [{"image": "a"}] * 2, "element_list": [{"element_id": 1}]}
    assert schedule.shape_of(request) == Shape("2k", 4, 3)


def test_updates_add_up_in_any_order_and_move_f_toward_the_quantile():
    assert math.isclose(schedule.step(3, 1) + schedule.step(2, 5), schedule.step(5, 6))
    assert schedule.step(1, 0) < 0 < schedule.step(0, 1)  # a hit brings the first poll sooner, a miss later
    rng = random.Random(7)
    durations = [10 * rng.uniform(0.85, 1.15) for _ in range(3000)]
    log_first = math.log(2.0)  # far off: the configured first poll
    for seconds in durations:
        hit = seconds <= math.exp(log_first)
        log_first += schedule.step(int(hit), int(not hit))
    share = sum(d <= math.exp(log_first) for d in durations) / len(durations)
    assert abs(share - schedule.QUANTILE) < 0.15, (math.exp(log_first), share)


def test_a_seed_is_the_middle_of_the_interval_in_which_the_task_ended():
    assert math.isclose(math.exp(schedule.seed(7.6, 11.5)), 7.6 + schedule.QUANTILE * 3.9)
    assert math.isclose(math.exp(schedule.seed(0.0, 2.0)), 2.0 * schedule.QUANTILE)


# -- the shared table -----------------------------------------------------------


def _shape_row(key: tuple[str, int, int]) -> PollShape | None:
    with resources.get().transaction() as s:
        return s.scalars(select(PollShape).filter_by(resolution=key[0], n=key[1], images=key[2])).first()


def test_merges_seed_a_row_then_move_it_within_the_bounds(service):
    key = ("2k", 3, 1)
    low, high = math.log(1.0), math.log(30.0)
    seen = poll_shapes.Seen(key, math.log(9.0), 2, 0, 0)
    with resources.get().statement() as ex:
        poll_shapes.merge(ex, [seen], schedule.step, schedule.MAX_STEP, low, high, utcnow())
    assert math.isclose(math.exp(_shape_row(key).log_first), 9.0)
    # An existing row keeps its value (a later seed is ignored) and moves by the rule.
    with resources.get().statement() as ex:
        poll_shapes.merge(
            ex, [poll_shapes.Seen(key, math.log(20.0), 1, 4, 1)], schedule.step, schedule.MAX_STEP, low, high, utcnow()
        )
    row = _shape_row(key)
    assert math.isclose(row.log_first, math.log(9.0) + schedule.step(4, 1))
    assert (row.hits, row.misses, row.seeded) == (4, 1, 2)
    # A burst (500 misses in one merge) moves F by MAX_STEP at most; merge after merge, up to KLING_POLL_MAX.
    burst = [poll_shapes.Seen(key, 0.0, 0, 0, 500)]
    with resources.get().statement() as ex:
        poll_shapes.merge(ex, burst, schedule.step, schedule.MAX_STEP, low, high, utcnow())
        assert math.isclose(poll_shapes.read(ex)[key], row.log_first + schedule.MAX_STEP)
        for _ in range(4):
            poll_shapes.merge(ex, burst, schedule.step, schedule.MAX_STEP, low, high, utcnow())
        assert poll_shapes.read(ex)[key] == high  # held at KLING_POLL_MAX


def test_one_workers_observations_reach_another_workers_schedule(service, configure):
    service.task_seconds = 0.6
    handle(request={"prompt": "a", "n": 2}, job_id="a")
    assert isinstance(tracking.check(resources.get(), "a", 0), PollAgain)  # made at once: the task is still running
    time.sleep(0.8)
    assert tracking.check(resources.get(), "a", 1) == Ended("a", notify=False) and job("a").status == "succeeded"
    teacher = resources.get().learner_if_made
    teacher.sync()  # what the worker does every few seconds
    # Another worker (another process: its own, empty copy) reads the row on its first submit.
    configure()
    out = handle(request={"prompt": "b", "n": 2}, job_id="b")
    assert (
        isinstance(out.next_step, submission.Follow) and out.next_step.first_poll.delay == 1.0
    )  # learned (at KLING_POLL_MIN)
    other_shape = handle(request={"prompt": "c", "n": 3}, job_id="c")
    assert other_shape.next_step == submission.Follow(schedule.NextPoll(0, 2.0))  # not seen yet: configured
    row = _shape_row(("1k", 2, 0))
    # seen running at ~0 s and finished at ~0.8 s: seeded at ~0.6 s, held at KLING_POLL_MIN
    assert row.seeded == 1 and math.isclose(math.exp(row.log_first), 1.0)


def test_first_polls_count_as_hits_or_misses_for_the_shape(service, configure):
    configure(KLING_POLL_MIN="0.2")
    key = ("1k", 1, 0)
    with resources.get().statement() as ex:
        poll_shapes.merge(
            ex, [poll_shapes.Seen(key, math.log(0.3), 1, 0, 0)], schedule.step, schedule.MAX_STEP, -5.0, 5.0, utcnow()
        )
    service.task_seconds = 0.5
    for job_id in ("x", "y"):
        out = handle(request={"prompt": job_id}, job_id=job_id)
        assert isinstance(out.next_step, submission.Follow) and math.isclose(out.next_step.first_poll.delay, 0.3)
    time.sleep(0.3)
    for job_id in ("x", "y"):  # at 0.3 s of 0.5: misses; the next gap is the floor
        following = tracking.check(resources.get(), job_id, 0)
        assert isinstance(following, PollAgain) and following.poll.delay == 0.2
    time.sleep(0.4)
    assert tracking.check(resources.get(), "x", 1) == Ended("x", notify=False)
    learner = resources.get().learner_if_made
    learner.sync()
    row = _shape_row(key)
    assert (row.hits, row.misses) == (0, 1)
    assert math.isclose(row.log_first, math.log(0.3) + schedule.step(0, 1))
    # Meanwhile other workers' misses raised F past y's end: judged against F as it is now, y is a hit.
    with resources.get().statement() as ex:
        for _ in range(3):  # three merges of other workers' counts (each moves F by MAX_STEP at most)
            poll_shapes.merge(
                ex, [poll_shapes.Seen(key, 0.0, 0, 0, 40)], schedule.step, schedule.MAX_STEP, -5.0, 5.0, utcnow()
            )
    learner.sync()
    assert tracking.check(resources.get(), "y", 1) == Ended("y", notify=False)
    learner.sync()
    assert (_shape_row(key).hits, _shape_row(key).misses) == (1, 121)


def test_a_late_first_poll_counts_only_when_it_finds_the_task_running(service):
    """On a loaded machine first polls run late: one that still finds the task running proves the
    task outlasted F (a miss); one that finds it finished proves nothing about F (not counted)."""
    key = ("1k", 2, 0)
    with resources.get().statement() as ex:
        poll_shapes.merge(
            ex, [poll_shapes.Seen(key, math.log(2.0), 1, 0, 0)], schedule.step, schedule.MAX_STEP, -5.0, 5.0, utcnow()
        )
    learner = resources.get().learner
    learner.sync()
    request = {"prompt": "p", "n": 2}
    for job_id in ("running", "finished"):
        assert learner.first_poll(job_id, request).delay == 2.0
    # Both first polls ran 2.5 s late (at 4.5 s, past F + KLING_POLL_MIN).
    learner.answered("running", 0, 4.5, finished=False)
    learner.answered("finished", 0, 4.5, finished=True)
    learner.answered("running", 1, 6.0, finished=True)
    learner.sync()
    row = _shape_row(key)
    assert (row.hits, row.misses) == (0, 1)
    assert math.isclose(row.log_first, math.log(2.0) + schedule.step(0, 1))


def test_without_the_table_or_with_learning_off_the_configured_schedule_is_used(service, configure, caplog):
    with resources.get().statement() as ex:
        ex.execute(text("DROP TABLE poll_shapes"))  # a database older than this worker
    caplog.set_level(logging.WARNING)
    out = handle(request={"prompt": "x"}, job_id="x")
    assert out.next_step == submission.Follow(schedule.NextPoll(0, 2.0))
    assert "learned poll schedule could not be read" in caplog.text
    configure(KLING_POLL_LEARN="false")
    assert handle(request={"prompt": "y"}, job_id="y").next_step == submission.Follow(schedule.NextPoll(0, 2.0))
    assert resources.get().learner_if_made is None


def test_a_stopping_worker_merges_what_it_counted(service):
    service.task_seconds = 0.1
    handle(request={"prompt": "x", "resolution": "2k"}, job_id="x")
    time.sleep(0.3)
    assert tracking.check(resources.get(), "x", 0) == Ended("x", notify=False)
    assert _shape_row(("2k", 1, 0)) is None  # counted in memory only, until the next merge
    learning.flush(resources.get())
    assert _shape_row(("2k", 1, 0)).seeded == 1


# -- real workers -------------------------------------------------------------------


def test_a_failing_table_warns_once_then_at_debug_until_it_works_again(service, caplog):
    caplog.set_level(logging.DEBUG, logger=learning.log.name)
    learner = resources.get().learner

    def hide(old: str, new: str) -> None:
        with resources.get().statement() as ex:
            ex.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))

    hide("poll_shapes", "poll_shapes_away")
    learner.sync()
    learner.sync()
    hide("poll_shapes_away", "poll_shapes")
    learner.sync()  # read again: the next failure is news
    hide("poll_shapes", "poll_shapes_away")
    learner.sync()
    hide("poll_shapes_away", "poll_shapes")
    records = [r for r in caplog.records if r.name == learning.log.name]
    found = [(r.levelname, r.getMessage(), r.__dict__.get("event")) for r in records]
    error = records[0].args[0]  # the driver's: SQLite's or PostgreSQL's
    assert error in ("OperationalError", "ProgrammingError")
    line = f"the learned poll schedule could not be read or written ({error}); polling as configured meanwhile"
    assert found == [
        ("WARNING", line, "poll_learning_failed"),
        ("DEBUG", line, "poll_learning_failed"),
        ("WARNING", line, "poll_learning_failed"),
    ]
