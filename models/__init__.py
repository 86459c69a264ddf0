"""The job table, its lifecycle and its SQL. Nothing here imports Celery."""

from models.budget import ApiBudget
from models.job import ACTIVE, IN_FLIGHT, TERMINAL, Base, Job, JobStatus
from models.outbox import Delivery
from models.poll_shapes import PollShape
from models.tenants import Tenant

__all__ = [
    "ACTIVE",
    "IN_FLIGHT",
    "TERMINAL",
    "ApiBudget",
    "Base",
    "Delivery",
    "Job",
    "JobStatus",
    "PollShape",
    "Tenant",
]
