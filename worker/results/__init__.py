"""Results reach the caller: the outbox's rows carried out (`delivery`), result images kept (`archive`),
signed webhook attempts (`webhooks`). `archive` and `webhooks` know nothing of Celery or SQL.
"""

__all__ = ["archive", "delivery", "webhooks"]
