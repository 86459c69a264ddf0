"""Development tools, not part of a production worker: the sandbox Modellix server, the embedded
demo, and what tests and benchmarks share (worker and producer processes, their jobs and audit, a
fault-injecting TCP proxy, a webhook receiver). `bench/` imports these, never `tests/`."""

__all__ = ["demo", "jobs", "processes", "proxy", "receiver", "sandbox"]
