"""One attempt of a job: one actor's run of it, from taking an actor to its end.

A restart makes a new ``Attempt``; nothing of the previous one is carried over or reset
by hand. The job's record keeps what outlives attempts (its spec, state, history).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..messages import AttemptInfo, Cause, JobState, ParticipantActorInfo, now


@dataclass(frozen=True)
class AttemptEnd:
    """How one attempt (one actor) of a job ended."""

    state: JobState
    cause: Cause
    reason: str = ""
    error: str | None = None


@dataclass
class Attempt:
    """The state of one attempt. ``actor`` is its ``JobActorHandle`` once it has one."""

    number: int = 1
    began: float = field(default_factory=time.monotonic)
    """When the attempt began (admission, or the restart), for the start-latency metric."""
    began_at: float = field(default_factory=now)
    """The same moment, wall clock, for the attempt's ``AttemptInfo``."""
    actor: Any = None
    actor_name: str | None = None
    pid: int | None = None
    node_id: str | None = None
    shutdown_trigger: Cause | None = None
    """What started this attempt's shutdown (the job's ``cause`` may later say shutdown_timeout)."""
    shutdown_began: float | None = None
    deadline: float | None = None
    """Monotonic time at which the attempt's actor is killed (set once it shuts down)."""
    deadline_task: asyncio.Task[Any] | None = None
    """The task that enforces ``deadline``; cancelled when the attempt ends first."""
    kill_end: AttemptEnd | None = None
    """The attempt's end when the supervisor kills its actor (deadline, unresponsive,
    memory), or after a failover the end its predecessor decided and snapshotted."""
    killed: asyncio.Event = field(default_factory=asyncio.Event)
    shutdown_requested: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the attempt is asked to shut down (a job still waiting to start gives up)."""
    participants: list[str] = field(default_factory=list)
    participant_actors: list[ParticipantActorInfo] = field(default_factory=list)
    participants_version: int = 0
    rss_mb: float | None = None
    last_memory_warning: float = 0.0
    rss_mb_at_last_warning: float | None = None

    def next(self) -> "Attempt":
        """The attempt that follows this one (a restart)."""
        self.disarm_deadline()
        return Attempt(number=self.number + 1)

    def begin_shutdown(self, trigger: Cause, budget: float) -> None:
        """Record the shutdown's trigger and deadline (the caller arms the timer)."""
        self.shutdown_trigger, self.shutdown_began = trigger, time.monotonic()
        self.deadline = self.shutdown_began + budget
        self.shutdown_requested.set()

    def end_by_kill(self, end: AttemptEnd) -> None:
        """The supervisor decided this attempt's end and kills its actor."""
        self.kill_end = end
        self.killed.set()

    def disarm_deadline(self) -> None:
        """The attempt ended before its deadline: its timer must not outlive it."""
        if self.deadline_task is not None:
            self.deadline_task.cancel()
            self.deadline_task = None

    def info(self, end: AttemptEnd) -> AttemptInfo:
        return AttemptInfo(attempt=self.number, state=end.state, cause=end.cause, error=end.error,
                           pid=self.pid, node_id=self.node_id, started_at=self.began_at, ended_at=now())
