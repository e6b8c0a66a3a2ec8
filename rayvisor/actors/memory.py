"""A job actor's memory reports: a thread, so a job whose event loop is blocked (for
instance by a runaway allocation) is still measured."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import psutil

logger = logging.getLogger("rayvisor.job")


class MemoryMonitor:
    """Calls ``report(rss_mb)`` every ``interval`` seconds until ``stop()``."""

    def __init__(self, *, interval: float, report: Callable[[float], object]) -> None:
        self._interval = interval
        self._report = report
        self._stopped = threading.Event()
        self._process = psutil.Process(os.getpid())
        self._thread = threading.Thread(target=self._run, name="rayvisor-memory", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._report(self._process.memory_info().rss / (1024 * 1024))
            except Exception as err:  # a report that cannot be sent is dropped, never fatal
                logger.debug("memory report failed: %r", err)
            self._stopped.wait(self._interval)
