"""The warm pool: job actors created and prewarmed ahead of demand, per agent.

A cold Ray actor takes ~0.4 s to start on a small machine; a job that takes a prewarmed
actor starts in milliseconds. The pool keeps between ``num_idle_actors`` and
``max_idle_actors`` ready, following the recent arrival rate; a prewarm that fails or
exceeds ``initialize_process_timeout`` is killed and replaced after an exponential backoff,
never in a tight loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..agents.options import WorkerOptions
from ..aio import supervised_task
from .job_handle import JobActorHandle
from .metrics import SupervisorMetrics
from .start_slots import StartSlots

logger = logging.getLogger("rayvisor.pool")

TRIM_CHECKS_PER_WINDOW = 6
"""How often per ``pool_rate_window`` the pool re-evaluates its target when nothing happens."""
INITIAL_REFILL_ESTIMATE = 0.5
"""Assumed seconds to create and prewarm one actor until the first one has been measured."""


class WarmPool:
    """See the module docstring. All methods run on the supervisor's event loop."""

    def __init__(self, opts: WorkerOptions, create: Callable[[], JobActorHandle],
                 metrics: SupervisorMetrics, start_slots: StartSlots) -> None:
        self._opts = opts
        self._start_slots = start_slots
        self._create = create
        self._metrics = metrics
        self._ready: deque[JobActorHandle] = deque()
        self._starting = 0
        """Prewarms asked for, waiting for a start slot or launching."""
        self._launching = 0
        self._arrivals: deque[float] = deque()
        self._failures = 0
        self._not_before = 0.0
        self._refill_seconds = INITIAL_REFILL_ESTIMATE
        self._wake = asyncio.Event()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._filler = supervised_task(self._fill(), name=f"pool:{opts.agent_name}", logger=logger, tasks=self._tasks)

    @property
    def idle(self) -> int:
        return len(self._ready)

    @property
    def starting(self) -> int:
        """Idle actors being created now (not those still waiting for a start slot): each
        holds a ``rayvisor_slot`` of its node."""
        return self._launching

    def take(self) -> JobActorHandle | None:
        """A ready, prewarmed actor (or None: start a cold one); counts an arrival either way."""
        self._arrivals.append(time.monotonic())
        handle = self._ready.popleft() if self._ready else None
        self._publish()
        self._wake.set()
        return handle

    def target(self) -> int:
        """How many idle actors to keep: the floor plus what the recent arrival rate needs
        while one actor is being prewarmed, capped at ``max_idle_actors``."""
        horizon = time.monotonic() - self._opts.pool_rate_window
        while self._arrivals and self._arrivals[0] < horizon:
            self._arrivals.popleft()
        rate = len(self._arrivals) / self._opts.pool_rate_window
        wanted = self._opts.num_idle_actors + math.ceil(rate * self._refill_seconds)
        return max(self._opts.num_idle_actors, min(self._opts.max_idle_actors, wanted))

    def close(self) -> None:
        """Stop refilling and kill every idle actor."""
        self._closed = True
        self._filler.cancel()  # prewarms in flight finish and kill their actor (see _prewarm_one)
        while self._ready:
            self._ready.popleft().kill()
        self._publish()

    async def _fill(self) -> None:
        while not self._closed:
            self._wake.clear()
            now = time.monotonic()
            while (not self._closed and now >= self._not_before
                   and len(self._ready) + self._starting < self.target()):
                self._starting += 1
                supervised_task(self._prewarm_one(), name="pool-prewarm", logger=logger, tasks=self._tasks)
            target = self.target()
            while len(self._ready) > target:  # the arrival rate fell: let extra actors go
                self._ready.pop().kill()
                self._publish()
            # Wake for a backoff that ends, and now and then to let the target follow the rate.
            wait = self._opts.pool_rate_window / TRIM_CHECKS_PER_WINDOW
            if now < self._not_before:
                wait = min(wait, self._not_before - now)
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _prewarm_one(self) -> None:
        handle: JobActorHandle | None = None
        began = time.monotonic()
        try:
            async with self._start_slots.for_pool():
                if self._closed:  # closed while it waited: start nothing
                    return
                began = time.monotonic()
                self._launching += 1
                try:
                    handle = self._create()
                    await handle.prewarm(self._opts.initialize_process_timeout)
                finally:
                    self._launching -= 1
        except asyncio.CancelledError:  # the supervisor itself is going away
            if handle is not None:
                handle.kill()
            raise
        except Exception as err:
            if handle is not None:
                handle.kill()
            self._failures += 1
            delay = min(self._opts.pool_backoff_max, self._opts.pool_backoff_initial * 2 ** (self._failures - 1))
            self._not_before = time.monotonic() + delay
            self._metrics.prewarm_failed(self._opts.agent_name)
            logger.warning("prewarming an idle actor failed (%d in a row); next try in %.2fs: %s",
                           self._failures, delay, err)
        else:
            self._failures = 0
            self._refill_seconds = 0.8 * self._refill_seconds + 0.2 * (time.monotonic() - began)
            if self._closed:
                handle.kill()
            else:
                self._ready.append(handle)
        finally:
            self._starting -= 1
            self._publish()
            self._wake.set()

    def _publish(self) -> None:
        self._metrics.idle_actors(self._opts.agent_name, len(self._ready))
