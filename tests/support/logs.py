"""Log output as a test reads it."""

from __future__ import annotations

import json


def json_lines(text: str) -> list[dict]:
    found = []
    for line in text.splitlines():
        parsed = json.loads(line)  # every line: a failure names the one that is not JSON
        assert isinstance(parsed, dict), line
        found.append(parsed)
    return found
