"""The `kling-worker` command: its tree (`commands`), what it prints (`printing`), what options accept
(`params`), and the commands' helpers: `enqueue` (one job or a JSONL `batch`), `jobs` and `results`,
following jobs (`watch`), the `jobs retry` plan (`retry_plan`), the fleet's budget as shown (`fleet`),
the tenants' policies (`tenants`) and `doctor`.

Every mistake a person makes is one line and exit code 2 (`params.UsageError`).
"""

from worker.cli.commands import main

__all__ = ["main"]
