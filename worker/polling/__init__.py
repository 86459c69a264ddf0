"""Following a submitted Modellix task until it ends.

- `tracking`: one poll of a job (`check`) and the sweep that repairs lost polls and interrupted submits;
- `schedule`: when polls are due (first poll, gaps, deadline) and the rule that learns a shape's first poll;
- `learning`: this process's part in that learning, merged into `poll_shapes` every few seconds;
- `timer`: each process's poll timer, a heap feeding a thread pool.
"""

__all__ = ["learning", "schedule", "timer", "tracking"]
