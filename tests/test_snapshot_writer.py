"""Job snapshots are written off the loop, the newest per job only, in order, and a write
the GCS refuses is tried again. A fake store stands in for Ray's KV: no Ray."""

from __future__ import annotations

import asyncio
import threading

from bounded import SCENARIO_DEADLINE, run_bounded

from rayvisor.messages import JobInfo, JobSpec, JobState, RestartPolicy
from rayvisor.supervisor import snapshot_writer
from rayvisor.supervisor.snapshot_writer import SnapshotWriter
from rayvisor.supervisor.store import JobSnapshot



class FakeStore:
    """Ray's KV as the writer uses it; ``gate`` holds writes back until the test opens it."""

    def __init__(self, failures: int = 0, held: frozenset[str] | None = None) -> None:
        self.writes: list[tuple[str, str, JobState | None]] = []
        self.held = held
        """Only these jobs' writes wait for ``gate`` (None: every write does)."""
        self.failures = failures
        self.gate = threading.Event()
        self.gate.set()
        self.threads: set[str] = set()
        self.tries = 0
        self._tried = threading.Condition()

    def wait_tries(self, count: int) -> None:
        """Until the writer has begun ``count`` puts (call it in a thread)."""
        with self._tried:
            assert self._tried.wait_for(lambda: self.tries >= count, SCENARIO_DEADLINE)

    def put_job(self, snapshot: JobSnapshot) -> None:
        with self._tried:
            self.tries += 1
            self._tried.notify_all()
        if self.held is None or snapshot.info.id in self.held:
            self.gate.wait(SCENARIO_DEADLINE)
        self.threads.add(threading.current_thread().name)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("GCS unavailable")
        self.writes.append(("put", snapshot.info.id, snapshot.info.state))

    def delete_job(self, job_id: str) -> None:
        self.writes.append(("delete", job_id, None))


def snapshot(job_id: str, state: JobState) -> JobSnapshot:
    info = JobInfo(id=job_id, state=state, room="r", agent_name="", metadata="", restarts=0, attempts=[],
                   participants=[], participant_actors=[], timestamps={})
    return JobSnapshot(info=info, spec=JobSpec(room="r"), shutdown_budget=1.0,
                       restart_policy=RestartPolicy.TEMPORARY, attempt=1)


def test_writes_happen_in_a_thread_and_a_burst_costs_one_write_per_job() -> None:
    store = FakeStore()

    async def scenario() -> None:
        writer = SnapshotWriter(store, set())
        store.gate.clear()  # the first write is held: what comes meanwhile piles up
        writer.put(snapshot("a", JobState.PENDING))
        await asyncio.to_thread(store.wait_tries, 1)
        for state in (JobState.STARTING, JobState.RUNNING):
            writer.put(snapshot("a", state))
            writer.put(snapshot("b", state))
        store.gate.set()
        await writer.flush()
        writer.close()
    run_bounded(scenario)
    assert store.writes == [("put", "a", JobState.PENDING), ("put", "a", JobState.RUNNING),
                            ("put", "b", JobState.RUNNING)]
    assert all(name.startswith("rayvisor-snapshots") for name in store.threads)


def test_a_delete_after_a_put_wins_and_flush_waits_for_both() -> None:
    store = FakeStore()

    async def scenario() -> None:
        writer = SnapshotWriter(store, set())
        writer.put(snapshot("a", JobState.SUCCEEDED))
        writer.delete("a")
        await writer.flush()
        writer.close()
    run_bounded(scenario)
    assert store.writes == [("delete", "a", None)]


def test_a_refused_write_is_tried_again_and_a_newer_snapshot_put_meanwhile_wins(monkeypatch) -> None:
    monkeypatch.setattr(snapshot_writer, "RETRY_DELAY", 0.01)
    store = FakeStore(failures=2)

    async def scenario() -> None:
        writer = SnapshotWriter(store, set())
        writer.put(snapshot("a", JobState.STARTING))
        await asyncio.to_thread(store.wait_tries, 1)  # the first try fails; the next comes after the retry delay
        writer.put(snapshot("a", JobState.RUNNING))
        await writer.flush()
        writer.close()
    run_bounded(scenario)
    assert store.writes == [("put", "a", JobState.RUNNING)]


def test_flush_waits_for_what_was_put_before_it_not_for_later_writes() -> None:
    store = FakeStore(held=frozenset({"b"}))

    async def scenario() -> None:
        writer = SnapshotWriter(store, set())
        writer.put(snapshot("a", JobState.STARTING))
        first = asyncio.ensure_future(writer.flush())  # waits for a's write only
        await asyncio.to_thread(store.wait_tries, 1)  # a's batch is taken
        store.gate.clear()
        writer.put(snapshot("b", JobState.STARTING))  # held until the gate opens
        await first
        assert store.writes == [("put", "a", JobState.STARTING)]
        second = asyncio.ensure_future(writer.flush())  # waits for b's
        await asyncio.to_thread(store.wait_tries, 2)  # b's write has begun and is held
        assert not second.done()
        store.gate.set()
        await second
        writer.close()
    run_bounded(scenario)
    assert store.writes == [("put", "a", JobState.STARTING), ("put", "b", JobState.STARTING)]
