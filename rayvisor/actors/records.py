"""Records between a job actor and its participant actors."""

from __future__ import annotations

from pydantic import Field

from ..messages import ParticipantActorState, ParticipantCause, Record, register
from ..rooms.records import RoomSnapshot


@register
class ParticipantStart(Record):
    """Job actor -> participant actor: serve this participant (``snapshot.participants[0]``)."""

    job_id: str
    room: str
    metadata: str
    agent_name: str
    dispatch_id: str
    worker_id: str
    snapshot: RoomSnapshot
    url: str = ""
    """LiveKit backend: the server, for ``ctx.api``."""
    api_token: str = ""
    """LiveKit backend: the job's server API token (``ctx.api``)."""
    namespace: str = ""
    """The rayvisor namespace the job is served in (per-namespace services: inference actors)."""
    livekit_agents_context: bool = False
    """Give the entrypoint livekit-agents' ``JobContext`` (``WorkerOptions.livekit_agents_context``)."""


@register
class ParticipantStop(Record):
    """Job actor -> participant actor: run your shutdown callbacks and finish."""

    cause: ParticipantCause = Field(strict=False)
    reason: str = ""


@register
class ParticipantOutcome(Record):
    state: ParticipantActorState = Field(strict=False)
    cause: ParticipantCause = Field(strict=False)
    error: str | None = None
