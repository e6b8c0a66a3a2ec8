"""How many job actors may be starting at once, cluster-wide.

A Ray actor starts a fresh interpreter: CPU-bound work. Twenty at once on two cores all
start slowly and miss ``initialize_process_timeout`` together; a few at a time each start
quickly. Jobs waiting for a slot stay STARTING and their timeout starts with their slot.
Jobs go first: the warm pool only starts an actor when no job is waiting for a slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class StartSlots:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"need at least one start slot, got {limit}")
        self.limit = limit
        self._in_use = 0
        self._jobs_waiting = 0
        self._changed = asyncio.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    @asynccontextmanager
    async def for_job(self) -> AsyncIterator[None]:
        """Hold a slot while a job's actor is created and started."""
        async with self._changed:
            self._jobs_waiting += 1
            try:
                await self._changed.wait_for(lambda: self._in_use < self.limit)
            finally:
                self._jobs_waiting -= 1
            self._in_use += 1
        try:
            yield
        finally:
            await self._release()

    @asynccontextmanager
    async def for_pool(self) -> AsyncIterator[None]:
        """Hold a slot while the warm pool starts an idle actor (only when no job waits)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._in_use < self.limit and not self._jobs_waiting)
            self._in_use += 1
        try:
            yield
        finally:
            await self._release()

    async def _release(self) -> None:
        async with self._changed:
            self._in_use -= 1
            self._changed.notify_all()
