"""A driver per job: it runs the job's attempts and holds every deadline of each.

``JobDriver`` is plain asyncio. It takes an actor (warm or cold), starts and follows it,
pings it, kills it when its shutdown budget is spent, and after each attempt asks the
restart policy whether another follows. Every Ray call goes through the actor handle
(``JobActorHandle``), and everything else it uses comes in ``DriverServices``, so tests
drive it with fakes and no Ray.

The job's record is changed here and in the job table only: its state through
``JobTable.transition``, the current attempt through its ``Attempt``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..agents.options import WorkerOptions
from ..aio import supervised_task
from ..messages import (
    Cause,
    JobStart,
    JobState,
    MemoryReport,
    ParticipantsChanged,
    ShutdownRequest,
    ShutdownStarted,
)
from .attempt import Attempt, AttemptEnd
from .job_handle import ActorFate, ActorGone, JobActorHandle, StartError
from .job_table import JobRecord, JobTable, wait_ended
from .metrics import SupervisorMetrics
from .restart_policy import ABNORMAL_ENDS, EndedAttempt, restart_decision
from .start_slots import StartSlots

logger = logging.getLogger("rayvisor.supervisor")

LIVE_BEFORE_SHUTDOWN = (JobState.PENDING, JobState.STARTING, JobState.RUNNING)
PING_JITTER = 0.1
"""Pings are spread by +-10% of ``ping_interval`` so many jobs do not ping in lockstep."""


class ActorGoneMarker:
    """``resume`` value for a recovered job whose actor no longer exists."""


GONE = ActorGoneMarker()


class Cluster(Protocol):
    """What a driver reads of the cluster (``ClusterView``)."""

    @property
    def alive_nodes(self) -> frozenset[str]: ...

    @property
    def lost_nodes(self) -> frozenset[str]: ...

    async def refresh(self) -> None: ...


class Pools(Protocol):
    """What a driver asks of the warm pools (``WarmPools``)."""

    def take(self, agent: str) -> "asyncio.Future[JobActorHandle | None] | None": ...


@dataclass
class DriverServices:
    """What every job's driver shares with the others."""

    table: JobTable
    metrics: SupervisorMetrics
    pools: Pools
    start_slots: StartSlots
    cluster: Cluster
    new_actor: Callable[[WorkerOptions, str], JobActorHandle]
    """A cold actor for ``opts``, named by the given suffix."""
    job_start: Callable[[JobRecord, WorkerOptions], JobStart]
    persist: Callable[[JobRecord, AttemptEnd | None], None]
    """Snapshot the record (with the current attempt's end, when known before it is
    recorded); written in the background."""
    flush: Callable[[], Awaitable[None]]
    """Until every snapshot persisted so far is written."""
    admitting: Callable[[], bool]
    withdraw_offer: Callable[[JobRecord, Cause, str], bool]
    """A job still on offer to LiveKit ends REJECTED at once (True), or not (False)."""
    evict: Callable[[JobRecord], None]
    """Take the job's participant out of its room (a killed job never left). Blocking."""
    tasks: set[asyncio.Task[Any]]


class JobDriver:
    """Runs one job's attempts until one ends for good (see the module docstring)."""

    def __init__(self, record: JobRecord, opts: WorkerOptions, services: DriverServices) -> None:
        self.record = record
        self.opts = opts
        self._s = services

    def start(self, resume: JobActorHandle | ActorGoneMarker | None = None) -> None:
        """Drive the job in a supervised task; ``resume``: a recovered job's live actor (or ``GONE``)."""
        supervised_task(self.run(resume), name=f"job:{self.record.id}", logger=logger, tasks=self._s.tasks)

    # -- the attempts ---------------------------------------------------------------------

    async def run(self, resume: JobActorHandle | ActorGoneMarker | None = None) -> None:
        """Run attempts until one ends for good; whatever goes wrong, the job is not left
        live with nobody driving it."""
        record, opts = self.record, self.opts
        try:
            while True:
                if resume is not None:
                    end, resume = await self._resume_attempt(resume), None
                else:
                    end = await self._run_attempt()
                record.end_attempt(end)
                decision = restart_decision(
                    record.restart_policy,
                    EndedAttempt(state=end.state, cause=end.cause, trigger=record.current.shutdown_trigger),
                    admitting=self._s.admitting(), restart_times=record.restart_times, now=time.monotonic(),
                    restart_window=opts.restart_window, max_restarts=opts.max_restarts)
                if decision is Cause.RESTART_LIMIT:
                    end = AttemptEnd(JobState.FAILED, Cause.RESTART_LIMIT, end.reason, (
                        f"{opts.max_restarts} restarts within restart_window={opts.restart_window}s; "
                        f"last attempt ended with {end.cause.value}: {end.error or ''}").strip())
                if decision is None or decision is Cause.RESTART_LIMIT:
                    self._finish(end)  # recorded first: the eviction below is a GCS call
                # A killed or crashed attempt never left its room; take its participant out
                # (before a restart: the next attempt joins with the same identity).
                await asyncio.to_thread(self._s.evict, record)
                if decision is None or decision is Cause.RESTART_LIMIT:
                    return
                self._restart(end)
        except Exception as err:
            logger.exception("driving job %s failed", record.id, extra={"job_id": record.id})
            current = record.current
            current.disarm_deadline()
            if current.actor is not None:
                current.actor.kill()
            if not record.is_terminal:
                cause = Cause.START_FAILED if current.pid is None else Cause.ACTOR_CRASHED
                self._s.table.transition(record, JobState.FAILED, cause=cause, error=f"{type(err).__name__}: {err}")
                self._s.metrics.ended(JobState.FAILED.value, cause.value)
            await asyncio.to_thread(self._s.evict, record)
        finally:
            self._s.metrics.active_jobs(self._s.table.live_count)

    def _not_started(self) -> AttemptEnd:
        """The end of an attempt shut down before its entrypoint ran: nothing ran."""
        current = self.record.current
        return current.kill_end or AttemptEnd(JobState.SUCCEEDED, current.shutdown_trigger or Cause.USER_SHUTDOWN,
                                              self.record.reason)

    async def _run_attempt(self) -> AttemptEnd:
        """One actor's run of the job, from taking an actor to its outcome, death or kill."""
        record, opts, current = self.record, self.opts, self.record.current
        if current.kill_end is not None:  # killed (deadline passed) before it even had an actor
            return current.kill_end
        if record.state == JobState.PENDING:
            self._s.table.transition(record, JobState.STARTING)
        start = self._s.job_start(record, opts)
        with self._s.start_slots.job_starting():  # the warm pool refills once no job is starting
            taken = await self._take_and_start(start)
        if isinstance(taken, AttemptEnd):
            return taken
        handle, started = taken
        current.pid, current.node_id = started.pid, started.node_id  # its entrypoint runs from here
        if record.state == JobState.STARTING:
            self._s.table.transition(record, JobState.RUNNING)
            self._s.metrics.job_started(time.monotonic() - current.began)
        else:
            self._s.persist(record, None)  # no transition follows: keep pid and node in the snapshot
        return await self._follow_attempt(handle)

    async def _take_and_start(self, start: JobStart) -> tuple[JobActorHandle, Any] | AttemptEnd:
        """Take an actor (a warm one if the pool has one, else a cold one, in turn) and start
        the job on it: the actor and where it runs, or the attempt's end if it could not start."""
        record, opts, current = self.record, self.opts, self.record.current
        claim = (self._s.pools.take(opts.agent_name)
                 if self._s.admitting() and not current.shutdown_requested.is_set() else None)
        pooled = await self._claimed_actor(claim) if claim is not None else None
        while True:
            # A cold start waits for a start slot (a few actors at a time start fast, many at
            # once all start slowly); its initialize_process_timeout runs from its turn.
            cold = pooled is None and not opts.allow_pending
            if cold and not await self._take_start_slot():
                return self._not_started()  # shut down (or killed) while it waited
            try:
                handle = pooled or self._s.new_actor(opts, record.id + (f"-{current.number}" if current.number > 1 else ""))
                current.actor, current.actor_name = handle, handle.name
                self._s.persist(record, None)
                try:
                    if pooled is None and opts.allow_pending:
                        try:
                            await handle.wait_placed(opts.pending_timeout)
                        except asyncio.TimeoutError:
                            handle.kill()
                            return AttemptEnd(JobState.REJECTED, Cause.NO_CAPACITY, error=(
                                f"no node could take the job within pending_timeout={opts.pending_timeout}s"))
                    started = await self._start_unless_shut_down(handle, start)
                    if started is None:  # shut down before its entrypoint ran: nothing to wait for
                        handle.kill()
                        return self._not_started()
                    return handle, started
                except (ActorGone, StartError, asyncio.TimeoutError) as err:
                    lost_node = (isinstance(err, ActorGone) and pooled is None and current.kill_end is None
                                 and await self._death_cause(handle) is Cause.NODE_LOST)
                    handle.kill()
                    if current.kill_end is not None:
                        return current.kill_end
                    if pooled is not None and isinstance(err, ActorGone):
                        pooled = None  # an idle actor that died while waiting: try a cold one
                        continue
                    if lost_node:
                        return AttemptEnd(JobState.FAILED, Cause.NODE_LOST, error=str(err))
                    detail = str(err) or f"did not start within initialize_process_timeout={opts.initialize_process_timeout}s"
                    return AttemptEnd(JobState.FAILED, Cause.START_FAILED, error=detail)
            finally:
                if cold:
                    self._s.start_slots.release()

    async def _claimed_actor(self, claim: "asyncio.Future[JobActorHandle | None]") -> JobActorHandle | None:
        """The warm-pool actor the job took: at once if it was ready, else when its prewarm
        ends. None if that prewarm failed, or if the job is shut down first (the actor then
        goes back to its pool)."""
        if not claim.done():
            await self._unless_shut_down(claim)
        return None if claim.cancelled() else claim.result()

    async def _unless_shut_down(self, step: asyncio.Future[Any]) -> None:
        """Wait for ``step`` unless the attempt is shut down first; then (or if the caller is
        cancelled) ``step`` is cancelled. Returns once ``step`` has settled either way."""
        stop = asyncio.ensure_future(self.record.current.shutdown_requested.wait())
        try:
            await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not step.done():
                step.cancel()
        await asyncio.gather(step, return_exceptions=True)

    async def _start_unless_shut_down(self, handle: JobActorHandle, start: JobStart) -> Any:
        """Start the attempt's actor and its entrypoint, in one message; None if the job is
        shut down before the actor replies. The entrypoint starts only once that reply has
        gone, so until it arrives the job has nothing graceful to wait for, while the start
        may still take ``initialize_process_timeout`` (a slow ``prewarm_fnc``): the caller
        kills the actor at once rather than waiting for it."""
        if self.record.current.shutdown_requested.is_set():
            return None
        starting = asyncio.ensure_future(
            handle.start(start.model_copy(update={"run": True}), self.opts.initialize_process_timeout))
        await self._unless_shut_down(starting)
        return None if starting.cancelled() else starting.result()

    def _shut_down_or_killed(self) -> bool:
        return self.record.state == JobState.SHUTTING_DOWN or self.record.current.kill_end is not None

    async def _take_start_slot(self) -> bool:
        """Wait for a start slot; False (holding none) if the job is shut down or killed first."""
        if self._shut_down_or_killed():
            return False
        slot = asyncio.ensure_future(self._s.start_slots.acquire(job=True))
        await self._unless_shut_down(slot)  # a slot handed over meanwhile is passed on by acquire
        if slot.cancelled():
            return False
        if self._shut_down_or_killed():
            self._s.start_slots.release()
            return False
        return True

    async def _resume_attempt(self, handle: JobActorHandle | ActorGoneMarker) -> AttemptEnd:
        """Take back the attempt a previous supervisor was driving."""
        record, opts, current = self.record, self.opts, self.record.current
        if current.kill_end is not None:  # the previous supervisor ended it (the kill may not have landed)
            if not isinstance(handle, ActorGoneMarker):
                handle.kill()
            return current.kill_end
        if isinstance(handle, ActorGoneMarker):
            return AttemptEnd(JobState.FAILED, await self._death_cause(None),
                              error="the job's actor was gone after a supervisor restart")
        current.actor = handle
        try:
            if current.pid is None:  # its start may not have completed: start is idempotent
                started = await handle.start(self._s.job_start(record, opts), opts.initialize_process_timeout)
                current.pid, current.node_id = started.pid, started.node_id
            handle.run()
            if record.state == JobState.STARTING:
                self._s.table.transition(record, JobState.RUNNING)
            self._s.persist(record, None)
        except (ActorGone, StartError, asyncio.TimeoutError) as err:
            cause = await self._death_cause(handle) if isinstance(err, ActorGone) else None
            handle.kill()
            if current.kill_end is not None:
                return current.kill_end
            if cause is not None:
                return AttemptEnd(JobState.FAILED, cause, error=str(err))
            return AttemptEnd(JobState.FAILED, Cause.START_FAILED, error=str(err) or "did not start after recovery")
        try:
            # Reports sent while no supervisor was there are lost: ask where the job stands.
            described = await handle.describe(opts.control_call_timeout)
            if described.shutting_down and record.state == JobState.RUNNING and described.cause is not None:
                self.begin_shutdown(described.cause, described.reason, error=described.error, notify_actor=False)
            elif not described.shutting_down and record.state == JobState.SHUTTING_DOWN:
                # The request may have been lost with the old process: ask again (idempotent).
                handle.request_shutdown(ShutdownRequest(cause=current.shutdown_trigger or Cause.USER_SHUTDOWN,
                                                        reason=record.reason))
        except ActorGone:
            pass  # the attempt's own wait (below) records it
        except asyncio.TimeoutError:
            logger.warning("recovered job %s did not describe itself; pings and deadlines will judge it", record.id)
        return await self._follow_attempt(handle)

    async def _death_cause(self, handle: JobActorHandle | None, attempt: Attempt | None = None) -> Cause:
        """``node_lost`` when the attempt died with its node, else ``actor_crashed``.

        Call it before killing ``handle``. A call to an actor on a crashed node fails at once,
        but Ray declares the node dead only once its health checks fail: Ray's verdict on the
        actor is awaited (up to ``death_verdict_timeout``). Without one (no handle, or none in
        time) the node's liveness decides. GCS queries run in threads."""
        attempt = attempt or self.record.current
        if handle is not None:
            fate = await handle.fate(self.opts.death_verdict_timeout)
            if fate is not ActorFate.UNDECIDED:
                return Cause.NODE_LOST if fate is ActorFate.DIED_WITH_NODE else Cause.ACTOR_CRASHED
            if attempt.node_id is None:
                attempt.node_id = await asyncio.to_thread(handle.node_id)
        if attempt.node_id is None:
            return Cause.ACTOR_CRASHED
        await self._s.cluster.refresh()  # a fresh read, in a thread (the pools follow a lost node too)
        return Cause.ACTOR_CRASHED if attempt.node_id in self._s.cluster.alive_nodes else Cause.NODE_LOST

    def _died(self, handle: JobActorHandle, error: str) -> AttemptEnd:
        """The running attempt's actor died: its end, recorded at once as ``actor_crashed``
        (``node_lost`` if its node is already known lost), and Ray's verdict, awaited in the
        background, corrects it to ``node_lost`` if the node went with it."""
        current = self.record.current
        provisional = Cause.NODE_LOST if current.node_id in self._s.cluster.lost_nodes else Cause.ACTOR_CRASHED
        supervised_task(self._settle_death_cause(handle, current, provisional), name=f"verdict:{self.record.id}",
                        logger=logger, tasks=self._s.tasks)
        return AttemptEnd(JobState.FAILED, provisional, error=error)

    async def _settle_death_cause(self, handle: JobActorHandle, attempt: Attempt, provisional: Cause) -> None:
        """Wait for Ray's verdict on a dead attempt's actor, then kill it (no restart, whatever
        Ray would do: a kill is a verdict of its own, so it comes after); correct the recorded
        cause if the verdict differs. The restart decision needs no correction: every
        policy decides ``node_lost`` as it decides ``actor_crashed`` (``restart_policy``)."""
        try:
            final = provisional if provisional is Cause.NODE_LOST else await self._death_cause(handle, attempt)
        finally:
            handle.kill()
        if final is provisional:
            return
        record = self.record
        restarted = record.attempt != attempt.number
        if self._s.table.correct_cause(record, attempt.number, final):
            self._s.metrics.cause_corrected(state=JobState.FAILED.value, was=provisional.value, now=final.value,
                                            restarted=restarted)

    async def _follow_attempt(self, handle: JobActorHandle) -> AttemptEnd:
        """From RUNNING to the attempt's end: its outcome, its death, or a supervisor kill."""
        record, current = self.record, self.record.current
        health = supervised_task(self._watch_health(handle), name=f"health:{record.id}",
                                 logger=logger, tasks=self._s.tasks)
        done = asyncio.ensure_future(handle.wait_done())
        killed = asyncio.ensure_future(current.killed.wait())
        try:
            await asyncio.wait({done, killed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            health.cancel()
            killed.cancel()
        if current.kill_end is not None:
            done.cancel()
            return current.kill_end
        try:
            outcome = done.result()
        except ActorGone as err:
            return self._died(handle, str(err))
        current.participant_actors = list(outcome.participant_actors)
        cause = current.shutdown_trigger or outcome.cause
        state = outcome.state
        if cause in ABNORMAL_ENDS and state == JobState.SUCCEEDED:  # a clean shutdown of a sick job
            state = JobState.FAILED
        end = AttemptEnd(state, cause, outcome.reason,
                         outcome.error or (record.reason if state == JobState.FAILED else None))
        self._s.persist(record, end)  # before the kill: a successor must not take it for a crash
        await self._snapshot_written()
        handle.kill()  # detached actors do not go away by themselves
        return end

    def _restart(self, end: AttemptEnd) -> None:
        """Same job id, a new attempt on a new actor: it rejoins its room."""
        record = self.record
        record.restart()
        self._s.metrics.restarted(end.cause.value)
        logger.warning("restarting job %s after %s (restart %d)", record.id, end.cause.value, record.restarts,
                       extra={"job_id": record.id, "room": record.spec.room, "cause": end.cause.value})
        self._s.table.transition(record, JobState.STARTING, reason=f"restart after {end.cause.value}")

    def _finish(self, end: AttemptEnd) -> None:
        record, current = self.record, self.record.current
        if record.is_terminal:
            return
        if end.state == JobState.SUCCEEDED and record.state != JobState.SHUTTING_DOWN:
            self._s.table.transition(record, JobState.SHUTTING_DOWN, cause=end.cause, reason=end.reason)
        self._s.table.transition(record, end.state, cause=end.cause, error=end.error)
        self._s.metrics.ended(end.state.value, end.cause.value)
        if current.shutdown_began is not None:
            self._s.metrics.job_shut_down(time.monotonic() - current.shutdown_began)

    # -- shutdown, deadline, health -------------------------------------------------------

    def begin_shutdown(self, cause: Cause, reason: str, *, error: str | None = None, notify_actor: bool) -> None:
        """Record SHUTTING_DOWN with its deadline, tell the actor, and arm the kill timer."""
        record, current = self.record, self.record.current
        if record.state not in LIVE_BEFORE_SHUTDOWN:
            return
        if self._s.withdraw_offer(record, cause, reason):
            current.shutdown_trigger = cause
            return  # offered to LiveKit, never assigned: nothing runs, so nothing to shut down
        current.begin_shutdown(cause, record.shutdown_budget)
        self._s.table.transition(record, JobState.SHUTTING_DOWN, cause=cause, reason=reason, error=error)
        if notify_actor and current.actor is not None:
            current.actor.request_shutdown(ShutdownRequest(cause=cause, reason=reason))
        self.arm_deadline()

    def arm_deadline(self) -> None:
        current = self.record.current
        current.disarm_deadline()
        current.deadline_task = supervised_task(self._enforce_deadline(), name=f"deadline:{self.record.id}",
                                                logger=logger, tasks=self._s.tasks)

    async def _enforce_deadline(self) -> None:
        """Kill the attempt's actor when its graceful budget is spent, whatever its code does."""
        record, current = self.record, self.record.current
        while record.current is current and current.deadline is not None and not record.is_terminal:
            remaining = current.deadline - time.monotonic()
            if remaining <= 0:
                self.kill_attempt(Cause.SHUTDOWN_TIMEOUT, (
                    f"shutdown did not complete within shutdown_process_timeout={record.shutdown_budget}s; "
                    "the job's actor was killed"))
                return
            await asyncio.sleep(remaining)

    async def _watch_health(self, handle: JobActorHandle) -> None:
        """Ping every ``ping_interval``; no answer within ``ping_timeout`` kills the attempt."""
        record, current, opts = self.record, self.record.current, self.opts

        def watched() -> bool:
            return record.current is current and current.actor is handle and record.state == JobState.RUNNING

        while watched():
            await asyncio.sleep(opts.ping_interval * random.uniform(1 - PING_JITTER, 1 + PING_JITTER))
            if not watched():
                return
            try:
                await handle.ping(opts.ping_timeout)
            except asyncio.TimeoutError:
                if watched():
                    self.kill_attempt(Cause.UNRESPONSIVE, f"no answer to a ping within ping_timeout={opts.ping_timeout}s")
                return
            except ActorGone:
                return  # the attempt's own wait notices

    def kill_attempt(self, cause: Cause, error: str) -> None:
        """Kill the current attempt's actor (its children die with it) and end the attempt."""
        record, current = self.record, self.record.current
        if current.kill_end is not None or record.is_terminal:
            return
        end = AttemptEnd(JobState.KILLED, cause, record.reason, error)
        current.kill_end = end
        self._s.persist(record, end)  # before the kill: a successor must not take it for a crash
        if current.actor is not None:
            supervised_task(self._kill_once_written(current.actor), name=f"kill:{record.id}", logger=logger,
                            tasks=self._s.tasks)
        self._s.metrics.killed(cause.value)
        current.end_by_kill(end)

    async def _kill_once_written(self, actor: JobActorHandle) -> None:
        try:
            await self._snapshot_written()
        finally:
            actor.kill()

    async def _snapshot_written(self) -> None:
        """Wait (up to ``snapshot_before_kill_timeout``) until the snapshots persisted so far are written."""
        try:
            await asyncio.wait_for(self._s.flush(), self.opts.snapshot_before_kill_timeout)
        except asyncio.TimeoutError:
            logger.warning("job %s: its snapshot is not written yet; killing its actor anyway", self.record.id)

    # -- what the job's actor reports -----------------------------------------------------

    def shutdown_started(self, report: ShutdownStarted) -> None:
        """The job began shutting down on its own: start its deadline."""
        if self.record.attempt == report.attempt:
            self.begin_shutdown(report.cause, report.reason, error=report.error, notify_actor=False)

    def participants_changed(self, report: ParticipantsChanged) -> None:
        record, current = self.record, self.record.current
        if not record.is_terminal and record.attempt == report.attempt and report.version > current.participants_version:
            current.participants_version = report.version
            current.participants = list(report.identities)
            current.participant_actors = list(report.actors)
            self._s.persist(record, None)

    def memory(self, report: MemoryReport) -> None:
        """Warn above ``job_memory_warn_mb``; above ``job_memory_limit_mb`` shut the job down,
        and kill it at once if it is already shutting down for that and still growing."""
        record, current, opts = self.record, self.record.current, self.opts
        if record.attempt != report.attempt or record.state not in (JobState.RUNNING, JobState.SHUTTING_DOWN):
            return
        previous, current.rss_mb = current.rss_mb, report.rss_mb
        limit, warn = opts.job_memory_limit_mb, opts.job_memory_warn_mb
        if limit and report.rss_mb > limit:
            text = f"resident memory {report.rss_mb:.0f} MiB is over job_memory_limit_mb={limit:g}"
            if record.state == JobState.RUNNING:
                self.begin_shutdown(Cause.MEMORY_LIMIT, text, notify_actor=True)
            elif previous is not None and report.rss_mb > previous:  # shutting down, yet still growing
                self.kill_attempt(Cause.MEMORY_LIMIT, text + " and still growing during shutdown")
        elif warn and report.rss_mb > warn and time.monotonic() - current.last_memory_warning >= opts.memory_warn_interval:
            warned_at = current.rss_mb_at_last_warning
            current.last_memory_warning, current.rss_mb_at_last_warning = time.monotonic(), report.rss_mb
            growth = f"{report.rss_mb - warned_at:+.0f} MiB since the last warning" if warned_at is not None else "first warning"
            logger.warning("job %s uses %.0f MiB (job_memory_warn_mb=%g; %s)", record.id, report.rss_mb, warn, growth,
                           extra={"job_id": record.id, "room": record.spec.room, "rss_mb": round(report.rss_mb, 1)})


class JobDrivers:
    """The driver of every job not yet ended (a job gets one when it is admitted)."""

    def __init__(self, services: DriverServices) -> None:
        self.services = services
        self._drivers: dict[str, JobDriver] = {}

    def add(self, record: JobRecord, opts: WorkerOptions) -> JobDriver:
        driver = self._drivers[record.id] = JobDriver(record, opts, self.services)
        return driver

    def get(self, job_id: str) -> JobDriver | None:
        return self._drivers.get(job_id)

    def job_changed(self, record: JobRecord) -> None:
        """Called on every transition: an ended job's driver is let go."""
        if record.is_terminal:
            self._drivers.pop(record.id, None)

    def live(self) -> list[JobDriver]:
        return [d for d in self._drivers.values() if not d.record.is_terminal]

    def begin_shutdown(self, record: JobRecord, cause: Cause, reason: str) -> None:
        """The shutdown protocol for ``record`` (nothing for a job already ended)."""
        driver = self._drivers.get(record.id)
        if driver is not None:
            driver.begin_shutdown(cause, reason, notify_actor=True)

    def drain_later(self, records: list[JobRecord], timeout: float) -> None:
        """Give ``records`` ``timeout`` seconds to end on their own, then shut every live job
        down (cause ``drained``); in a supervised task."""
        supervised_task(self._drain(records, timeout), name="drain", logger=logger, tasks=self.services.tasks)

    async def _drain(self, records: list[JobRecord], timeout: float) -> None:
        await wait_ended(records, timeout)
        for record in self.services.table.live():
            self.begin_shutdown(record, Cause.DRAINED, f"drain deadline ({timeout}s) reached")
