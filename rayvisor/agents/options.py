"""``WorkerOptions``: what an agent author configures, with livekit-agents' field names."""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidAgent

if TYPE_CHECKING:
    from .job import JobContext, JobProcess


class AutoSubscribe(str, enum.Enum):
    """Which tracks ``ctx.connect`` subscribes to (livekit-agents' values)."""

    SUBSCRIBE_ALL = "subscribe_all"
    SUBSCRIBE_NONE = "subscribe_none"
    AUDIO_ONLY = "audio_only"
    VIDEO_ONLY = "video_only"


class RestartPolicy(str, enum.Enum):
    """OTP restart types."""

    TEMPORARY = "temporary"
    """Never restarted."""
    TRANSIENT = "transient"
    """Restarted after an abnormal end (a crash or an error)."""


class EndWhen(str, enum.Enum):
    """When a job ends on its own, besides an explicit shutdown or the room's deletion."""

    ROOM_EMPTY = "room_empty"
    """When every STANDARD and SIP participant has left (after at least one joined)."""
    NEVER = "never"
    """Only on ``ctx.shutdown``, ``client.shutdown`` or the room being deleted."""


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """An agent and how its jobs are run. Validated on construction (fail fast)."""

    entrypoint_fnc: Callable[["JobContext"], Awaitable[None]]
    """``async def entrypoint(ctx: JobContext)``: the job's main function."""
    prewarm_fnc: Callable[["JobProcess"], Any] | None = None
    """``def prewarm(proc: JobProcess)``: runs once in the job's process before the entrypoint."""
    agent_name: str = ""
    """Name jobs are dispatched to (``JobSpec.agent_name``, LiveKit explicit dispatch)."""

    shutdown_process_timeout: float = 60.0
    """One budget (seconds) for the whole shutdown: cancel the entrypoint, run shutdown
    callbacks, disconnect. When it is spent the job's actor is killed."""
    initialize_process_timeout: float = 10.0
    """Bound (seconds) on creating the job's actor, loading the agent and running ``prewarm_fnc``."""
    end_when: EndWhen = EndWhen.ROOM_EMPTY
    """Which room condition ends a job on its own (see ``EndWhen``)."""

    isolate_participants: bool = True
    """Run each participant entrypoint in its own child actor (crash isolation); False runs
    them as tasks in the job's process, as LiveKit Agents does."""
    participant_restart: RestartPolicy = RestartPolicy.TEMPORARY
    """Restart a participant entrypoint's child actor after it crashed or raised
    (``transient``) while the participant is still in the room, or never (``temporary``)."""
    participant_shutdown_timeout: float = 10.0
    """Budget (seconds) for a participant actor's shutdown callbacks when its participant
    leaves; it is killed after that. During a job's shutdown the job's budget also bounds it."""
    max_restarts: int = 3
    """Restart intensity: at most this many restarts within ``restart_window`` seconds."""
    restart_window: float = 60.0

    job_resources: dict[str, float] = field(default_factory=dict)
    """Ray resources each job actor asks for (e.g. ``{"GPU": 1}`` or a custom resource);
    without ``"CPU"`` here, job actors reserve no CPU (``num_cpus=0``)."""
    max_metadata_bytes: int = 64 * 1024
    """Largest job metadata (UTF-8 bytes) the supervisor accepts."""
    finished_job_history: int = 10_000
    """Finished job records the supervisor keeps for ``status``; the oldest are dropped."""
    event_history: int = 10_000
    """State transitions kept for ``client.events`` / the lifecycle printed by ``dev``."""
    control_call_timeout: float = 10.0
    """Bound (seconds) on any control call that should answer at once (room operations,
    client calls to the supervisor)."""
    room_poll_timeout: float = 5.0
    """How long one long-poll for room events waits before it is re-issued."""

    def __post_init__(self) -> None:
        if not inspect.iscoroutinefunction(self.entrypoint_fnc):
            raise InvalidAgent(
                f"entrypoint_fnc must be an `async def` function taking a JobContext, got {self.entrypoint_fnc!r}"
            )
        if self.prewarm_fnc is not None and (
            not callable(self.prewarm_fnc) or inspect.iscoroutinefunction(self.prewarm_fnc)
        ):
            raise InvalidAgent("prewarm_fnc must be a plain (non-async) function taking a JobProcess")
        if not isinstance(self.agent_name, str):
            raise InvalidAgent(f"agent_name must be a string, got {type(self.agent_name).__name__}")
        for name in ("shutdown_process_timeout", "initialize_process_timeout", "control_call_timeout",
                     "room_poll_timeout", "participant_shutdown_timeout", "restart_window"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidAgent(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("max_metadata_bytes", "finished_job_history", "event_history"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidAgent(f"{name} must be a positive integer, got {value!r}")
        for name, kind in (("end_when", EndWhen), ("participant_restart", RestartPolicy)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise InvalidAgent(f"{name} must be one of {[e.value for e in kind]}") from None
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise InvalidAgent(f"max_restarts must be a non-negative integer, got {self.max_restarts!r}")
        if not all(isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                   for k, v in self.job_resources.items()):
            raise InvalidAgent("job_resources must map resource names to non-negative amounts")
