"""The supervisor's job table: one record per job, changed only through ``transition``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..messages import TERMINAL_STATES, AttemptInfo, Cause, JobInfo, JobSpec, JobState, RestartPolicy, Transition, now
from .attempt import Attempt, AttemptEnd

logger = logging.getLogger("rayvisor.supervisor")

ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.STARTING, JobState.SHUTTING_DOWN, JobState.REJECTED, JobState.FAILED}),
    # X -> STARTING is a restart (a new attempt on a new actor).
    # STARTING -> REJECTED: a pending job no node took within pending_timeout (no_capacity).
    JobState.STARTING: frozenset({JobState.STARTING, JobState.RUNNING, JobState.SHUTTING_DOWN, JobState.FAILED,
                                  JobState.KILLED, JobState.REJECTED}),
    JobState.RUNNING: frozenset({JobState.STARTING, JobState.SHUTTING_DOWN, JobState.FAILED, JobState.KILLED}),
    # SHUTTING_DOWN -> REJECTED: shut down while request_fnc was still deciding, then rejected.
    JobState.SHUTTING_DOWN: frozenset({JobState.STARTING, JobState.SUCCEEDED, JobState.FAILED, JobState.KILLED,
                                       JobState.REJECTED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.KILLED: frozenset(),
    JobState.REJECTED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug: the supervisor tried a transition the state machine forbids."""


@dataclass
class JobRecord:
    """The supervisor's mutable view of one job: what outlives its attempts, and the
    current ``Attempt``."""

    id: str
    spec: JobSpec
    agent_name: str
    shutdown_budget: float
    """The agent's ``shutdown_process_timeout`` when the job was admitted."""
    state: JobState = JobState.PENDING
    cause: Cause | None = None
    reason: str = ""
    error: str | None = None
    restarts: int = 0
    timestamps: dict[str, float] = field(default_factory=dict)
    restart_policy: RestartPolicy = RestartPolicy.TEMPORARY
    attempts: list[AttemptInfo] = field(default_factory=list)
    """The ended attempts."""
    current: Attempt = field(default_factory=Attempt)
    restart_times: deque[float] = field(default_factory=deque)
    agent_identity: str = ""
    agent_participant_name: str = ""
    agent_attributes: dict[str, str] = field(default_factory=dict)
    agent_metadata: str = ""
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def identity(self) -> str:
        """The job's participant identity in its room."""
        return self.agent_identity or f"agent-{self.id}"

    @property
    def attempt(self) -> int:
        return self.current.number

    def end_attempt(self, end: AttemptEnd) -> None:
        """Add the current attempt, ended with ``end``, to the history."""
        self.current.disarm_deadline()
        self.attempts.append(self.current.info(end))

    def restart(self) -> Attempt:
        """Begin the next attempt (the caller records the STARTING transition)."""
        self.restarts += 1
        self.restart_times.append(time.monotonic())
        self.current = self.current.next()
        self.cause, self.reason, self.error = None, "", None
        return self.current

    def info(self, *, with_metadata: bool = True) -> JobInfo:
        current = self.current
        return JobInfo(
            id=self.id, state=self.state, room=self.spec.room, agent_name=self.agent_name,
            metadata=self.spec.metadata if with_metadata else "", cause=self.cause, reason=self.reason, error=self.error,
            pid=current.pid, node_id=current.node_id, restarts=self.restarts, attempts=list(self.attempts),
            participants=list(current.participants), participant_actors=list(current.participant_actors),
            timestamps=dict(self.timestamps),
        )


class JobTable:
    """All jobs, a bounded history of finished ones, and the stream of transitions."""

    MAX_EVENTS_PER_REPLY = 1_000
    """Transitions returned by one ``events_after`` call; callers page with ``after_seq``."""

    def __init__(self, *, finished_job_history: int, event_history: int,
                 on_change: Callable[[JobRecord], None] = lambda record: None,
                 on_evict: Callable[[str], None] = lambda job_id: None) -> None:
        self._on_change = on_change
        self._on_evict = on_evict
        self._jobs: dict[str, JobRecord] = {}
        self._live: dict[str, JobRecord] = {}
        """The records not yet terminal (admission reads them on every decision)."""
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._finished_limit = finished_job_history
        self._events: deque[Transition] = deque(maxlen=event_history)
        self._seq = itertools.count()
        self._new_event = asyncio.Event()
        self.version = 0
        """Counts every change of a job's state (admission caches what it derives from them)."""

    def add(self, record: JobRecord) -> None:
        self.version += 1
        self._jobs[record.id] = record
        self._live[record.id] = record
        record.timestamps[record.state.value] = now()
        self._log(record)
        self._record_event(record)
        self._on_change(record)

    def restore(self, record: JobRecord) -> None:
        """Put back a record a previous supervisor wrote (no transition is recorded)."""
        self.version += 1
        self._jobs[record.id] = record
        if not record.is_terminal:
            self._live[record.id] = record
        else:
            record.finished.set()
            self._finished[record.id] = None
            while len(self._finished) > self._finished_limit:  # restored oldest first
                old_id, _ = self._finished.popitem(last=False)
                self._jobs.pop(old_id, None)
                self._on_evict(old_id)

    def get(self, job_id: str) -> JobRecord | None:
        return self._jobs.get(job_id)

    def all(self) -> list[JobRecord]:
        return list(self._jobs.values())

    def live(self) -> list[JobRecord]:
        return list(self._live.values())

    @property
    def live_count(self) -> int:
        return len(self._live)

    def transition(self, record: JobRecord, state: JobState, *, cause: Cause | None = None,
                   reason: str | None = None, error: str | None = None) -> None:
        """Move ``record`` to ``state``: the only place a job's state changes."""
        if state not in ALLOWED_TRANSITIONS[record.state]:
            raise IllegalTransition(f"job {record.id}: {record.state.value} -> {state.value}")
        record.state = state
        self.version += 1
        if cause is not None:
            record.cause = cause
        if reason:
            record.reason = reason
        if error:
            record.error = error
        record.timestamps[state.value] = now()
        self._log(record)
        self._record_event(record)
        if record.is_terminal:
            self._live.pop(record.id, None)
            record.current.disarm_deadline()
            record.finished.set()
            self._finished[record.id] = None
            while len(self._finished) > self._finished_limit:
                old_id, _ = self._finished.popitem(last=False)
                self._jobs.pop(old_id, None)
                self._on_evict(old_id)
        self._on_change(record)

    def correct_cause(self, record: JobRecord, attempt: int, cause: Cause) -> bool:
        """Ray's late verdict on how attempt ``attempt`` ended (``node_lost`` where it was first
        recorded ``actor_crashed``): its history entry says so, and so does the job's own
        cause if that attempt was its last. Recorded as an event of the same state. False if
        the record is no longer in the table or has no such attempt."""
        if self._jobs.get(record.id) is not record:
            return False
        for index, info in enumerate(record.attempts):
            if info.attempt == attempt:
                record.attempts[index] = info.model_copy(update={"cause": cause})
                break
        else:
            return False
        logger.info("job %s: attempt %d ended with %s, by Ray's verdict", record.id, attempt, cause.value,
                    extra={"job_id": record.id, "room": record.spec.room, "cause": cause.value})
        if record.is_terminal and record.attempt == attempt:  # the job's own end: watchers see it change
            record.cause = cause
            self._record_event(record)
        self._on_change(record)
        return True

    @staticmethod
    def _log(record: JobRecord) -> None:
        """One structured log record per transition (admission included)."""
        state = record.state
        log = logger.warning if state in (JobState.FAILED, JobState.KILLED, JobState.REJECTED) else logger.info
        log("job %s %s", record.id, state.value, extra={
            "job_id": record.id, "room": record.spec.room, "state": state.value,
            "cause": record.cause.value if record.cause else None, "node_id": record.current.node_id,
        })

    def _record_event(self, record: JobRecord) -> None:
        self._events.append(Transition(
            seq=next(self._seq), job_id=record.id, state=record.state, room=record.spec.room,
            at=record.timestamps[record.state.value], cause=record.cause, reason=record.reason,
            error=record.error, node_id=record.current.node_id, pid=record.current.pid,
        ))
        self._new_event.set()
        self._new_event = asyncio.Event()

    async def events_after(self, seq: int, timeout: float) -> list[Transition]:
        """Transitions after ``seq``; waits up to ``timeout`` for the next one if there are none."""
        events = [e for e in self._events if e.seq > seq]
        if events:
            return events[: self.MAX_EVENTS_PER_REPLY]
        if timeout > 0:
            try:
                await asyncio.wait_for(self._new_event.wait(), timeout)
            except asyncio.TimeoutError:
                return []
            events = [e for e in self._events if e.seq > seq]
        return events[: self.MAX_EVENTS_PER_REPLY]


async def wait_ended(records: list[JobRecord], timeout: float | None) -> bool:
    """Wait until every record has ended, up to ``timeout`` seconds (None: no limit);
    whether they all did."""
    waits = [asyncio.ensure_future(r.finished.wait()) for r in records if not r.is_terminal]
    if not waits:
        return True
    _done, pending = await asyncio.wait(waits, timeout=timeout)
    for future in pending:
        future.cancel()
    return not pending
