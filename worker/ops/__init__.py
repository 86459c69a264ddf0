"""What operators see: log lines (`logs`), Prometheus metrics (`metrics`), the health and metrics
server (`health`), CPU time by phase of a job (`cpu`), and how a database outage shows (`outages`).
"""

__all__ = ["cpu", "health", "logs", "metrics", "outages"]
