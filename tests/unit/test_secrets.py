"""The API key reaches no log line, no row, no error text and no settings repr."""

from __future__ import annotations

from models import JobStatus
from models.job import Job
from tests.support.jobs import handle, set_budget
from worker import resources
from worker.dev.sandbox import Step
from worker.polling import tracking


def test_the_api_key_reaches_no_log_row_or_error(service, configure, any_db_url, caplog):
    caplog.set_level("DEBUG")
    secret = "sk-test-" + "Z9" * 16
    configure(MODELLIX_API_KEY=secret)  # the sandbox expects another key: 401 everywhere
    handle(request={"prompt": "x"}, job_id="k1")
    configure(MODELLIX_API_KEY=service.api_key)
    set_budget(paused_until=0)  # lift the fleet pause the 401 set
    # Answers that echo the request headers, key included, on a submit and on a poll.
    service.script(Step("echo", on="submit"))
    handle(request={"prompt": "y"}, job_id="k2")
    assert handle(request={"prompt": "z"}, job_id="k3").status is JobStatus.submitted
    service.script(Step("echo", on="poll"))
    assert isinstance(tracking.check(resources.get(), "k3", 0), tracking.PollAgain)  # logged, made again later
    with resources.get().transaction() as s:
        dumped = repr([j.to_dict() for j in s.query(Job)])
    assert "401" in dumped and "Bearer ***" in dumped  # the echoes did leave their trace...
    assert caplog.text.count("Bearer ***") == 2
    for text in (dumped, caplog.text, repr(resources.settings())):
        assert secret not in text and service.api_key not in text  # ...but never the key itself
