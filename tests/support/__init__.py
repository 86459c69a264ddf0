"""What the tests share, one module per subject: `services` (the servers, and each xdist worker's
share of them), `jobs` (waiting with deadlines, driving this process as a worker), `cli` (the CLI
as a subprocess, batches, doctor, the queue read back), `embedded` (the file broker's folders),
`metrics` (scraping /metrics), `logs` (JSON log lines) and `callback_app` (a caller's Celery app).
What bench/ needs too lives in worker/dev/ (the TCP fault proxy, the webhook receiver, the audit)."""
