"""The fleet's shared API budget, kept in one SQL row that every worker on every host reads.

Request slots (`MODELLIX_MAX_RPS`), places in flight (`MODELLIX_MAX_IN_FLIGHT`), the fleet pause
after a 429, 401 or 402, and the per-process gate that queues submit threads at the row.
"""

__all__ = ["gate", "limits"]
