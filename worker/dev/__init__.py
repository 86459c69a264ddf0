"""Development tools, not part of a production worker: the sandbox Modellix server, the embedded
demo, and the worker and producer processes that tests and benchmarks start."""
