"""``ParticipantContext``: the ``ctx`` a participant entrypoint gets inside its child actor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from livekit.protocol import agent as agent_proto

from ..errors import InvalidAgent, LiveKitNotConfigured, ParticipantNotFound
from .job import JobProcess, ShutdownCallback
from .room import RemoteParticipant, Room


class ParticipantContext:
    """What ``async def entry(ctx, participant)`` sees when it runs in its own actor.

    It mirrors the parts of ``JobContext`` that make sense for one participant: ``job``,
    ``room`` (its ``local_participant`` acts through the job's connection, and its events
    are the ones concerning this participant), ``proc``, ``worker_id``,
    ``add_shutdown_callback`` and ``shutdown`` (which ends the whole job).
    """

    def __init__(self, *, job: agent_proto.Job, room: Room, proc: JobProcess, worker_id: str,
                 request_job_shutdown: Callable[[str], None]) -> None:
        self._job = job
        self._room = room
        self._proc = proc
        self._worker_id = worker_id
        self._request_job_shutdown = request_job_shutdown
        self._shutdown_callbacks: list[ShutdownCallback] = []
        self._log_context_fields: dict[str, Any] = {}

    @property
    def job(self) -> agent_proto.Job:
        return self._job

    @property
    def room(self) -> Room:
        return self._room

    @property
    def proc(self) -> JobProcess:
        return self._proc

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def api(self) -> Any:
        raise LiveKitNotConfigured("ctx.api needs a LiveKit server; this job runs on the local room backend")

    @property
    def log_context_fields(self) -> dict[str, Any]:
        return self._log_context_fields

    @log_context_fields.setter
    def log_context_fields(self, fields: dict[str, Any]) -> None:
        self._log_context_fields = dict(fields)

    @property
    def shutdown_callbacks(self) -> list[ShutdownCallback]:
        return list(self._shutdown_callbacks)

    async def connect(self, **_: Any) -> None:
        """Nothing to do: a participant actor uses its job's connection."""

    async def wait_for_participant(self, **_: Any) -> RemoteParticipant:
        """The participant this actor serves (``ParticipantNotFound`` once it has left)."""
        for participant in self._room.remote_participants.values():
            return participant
        raise ParticipantNotFound("this participant has left the room")

    def add_shutdown_callback(self, callback: ShutdownCallback) -> None:
        """Run ``callback()`` or ``callback(reason)`` once, when this participant actor stops."""
        if not callable(callback):
            raise InvalidAgent(f"shutdown callback must be callable, got {callback!r}")
        self._shutdown_callbacks.append(callback)

    def shutdown(self, reason: str = "") -> None:
        """End the whole job (as ``JobContext.shutdown`` does)."""
        self._request_job_shutdown(reason)
