"""A job's driver runs its attempts: start, follow, health, deadline, restart decision.

Plain asyncio against scripted job actors (``supervisor_fakes.FakeJobActor``): no Ray, each
test runs in milliseconds. Every wait has the deadline ``DEADLINE``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rayvisor import Cause, JobState, RestartPolicy, WorkerOptions
from rayvisor.messages import JobSpec, JobStart, MemoryReport, ParticipantsChanged
from rayvisor.supervisor.attempt import AttemptEnd
from rayvisor.supervisor.job_driver import DriverServices, JobDriver, JobDrivers
from rayvisor.supervisor.job_table import JobRecord, JobTable
from rayvisor.supervisor.start_slots import StartSlots
from bounded import SCENARIO_DEADLINE, run_bounded
from supervisor_fakes import FakeCluster, FakeJobActor, LocalMetrics, NoPools

DEADLINE = SCENARIO_DEADLINE


async def agent(ctx: Any) -> None:
    pass


class Harness:
    """A job table and the services a driver needs, with the actors it created."""

    def __init__(self, *, start_slots: int = 2, **actor_options: Any) -> None:
        self.table = JobTable(finished_job_history=100, event_history=100,
                              on_change=lambda record: self.drivers.job_changed(record))  # as SupervisorCore wires it
        self.metrics = LocalMetrics("RW_test")
        self.slots = StartSlots(lambda: start_slots)
        self.actors: list[FakeJobActor] = []
        self.actor_options: list[dict[str, Any]] = [actor_options]
        self.snapshots: list[tuple[str, AttemptEnd | None]] = []
        self.evicted: list[str] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.drivers = JobDrivers(DriverServices(
            table=self.table, metrics=self.metrics, pools=NoPools(), start_slots=self.slots, cluster=FakeCluster(),
            new_actor=self._new_actor, job_start=self._job_start, persist=self._persist, flush=self._flush,
            admitting=lambda: True,
            withdraw_offer=lambda record, cause, reason: False, evict=lambda record: self.evicted.append(record.id),
            tasks=self.tasks))

    def _new_actor(self, opts: WorkerOptions, suffix: str) -> FakeJobActor:
        options = self.actor_options[min(len(self.actors), len(self.actor_options) - 1)]
        actor = FakeJobActor("rayvisor-job-" + suffix, **options)
        self.actors.append(actor)
        return actor

    @staticmethod
    def _job_start(record: JobRecord, opts: WorkerOptions) -> JobStart:
        return JobStart(job_id=record.id, room=record.spec.room, metadata="", agent_name=opts.agent_name,
                        dispatch_id="", worker_id="RW_test", attempt=record.attempt, identity=record.identity)

    def _persist(self, record: JobRecord, end: AttemptEnd | None) -> None:
        self.snapshots.append((record.id, end))

    async def _flush(self) -> None:
        await asyncio.sleep(0)

    def job(self, opts: WorkerOptions, *, restart: RestartPolicy = RestartPolicy.TEMPORARY) -> JobDriver:
        record = JobRecord(id=f"RJ_{len(self.table.all())}", spec=JobSpec(room="room"), agent_name=opts.agent_name,
                           shutdown_budget=opts.shutdown_process_timeout, restart_policy=restart)
        self.table.add(record)
        driver = self.drivers.add(record, opts)
        driver.start()
        return driver

    async def running_actor(self, count: int = 1) -> FakeJobActor:
        """The ``count``-th actor, once the driver has run its entrypoint."""
        while len(self.actors) < count or not self.actors[count - 1].ran.is_set():
            await asyncio.sleep(0.001)
        return self.actors[count - 1]


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds (the scenario's DEADLINE bounds it)."""
    while not condition():
        await asyncio.sleep(0.001)


def options(**overrides: Any) -> WorkerOptions:
    return WorkerOptions(entrypoint_fnc=agent, **overrides)


def states(table: JobTable, job_id: str) -> list[JobState]:
    return [e.state for e in table._events if e.job_id == job_id]


def test_a_job_that_ends_on_its_own_succeeds_and_its_actor_is_let_go() -> None:
    async def run() -> None:
        h = Harness()
        driver = h.job(options())
        actor = await h.running_actor()
        actor.finish(JobState.SUCCEEDED, Cause.ROOM_EMPTY)
        await driver.record.finished.wait()

        record = driver.record
        assert states(h.table, record.id) == [JobState.PENDING, JobState.STARTING, JobState.RUNNING,
                                              JobState.SHUTTING_DOWN, JobState.SUCCEEDED]
        assert (record.cause, record.info().pid) == (Cause.ROOM_EMPTY, actor.pid)
        assert [(a.attempt, a.state) for a in record.attempts] == [(1, JobState.SUCCEEDED)]
        assert actor.killed, "a detached job actor does not go away by itself"
        assert [start.run for start in actor.starts] == [True], "start and run go in one message"
        assert h.evicted == [record.id]
        assert h.drivers.get(record.id) is None, "an ended job's driver is let go"
    run_bounded(run)


def test_a_restart_makes_a_new_attempt_on_a_new_actor_and_keeps_nothing_of_the_old_one() -> None:
    async def run() -> None:
        h = Harness()
        driver = h.job(options(), restart=RestartPolicy.TRANSIENT)
        first = await h.running_actor()
        attempt_one = driver.record.current
        driver.participants_changed(ParticipantsChanged(job_id=driver.record.id, attempt=1, version=1,
                                                        identities=["alice"]))
        assert driver.record.info().participants == ["alice"]
        first.crash()
        second = await h.running_actor(2)

        record = driver.record
        assert record.current is not attempt_one
        assert (record.attempt, record.restarts, record.state) == (2, 1, JobState.RUNNING)
        assert record.info().participants == [] and record.info().pid == second.pid
        assert record.current.kill_end is None and not record.current.shutdown_requested.is_set()
        assert [(a.attempt, a.state, a.cause, a.pid) for a in record.attempts] == [
            (1, JobState.FAILED, Cause.ACTOR_CRASHED, first.pid)]
        assert second.name.endswith("-2")
        assert h.metrics.counter("rayvisor_job_restarts", cause="actor_crashed") == 1
        second.finish(JobState.SUCCEEDED, Cause.ROOM_EMPTY)
        await record.finished.wait()
        assert record.state is JobState.SUCCEEDED
    run_bounded(run)


def test_a_report_from_an_earlier_attempt_is_ignored() -> None:
    async def run() -> None:
        h = Harness()
        driver = h.job(options(), restart=RestartPolicy.TRANSIENT)
        (await h.running_actor()).crash()
        await h.running_actor(2)
        driver.participants_changed(ParticipantsChanged(job_id=driver.record.id, attempt=1, version=5,
                                                        identities=["ghost"]))
        driver.memory(MemoryReport(job_id=driver.record.id, attempt=1, rss_mb=10_000.0))
        assert driver.record.info().participants == [] and driver.record.state is JobState.RUNNING
    run_bounded(run)


def test_a_shutdown_whose_budget_is_spent_kills_the_actor() -> None:
    async def run() -> None:
        h = Harness(obeys_shutdown=False)
        driver = h.job(options(shutdown_process_timeout=0.05))
        actor = await h.running_actor()
        driver.begin_shutdown(Cause.USER_SHUTDOWN, "bye", notify_actor=True)
        assert driver.record.state is JobState.SHUTTING_DOWN and actor.shutdown_requests
        await driver.record.finished.wait()

        record = driver.record
        assert (record.state, record.cause) == (JobState.KILLED, Cause.SHUTDOWN_TIMEOUT)
        assert "shutdown_process_timeout=0.05s" in (record.error or "")
        await until(lambda: actor.killed)  # once the snapshot saying why is written
        assert (record.id, record.current.kill_end) in h.snapshots, "the kill is snapshotted before it lands"
    run_bounded(run)


def test_a_shutdown_that_completes_in_time_disarms_the_deadline() -> None:
    async def run() -> None:
        h = Harness()
        driver = h.job(options(shutdown_process_timeout=0.05))
        await h.running_actor()
        driver.begin_shutdown(Cause.USER_SHUTDOWN, "bye", notify_actor=True)
        await driver.record.finished.wait()
        await asyncio.sleep(0.1)  # past the budget: a timer left armed would have killed it

        assert (driver.record.state, driver.record.cause) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN)
        assert driver.record.current.deadline_task is None
    run_bounded(run)


def test_an_actor_that_stops_answering_pings_is_killed_as_unresponsive() -> None:
    async def run() -> None:
        h = Harness()
        driver = h.job(options(ping_interval=0.01, ping_timeout=0.02))
        (await h.running_actor()).hang()
        await driver.record.finished.wait()

        assert (driver.record.state, driver.record.cause) == (JobState.KILLED, Cause.UNRESPONSIVE)
        await until(lambda: h.actors[0].killed)
    run_bounded(run)


def test_restarts_past_the_intensity_end_the_job_with_restart_limit() -> None:
    async def run() -> None:
        h = Harness()
        driver = h.job(options(max_restarts=2), restart=RestartPolicy.PERMANENT)
        for n in range(1, 4):
            (await h.running_actor(n)).crash()
        await driver.record.finished.wait()

        record = driver.record
        assert (record.state, record.cause, record.restarts) == (JobState.FAILED, Cause.RESTART_LIMIT, 2)
        assert "2 restarts within restart_window=60.0s" in (record.error or "")
        assert len(record.attempts) == 3
    run_bounded(run)


def test_an_entrypoint_that_cannot_start_fails_the_job_with_start_failed() -> None:
    async def run() -> None:
        h = Harness(start_error="ImportError: no module named 'agent'")
        driver = h.job(options())
        await driver.record.finished.wait()

        assert (driver.record.state, driver.record.cause) == (JobState.FAILED, Cause.START_FAILED)
        assert "no module named" in (driver.record.error or "") and h.actors[0].killed
    run_bounded(run)


def test_a_job_shut_down_while_it_waits_for_a_start_slot_ends_without_an_actor() -> None:
    async def run() -> None:
        h = Harness(start_slots=1)
        await h.slots.acquire(job=True)  # every start slot is taken
        driver = h.job(options())
        while driver.record.state is not JobState.STARTING:
            await asyncio.sleep(0.001)
        driver.begin_shutdown(Cause.USER_SHUTDOWN, "never mind", notify_actor=True)
        await driver.record.finished.wait()

        assert (driver.record.state, driver.record.cause) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN)
        assert h.actors == [] and h.slots.in_use == 1, "it neither created an actor nor kept a slot"
    run_bounded(run)


def test_a_job_over_its_memory_limit_is_shut_down_and_killed_if_it_keeps_growing() -> None:
    async def run() -> None:
        h = Harness(obeys_shutdown=False)
        driver = h.job(options(job_memory_limit_mb=100.0))
        actor = await h.running_actor()
        job_id = driver.record.id
        driver.memory(MemoryReport(job_id=job_id, attempt=1, rss_mb=150.0))
        assert (driver.record.state, driver.record.cause) == (JobState.SHUTTING_DOWN, Cause.MEMORY_LIMIT)
        assert actor.shutdown_requests[0].cause is Cause.MEMORY_LIMIT
        driver.memory(MemoryReport(job_id=job_id, attempt=1, rss_mb=170.0))
        await driver.record.finished.wait()

        assert (driver.record.state, driver.record.cause) == (JobState.KILLED, Cause.MEMORY_LIMIT)
        assert "still growing" in (driver.record.error or "")
    run_bounded(run)


def test_the_job_shuts_itself_down_and_its_driver_holds_the_deadline() -> None:
    async def run() -> None:
        from rayvisor.messages import ShutdownStarted

        h = Harness()
        driver = h.job(options(shutdown_process_timeout=0.05))
        await h.running_actor()
        driver.shutdown_started(ShutdownStarted(job_id=driver.record.id, attempt=1, cause=Cause.ROOM_EMPTY))
        await driver.record.finished.wait()

        assert (driver.record.state, driver.record.cause) == (JobState.KILLED, Cause.SHUTDOWN_TIMEOUT)
        assert driver.record.current.shutdown_trigger is Cause.ROOM_EMPTY
    run_bounded(run)


def test_a_crash_is_recorded_at_once_and_corrected_to_node_lost_when_rays_verdict_says_so() -> None:
    async def run() -> None:
        from rayvisor.supervisor.job_handle import ActorFate

        h = Harness()
        driver = h.job(options())
        actor = await h.running_actor()
        actor.crash(verdict=None)  # Ray has not decided yet: the node's health checks are still running
        await driver.record.finished.wait()
        record = driver.record
        assert (record.state, record.cause) == (JobState.FAILED, Cause.ACTOR_CRASHED)
        assert not actor.killed, "a kill would be a verdict of its own and hide the node's loss"

        actor.verdict.set_result(ActorFate.DIED_WITH_NODE)
        while record.cause is not Cause.NODE_LOST:
            await asyncio.sleep(0.001)
        assert record.attempts[0].cause is Cause.NODE_LOST and actor.killed
        assert [(e.state, e.cause) for e in h.table._events if e.state is JobState.FAILED] == [
            (JobState.FAILED, Cause.ACTOR_CRASHED), (JobState.FAILED, Cause.NODE_LOST)]
        assert h.metrics.counter("rayvisor_jobs_ended", state="FAILED", cause="actor_crashed") == 0
        assert h.metrics.counter("rayvisor_jobs_ended", state="FAILED", cause="node_lost") == 1
    run_bounded(run)


def test_a_restarted_jobs_crashed_attempt_is_corrected_in_its_history_and_the_restart_metric() -> None:
    async def run() -> None:
        from rayvisor.supervisor.job_handle import ActorFate

        h = Harness()
        driver = h.job(options(), restart=RestartPolicy.TRANSIENT)
        first = await h.running_actor()
        first.crash(verdict=None)
        await h.running_actor(2)
        first.verdict.set_result(ActorFate.DIED_WITH_NODE)
        record = driver.record
        while record.attempts[0].cause is not Cause.NODE_LOST:
            await asyncio.sleep(0.001)
        assert (record.state, record.cause, record.attempt) == (JobState.RUNNING, None, 2)
        assert h.metrics.counter("rayvisor_job_restarts", cause="actor_crashed") == 0
        assert h.metrics.counter("rayvisor_job_restarts", cause="node_lost") == 1
        assert h.metrics.counter("rayvisor_jobs_ended", state="FAILED", cause="actor_crashed") == 0  # it never ended
    run_bounded(run)


def test_a_crash_on_a_node_already_known_lost_is_recorded_node_lost_at_once() -> None:
    async def run() -> None:
        h = Harness()
        driver = h.job(options())
        actor = await h.running_actor()
        h.drivers.services.cluster.lost_nodes = frozenset({actor.node})
        actor.crash(verdict=None)
        await driver.record.finished.wait()
        assert driver.record.cause is Cause.NODE_LOST
    run_bounded(run)


def test_a_shutdown_while_the_start_is_in_flight_reaches_the_actor_and_the_start_is_not_abandoned() -> None:
    async def run() -> None:
        h = Harness(start_held=True)
        driver = h.job(options())
        while not h.actors or not h.actors[0].starts:
            await asyncio.sleep(0.001)
        actor = h.actors[0]
        while not actor.starts:
            await asyncio.sleep(0.001)
        driver.begin_shutdown(Cause.USER_SHUTDOWN, "changed my mind", notify_actor=True)
        assert actor.shutdown_requests, "the actor hears of the shutdown while its start is in flight"
        actor.start_gate.set()
        await driver.record.finished.wait()

        assert (driver.record.state, driver.record.cause) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN)
        assert not actor.ran.is_set() and actor.killed
    run_bounded(run)
