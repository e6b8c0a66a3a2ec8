"""An append-only JSON-lines file that chaos jobs write to and the checker reads.

Jobs run in other processes (and, in the multi-node variant, under other raylets of the
same machine), so the ledger is a plain file: each write is one ``O_APPEND`` line, which
the kernel keeps whole. A line is ``{"event": ..., "job": ..., "pid": ..., ...}``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "pid": os.getpid(), "at": time.time(), **fields}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def entries(self, event: str | None = None) -> list[dict[str, Any]]:
        try:
            lines = Path(self.path).read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = [json.loads(line) for line in lines if line]
        return [e for e in entries if event is None or e["event"] == event]

    def count(self, event: str) -> Counter[tuple[str, int]]:
        """How many times ``event`` was written, per (job id, process)."""
        return Counter((e["job"], e["pid"]) for e in self.entries(event))
