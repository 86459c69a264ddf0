"""Reading an HTTP Retry-After header: for Modellix's answers (worker.modellix) and a webhook receiver's
(worker.results.webhooks). Its own module because the two may not import each other (config imports webhooks)."""

from __future__ import annotations

import email.utils
import time


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is seconds or an HTTP date; anything else is ignored."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
