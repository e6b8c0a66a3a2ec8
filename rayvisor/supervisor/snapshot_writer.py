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
        self._put_seq = 0
        """How many puts and deletes so far."""
        self._written_seq = 0
        """Every put or delete up to this one is written."""
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayvisor-snapshots")
        self._writer: asyncio.Task[None] | None = None

    def put(self, snapshot: JobSnapshot) -> None:
        self._pending[snapshot.info.id] = snapshot
        self._wake()

    def delete(self, job_id: str) -> None:
        self._pending[job_id] = None
        self._wake()

    async def flush(self) -> None:
        """Until everything put or deleted so far is written (not what comes after: a
        caller in a burst waits for its own write, not for the whole burst's)."""
        if self._written_seq >= self._put_seq:
            return
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.append((self._put_seq, written))
        await asyncio.shield(written)

    def _wake(self) -> None:
        self._put_seq += 1
        if self._writer is None or self._writer.done():
            self._writer = supervised_task(self._write_pending(), name="snapshots", logger=logger, tasks=self._tasks)

    async def _write_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending, batch_seq = self._pending, {}, self._put_seq
            try:
                await loop.run_in_executor(self._thread, self._write, batch)
            except Exception as err:
                logger.warning("cannot write %d job snapshots yet (%r); trying again", len(batch), err)
                for job_id, snapshot in batch.items():  # newer ones put meanwhile win
                    self._pending.setdefault(job_id, snapshot)
                await asyncio.sleep(RETRY_DELAY)
            else:
                self._written(batch_seq)

    def _written(self, seq: int) -> None:
        """Everything up to ``seq`` is written: release the flushes waiting for no more."""
        self._written_seq = seq
        waiting = []
        for target, written in self._flushes:
            if target <= seq:
                if not written.done():
                    written.set_result(None)
            else:
                waiting.append((target, written))
        self._flushes = waiting

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
