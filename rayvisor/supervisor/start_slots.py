"""How many job actors this supervisor starts at once.

A Ray actor starts a fresh interpreter: CPU-bound work. Twenty at once on two cores all
start slowly and miss ``initialize_process_timeout`` together; a few at a time each start
quickly. Jobs waiting for a slot stay STARTING and their timeout starts with their turn.
Jobs go first, in arrival order: the warm pool gets a slot only when no job waits, and no
job is starting at all (warm starts take no slot, yet a refill spawning interpreters
beside them would slow down the very burst it refills after), and none has started for
``pool_refill_delay`` seconds: jobs submitted one after another are a burst too. Under a
steady stream of starts a refill waits at most ``REFILL_PATIENCE`` times that delay.

Slots are handed over, never raced for: ``release`` gives the freed slot straight to the
next waiter, so a waiter that is cancelled just after being handed one gives it back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, contextmanager
from collections.abc import Iterator


REFILL_PATIENCE = 4
"""A refill waits for a quiet moment at most this many ``pool_refill_delay``s."""


class StartSlots:
    def __init__(self, limit: Callable[[], int], refill_delay: Callable[[], float] = lambda: 0.0) -> None:
        self._limit = limit
        self._refill_delay = refill_delay
        self._in_use = 0
        self._jobs_starting = 0
        self._last_start = -math.inf
        """When (monotonic) the last job start ended."""
        self._jobs: deque[asyncio.Future[None]] = deque()
        self._pool: deque[asyncio.Future[None]] = deque()

    @contextmanager
    def job_starting(self) -> Iterator[None]:
        """Around a job's start (warm or cold): the pool takes no slot meanwhile."""
        self._jobs_starting += 1
        try:
            yield
        finally:
            self._jobs_starting -= 1
            self._last_start = time.monotonic()
            if self._jobs_starting == 0:
                self._hand_out()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def limit(self) -> int:
        return max(1, self._limit())

    async def acquire(self, *, job: bool) -> None:
        """Wait for a slot (jobs before the pool, each in arrival order)."""
        ahead = self._jobs if job else (self._jobs or self._pool or self._jobs_starting)
        if self._in_use < self.limit and not ahead:
            self._in_use += 1
            return
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._jobs if job else self._pool).append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self.release()  # handed a slot it no longer wants: pass it on
            else:
                (self._jobs if job else self._pool).remove(handed)
            raise

    def release(self) -> None:
        """Free a slot: hand it to the next waiter (a job first), if the limit allows."""
        self._in_use -= 1
        self._hand_out()

    def _hand_out(self) -> None:
        while self._in_use < self.limit:
            waiter = self._next_waiter()
            if waiter is None:
                return
            self._in_use += 1
            waiter.set_result(None)

    def _next_waiter(self) -> asyncio.Future[None] | None:
        for queue in (self._jobs, self._pool) if not self._jobs_starting else (self._jobs,):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    return waiter
        return None

    @asynccontextmanager
    async def for_pool(self) -> AsyncIterator[None]:
        """Hold a slot while the warm pool starts an idle actor (after a quiet moment)."""
        await self._quiet_moment()
        await self.acquire(job=False)
        try:
            yield
        finally:
            self.release()

    async def _quiet_moment(self) -> None:
        """Until no job is starting and none has for ``pool_refill_delay`` seconds, or until
        ``REFILL_PATIENCE`` delays have passed."""
        delay = self._refill_delay()
        give_up = time.monotonic() + REFILL_PATIENCE * delay
        while (now := time.monotonic()) < give_up:
            quiet_at = now + delay if self._jobs_starting else self._last_start + delay
            if quiet_at <= now:
                return
            await asyncio.sleep(min(quiet_at, give_up) - now)
