"""Modellix's API as this service sees it: the client, what its errors mean, and nothing of Celery or SQL.

`client` makes the requests (requests, typed errors carrying their stored codes, a task's phase);
`policy` is the one place that decides what an answer means for a submit or a poll (retry, fail,
pause the fleet). The client's public names are re-exported here, so `modellix.RateLimited` reads
as what it is.
"""

from worker.modellix.client import (
    SAFE_REJECTIONS,
    AccountError,
    AmbiguousSubmit,
    ModellixClient,
    ModellixError,
    NetworkError,
    NotFound,
    ProtocolError,
    RateLimited,
    RequestRejected,
    ServerError,
    Submission,
    TaskPhase,
    TaskState,
    TransientError,
    result_urls,
)

__all__ = [
    "SAFE_REJECTIONS",
    "AccountError",
    "AmbiguousSubmit",
    "ModellixClient",
    "ModellixError",
    "NetworkError",
    "NotFound",
    "ProtocolError",
    "RateLimited",
    "RequestRejected",
    "ServerError",
    "Submission",
    "TaskPhase",
    "TaskState",
    "TransientError",
    "result_urls",
]
