"""The job table and its queries. Nothing here imports Celery."""

from models.budget import ApiBudget
from models.job import ACTIVE, TERMINAL, Base, Job, JobStatus

__all__ = ["ACTIVE", "TERMINAL", "ApiBudget", "Base", "Job", "JobStatus"]
