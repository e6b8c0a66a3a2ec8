"""Job snapshots written to Ray's KV off the supervisor's loop, in order.

A KV write is a call to the GCS: done on the loop, every transition of every job would
wait for one, starts included. ``SnapshotWriter.put`` returns at once; one thread writes
what is pending, the newest snapshot of each job only (a burst of transitions costs one
write per job). Where failover needs a snapshot written before the next step (the submit
reply, a kill whose reason a successor must know), the caller awaits ``flush``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..aio import supervised_task
from .store import JobSnapshot, SupervisorStore

logger = logging.getLogger("rayvisor.supervisor")

RETRY_DELAY = 0.2
"""Seconds between tries while the GCS does not take a write (it may be briefly unreachable)."""


class SnapshotWriter:
    """See the module docstring."""

    def __init__(self, store: SupervisorStore, tasks: set[asyncio.Task[Any]]) -> None:
        self._store = store
        self._tasks = tasks
        self._pending: dict[str, JobSnapshot | None] = {}
        """Job id -> its newest snapshot not yet written (None: delete it)."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayvisor-snapshots")
        self._writer: asyncio.Task[None] | None = None

    def put(self, snapshot: JobSnapshot) -> None:
        self._pending[snapshot.info.id] = snapshot
        self._wake()

    def delete(self, job_id: str) -> None:
        self._pending[job_id] = None
        self._wake()

    async def flush(self) -> None:
        """Until everything put or deleted so far is written."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def _wake(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = supervised_task(self._write_pending(), name="snapshots", logger=logger, tasks=self._tasks)

    async def _write_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                await loop.run_in_executor(self._thread, self._write, batch)
            except Exception as err:
                logger.warning("cannot write %d job snapshots yet (%r); trying again", len(batch), err)
                for job_id, snapshot in batch.items():  # newer ones put meanwhile win
                    self._pending.setdefault(job_id, snapshot)
                await asyncio.sleep(RETRY_DELAY)

    def _write(self, batch: dict[str, JobSnapshot | None]) -> None:
        written: list[str] = []
        try:
            for job_id, snapshot in batch.items():
                if snapshot is None:
                    self._store.delete_job(job_id)
                else:
                    self._store.put_job(snapshot)
                written.append(job_id)
        finally:
            for job_id in written:  # what is left goes back (see _write_pending)
                del batch[job_id]

    def close(self) -> None:
        self._thread.shutdown(wait=False)
