"""Inside the job actor: one child per (participant session, participant entrypoint).

``ParticipantManager`` starts a child for every participant of a wanted kind (already in
the room or joining later), forwards it the events that concern its participant, pings
it (a child whose event loop is blocked is killed, as if it had crashed), stops it when the
participant leaves or the job ends, records how each ended, and restarts the ones that
crashed or raised when ``participant_restart`` is ``transient``. Every Ray call on a child
actor goes through its ``ParticipantActorHandle``.

A child is a ``ParticipantActor`` (``isolate_participants=True``) or, as in LiveKit Agents,
a task in the job's own process. A participant who leaves and comes back starts a new
session: its old child finishes stopping on its own while a new one starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from ..agents.job import JobContext, ParticipantEntrypoint
from ..agents.options import RestartPolicy, WorkerOptions
from ..aio import supervised_task
from ..messages import JobStart, ParticipantActorInfo, ParticipantActorState, ParticipantCause
from ..rooms.records import EventDelivery, RoomEvent, RoomEventType, RoomSnapshot
from .lifecycle import cancel_and_wait, describe_exception
from .participant_handle import (
    ParticipantActorGone,
    ParticipantActorHandle,
    ParticipantStartError,
    ParticipantUnresponsive,
)
from .records import ParticipantOutcome, ParticipantStart, ParticipantStop

logger = logging.getLogger("rayvisor.participants")

ENDED = frozenset({ParticipantActorState.STOPPED, ParticipantActorState.FAILED, ParticipantActorState.KILLED})
LIVE = frozenset({ParticipantActorState.STARTING, ParticipantActorState.RUNNING})
ABNORMAL = frozenset({ParticipantCause.ACTOR_CRASHED, ParticipantCause.ENTRYPOINT_ERROR,
                      ParticipantCause.UNRESPONSIVE})
FORWARDED = frozenset({
    RoomEventType.PARTICIPANT_ATTRIBUTES_CHANGED, RoomEventType.PARTICIPANT_METADATA_CHANGED,
    RoomEventType.DATA_RECEIVED, RoomEventType.TEXT_RECEIVED, RoomEventType.PARTICIPANT_DISCONNECTED,
})
"""Events a participant's child receives: those about (or sent by) its participant."""
CHILDREN_SHARE_OF_JOB_BUDGET = 0.5
"""During a job's shutdown, children get at most this share of the job's budget (and at most
``participant_shutdown_timeout``), so the job's own callbacks still have time to run."""
PING_JITTER = 0.1
"""Liveness pings are spread by +-10% of ``participant_ping_interval`` so a job's children
are not pinged in lockstep."""

_Key = tuple[str, int, int]  # (identity, session, entrypoint index)


@dataclass
class _Child:
    identity: str
    session: int
    entry: ParticipantEntrypoint
    state: ParticipantActorState = ParticipantActorState.STARTING
    pid: int | None = None
    node_id: str | None = None
    restarts: int = 0
    restart_times: deque[float] = field(default_factory=deque)
    cause: ParticipantCause | None = None
    error: str | None = None
    handle: ParticipantActorHandle | None = None
    """The running attempt's child actor (isolated mode)."""
    task: asyncio.Task[Any] | None = None
    """The running attempt's task (in-process mode)."""
    pending: list[RoomEvent] | None = field(default_factory=list)
    """Events held until the running attempt's actor has started (None: deliver at once)."""
    deliveries: int = 0
    stop_cause: ParticipantCause | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    attempt_done: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def info(self) -> ParticipantActorInfo:
        return ParticipantActorInfo(
            identity=self.identity, entrypoint=self.entry.name, state=self.state, pid=self.pid,
            node_id=self.node_id, restarts=self.restarts, cause=self.cause, error=self.error,
        )


class ParticipantManager:
    """See the module docstring. Driven by the job runner's room and context hooks."""

    def __init__(self, *, ctx: JobContext, opts: WorkerOptions, start: JobStart,
                 job_actor: Callable[[], Any], on_change: Callable[[], None]) -> None:
        self._ctx = ctx
        self._opts = opts
        self._start = start
        self._job_actor = job_actor
        self._on_change = on_change
        self._children: dict[_Key, _Child] = {}
        self._sessions: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._stops: list[asyncio.Task[Any]] = []

    # -- hooks ----------------------------------------------------------------------

    def on_entrypoint(self, entry: ParticipantEntrypoint) -> None:
        """A new entrypoint: start it for everyone already in the room."""
        if self._ctx._room.isconnected():
            for identity in list(self._ctx._room.remote_participants):
                self._ensure(identity, entry)

    def on_connected(self) -> None:
        for identity in list(self._ctx._room.remote_participants):
            for entry in self._ctx.participant_entrypoints:
                self._ensure(identity, entry)

    def on_record(self, event: RoomEvent) -> None:
        """Every room event, after the job's facade applied it."""
        identity = event.participant.identity if event.participant else None
        if identity is None:
            return
        if event.type == RoomEventType.PARTICIPANT_CONNECTED:
            self._sessions[identity] = self._sessions.get(identity, 0) + 1
            for entry in self._ctx.participant_entrypoints:
                self._ensure(identity, entry)
            return
        current = [c for c in self._children.values()
                   if c.identity == identity and c.session == self._sessions.get(identity, 0)]
        if event.type in FORWARDED:
            for child in current:
                if child.state in LIVE:
                    self._deliver(child, event)
        if event.type == RoomEventType.PARTICIPANT_DISCONNECTED:
            for child in current:
                self._spawn(self._stop(child, ParticipantCause.PARTICIPANT_LEFT, "participant left",
                                       self._opts.participant_shutdown_timeout), f"participant-stop:{identity}")

    def infos(self) -> list[ParticipantActorInfo]:
        return [child.info() for child in self._children.values()]

    def begin_stop_all(self, job_budget: float) -> None:
        """The job is shutting down: start no more children and ask every child to stop now."""
        if self._stopping:
            return
        self._stopping = True
        budget = min(self._opts.participant_shutdown_timeout, job_budget * CHILDREN_SHARE_OF_JOB_BUDGET)
        self._stops = [self._spawn(self._stop(child, ParticipantCause.JOB_ENDED, "job ended", budget), "stop-all")
                       for child in self._children.values() if child.state not in ENDED]

    async def wait_stopped(self) -> None:
        """Until every child stopped (or was killed at its budget)."""
        if self._stops:
            await asyncio.gather(*self._stops, return_exceptions=True)

    # -- children ---------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        return supervised_task(coro, name=name, logger=logger, tasks=self._tasks)

    def _ensure(self, identity: str, entry: ParticipantEntrypoint) -> None:
        participant = self._ctx._room.remote_participants.get(identity)
        if self._stopping or participant is None or not entry.wants(participant):
            return
        key = (identity, self._sessions.get(identity, 0), entry.index)
        if key in self._children:
            return
        # Keep the newest ended child per (identity, entrypoint) for status; drop older ones.
        for old_key, old in list(self._children.items()):
            if old_key[0] == identity and old_key[2] == entry.index and old.state in ENDED:
                del self._children[old_key]
        child = self._children[key] = _Child(identity=identity, session=key[1], entry=entry)
        self._spawn(self._drive(child), f"participant:{identity}")

    async def _drive(self, child: _Child) -> None:
        """Run attempts until the child ends normally or may not be restarted."""
        try:
            while True:
                child.attempt_done = asyncio.Event()
                try:
                    if self._opts.isolate_participants:
                        await self._run_actor(child)
                    else:
                        await self._run_task(child)
                except Exception as err:  # never leave a child half-started or unreachable
                    logger.exception("participant attempt for %s failed", child.identity)
                    if child.handle is not None:
                        child.handle.kill()
                    cause = ParticipantCause.ACTOR_CRASHED if child.pid else ParticipantCause.START_FAILED
                    self._end(child, ParticipantActorState.FAILED, cause, f"{type(err).__name__}: {err}")
                finally:
                    child.attempt_done.set()
                restart = self._may_restart(child)
                self._changed()
                if not restart:
                    return
                child.restarts += 1
                child.restart_times.append(time.monotonic())
                child.state, child.cause, child.pid, child.handle = ParticipantActorState.STARTING, None, None, None
                child.pending, child.deliveries = [], 0  # a new actor counts deliveries from 1
                logger.warning("restarting participant entrypoint %s for %s (restart %d)",
                               child.entry.name, child.identity, child.restarts)
        finally:
            child.finished.set()

    def _present(self, child: _Child) -> bool:
        return (child.identity in self._ctx._room.remote_participants
                and self._sessions.get(child.identity, 0) == child.session)

    def _may_restart(self, child: _Child) -> bool:
        if (self._stopping or child.stop_cause is not None or child.cause not in ABNORMAL
                or self._opts.participant_restart != RestartPolicy.TRANSIENT or not self._present(child)):
            return False
        window_start = time.monotonic() - self._opts.restart_window
        while child.restart_times and child.restart_times[0] < window_start:
            child.restart_times.popleft()
        if len(child.restart_times) >= self._opts.max_restarts:
            child.error = (child.error or "") + (
                f"\nnot restarted: {self._opts.max_restarts} restarts within {self._opts.restart_window}s")
            return False
        return True

    async def _run_actor(self, child: _Child) -> None:
        info = self._ctx._room._participant_info(child.identity)
        if info is None or not self._present(child):  # joined and left before we got here
            self._end(child, ParticipantActorState.STOPPED, ParticipantCause.PARTICIPANT_LEFT, None)
            return
        room = self._ctx._room
        start = ParticipantStart(
            job_id=self._start.job_id, room=self._start.room, metadata=self._start.metadata,
            agent_name=self._start.agent_name, dispatch_id=self._start.dispatch_id, worker_id=self._start.worker_id,
            snapshot=RoomSnapshot(room=room.name, metadata=room.metadata, connection_id="",
                                  local=room._local_info, participants=[info]),
            url=self._start.url, api_token=self._start.api_token, namespace=self._ctx._namespace,
            livekit_agents_context=bool(self._opts.livekit_agents_context),
        )
        try:
            handle = ParticipantActorHandle.create(
                fnc=child.entry.fnc, job_actor=self._job_actor(), call_timeout=self._opts.control_call_timeout,
                poll_timeout=self._opts.room_poll_timeout, name=f"{child.entry.name} for {child.identity}")
        except Exception as err:  # e.g. an entrypoint that cannot be pickled (it closes over the JobContext)
            self._end(child, ParticipantActorState.FAILED, ParticipantCause.START_FAILED,
                      f"cannot ship {child.entry.name} to a participant actor (define it at module level, "
                      f"or set isolate_participants=False): {type(err).__name__}: {err}")
            return
        child.handle = handle
        if child.stop_requested.is_set():  # stopped (and ended) while we were creating it
            handle.kill()
            return
        self._changed()
        timeout = self._opts.initialize_process_timeout
        try:
            started = await handle.start(start, timeout)
        except (ParticipantActorGone, ParticipantStartError, asyncio.TimeoutError) as err:
            handle.kill()
            self._end(child, ParticipantActorState.FAILED, ParticipantCause.START_FAILED,
                      str(err) or f"did not start within initialize_process_timeout={timeout:g}s")
            return
        if child.state in ENDED:  # stopped while it started: its entrypoint must not run
            handle.kill()
            return
        child.pid, child.node_id = started.pid, started.node_id
        held, child.pending = child.pending or [], None
        for event in held:  # what happened while it started, before its entrypoint runs
            self._deliver(child, event)
        handle.run()
        if child.state == ParticipantActorState.STARTING:
            child.state = ParticipantActorState.RUNNING
        self._changed()
        try:
            outcome = await self._wait_outcome(child, handle)
        except ParticipantActorGone as err:
            handle.kill()
            first_line = (str(err).strip().splitlines() or ["the actor died"])[0]
            self._end(child, ParticipantActorState.FAILED, ParticipantCause.ACTOR_CRASHED,
                      f"{first_line} (pid {child.pid})")
            return
        except ParticipantUnresponsive as err:  # a blocked loop: killed, and restarted as a crash would be
            handle.kill()
            self._end(child, ParticipantActorState.FAILED, ParticipantCause.UNRESPONSIVE, str(err))
            return
        handle.kill()
        self._end(child, outcome.state, child.stop_cause or outcome.cause, outcome.error)

    async def _wait_outcome(self, child: _Child, handle: ParticipantActorHandle) -> ParticipantOutcome:
        """The child's outcome, watched by liveness pings meanwhile: raises
        ``ParticipantActorGone`` if it dies, ``ParticipantUnresponsive`` if a ping goes unanswered."""
        outcome = asyncio.ensure_future(handle.wait_done())
        liveness = asyncio.ensure_future(self._watch_liveness(child, handle))
        try:
            await asyncio.wait({outcome, liveness}, return_when=asyncio.FIRST_COMPLETED)
            if not outcome.done():
                liveness.result()  # raises ParticipantUnresponsive (or, a bug, what the watch raised)
            return await outcome
        finally:
            liveness.cancel()
            outcome.cancel()

    async def _watch_liveness(self, child: _Child, handle: ParticipantActorHandle) -> None:
        """Ping the running child every ``participant_ping_interval``; raise
        ``ParticipantUnresponsive`` when one goes unanswered for ``participant_ping_timeout``.

        Returns (and pings no more) once the child stops running: a stopping child is bounded
        by its stop budget instead, and a dead one is reported by its ``wait_done``.
        """
        interval, timeout = self._opts.participant_ping_interval, self._opts.participant_ping_timeout
        while True:
            await asyncio.sleep(interval * random.uniform(1 - PING_JITTER, 1 + PING_JITTER))
            if child.state != ParticipantActorState.RUNNING or child.handle is not handle:
                return
            try:
                await handle.ping(timeout)
            except asyncio.TimeoutError:
                if child.state != ParticipantActorState.RUNNING or child.handle is not handle:
                    return
                logger.warning("participant actor for %s did not answer a ping within %gs: killing it",
                               child.identity, timeout, extra={"participant": child.identity})
                raise ParticipantUnresponsive(
                    f"no answer to a liveness ping within participant_ping_timeout={timeout:g}s: its event "
                    f"loop is blocked (pid {child.pid}); the actor was killed") from None
            except ParticipantActorGone:
                return

    async def _run_task(self, child: _Child) -> None:
        participant = self._ctx._room.remote_participants.get(child.identity)
        if participant is None or not self._present(child):
            self._end(child, ParticipantActorState.STOPPED, ParticipantCause.PARTICIPANT_LEFT, None)
            return
        child.pid, child.node_id = os.getpid(), ray.get_runtime_context().get_node_id()
        child.state = ParticipantActorState.RUNNING
        child.task = asyncio.get_running_loop().create_task(
            child.entry.fnc(self._ctx, self._ctx._as_seen_by_user(participant)), context=self._ctx._task_context())
        self._changed()
        try:
            await asyncio.shield(child.task)
        except asyncio.CancelledError:
            if not child.task.cancelled():
                raise
        except Exception as err:
            self._end(child, ParticipantActorState.FAILED, ParticipantCause.ENTRYPOINT_ERROR, describe_exception(err))
            return
        # Returned (its handlers may still be live) or cancelled by _stop: it ends when stopped.
        await child.stop_requested.wait()
        self._end(child, ParticipantActorState.STOPPED, child.stop_cause or ParticipantCause.JOB_ENDED, None)

    def _deliver(self, child: _Child, event: RoomEvent) -> None:
        if not self._opts.isolate_participants:
            return  # in-process children share the job's own room facade
        if child.pending is not None:
            child.pending.append(event)
            return
        assert child.handle is not None
        child.deliveries += 1  # fire-and-forget: a child with a blocked loop just queues them
        child.handle.deliver(EventDelivery(index=child.deliveries, events=[event]))

    async def _stop(self, child: _Child, cause: ParticipantCause, reason: str, timeout: float) -> None:
        """Ask the child to stop; kill it if it has not finished within ``timeout``."""
        if child.state in ENDED and child.finished.is_set():
            return
        never_ran = child.pid is None and child.task is None and child.state not in ENDED
        child.stop_cause = child.stop_cause or cause
        child.stop_requested.set()
        if never_ran:  # its entrypoint has not run (``run`` follows ``start``): nothing to wait for
            if child.handle is not None:
                child.handle.kill()
            self._end(child, ParticipantActorState.STOPPED, child.stop_cause, None)
            return
        if child.state not in ENDED:
            child.state = ParticipantActorState.STOPPING
            self._changed()
        if child.handle is not None:
            child.handle.request_stop(ParticipantStop(cause=cause, reason=reason))
        elif child.task is not None:
            self._spawn(cancel_and_wait(child.task, logger), "participant-cancel")
        try:
            await asyncio.wait_for(child.finished.wait(), timeout)
        except asyncio.TimeoutError:
            if child.handle is not None:
                child.handle.kill()
            self._end(child, ParticipantActorState.KILLED, ParticipantCause.SHUTDOWN_TIMEOUT,
                      f"did not stop within {timeout:.3g}s")

    def _end(self, child: _Child, state: ParticipantActorState, cause: ParticipantCause, error: str | None) -> None:
        if child.state in ENDED:
            return
        child.state, child.cause = state, cause
        child.error = error or child.error
        level = logging.WARNING if state != ParticipantActorState.STOPPED else logging.INFO
        logger.log(level, "participant actor for %s %s (%s)", child.identity, state.value, cause.value,
                   extra={"participant": child.identity, "cause": cause.value})
        self._changed()

    def _changed(self) -> None:
        self._on_change()
