"""``ParticipantContext``: the ``ctx`` a participant entrypoint gets inside its child actor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from livekit.protocol import agent as agent_proto

from ..errors import ParticipantNotFound
from .job import BaseContext, JobProcess, LiveKitAccess
from .room import RemoteParticipant, Room


def participant_context_class(livekit_agents: bool) -> type["ParticipantContext"]:
    """rayvisor's ``ParticipantContext``, or livekit-agents' flavour of it (see ``job_context_class``)."""
    if livekit_agents:
        from .livekit_agents_context import AgentsParticipantContext

        return AgentsParticipantContext
    return ParticipantContext


class ParticipantContext(BaseContext):
    """What ``async def entry(ctx, participant)`` sees when it runs in its own actor.

    It mirrors the parts of ``JobContext`` that make sense for one participant: ``job``,
    ``room`` (its ``local_participant`` acts through the job's connection, and its events
    are the ones concerning this participant), ``proc``, ``worker_id``,
    ``add_shutdown_callback`` (run when this participant actor stops) and ``shutdown``
    (which ends the whole job).
    """

    def __init__(self, *, job: agent_proto.Job, room: Room, proc: JobProcess, worker_id: str,
                 request_job_shutdown: Callable[[str], None], livekit: LiveKitAccess | None = None,
                 agent_identity: str = "", namespace: str = "") -> None:
        super().__init__(job=job, room=room, proc=proc, worker_id=worker_id, livekit=livekit, namespace=namespace)
        self._request_job_shutdown = request_job_shutdown
        self._agent_identity = agent_identity

    async def connect(self, **_: Any) -> None:
        """Nothing to do: a participant actor uses its job's connection."""

    async def wait_for_participant(self, **_: Any) -> RemoteParticipant:
        """The participant this actor serves (``ParticipantNotFound`` once it has left)."""
        for participant in self._room.remote_participants.values():
            return participant
        raise ParticipantNotFound("this participant has left the room")

    def shutdown(self, reason: str = "") -> None:
        """End the whole job (as ``JobContext.shutdown`` does)."""
        self._request_job_shutdown(reason)
