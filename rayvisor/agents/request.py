"""``JobRequest`` (what ``request_fnc`` decides on) and ``LoadInfo`` (what ``load_fnc`` reads)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from livekit.protocol import agent as agent_proto
from livekit.protocol import models as models_proto


class Answer(str, enum.Enum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass
class Acceptance:
    """How the agent should appear in the room, as given to ``JobRequest.accept``."""

    name: str = ""
    identity: str = ""
    metadata: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


class JobRequest:
    """A job waiting for ``request_fnc``'s answer, as in livekit-agents."""

    def __init__(self, job: agent_proto.Job) -> None:
        self._job = job
        self.answer = Answer.PENDING
        self.acceptance: Acceptance | None = None

    @property
    def job(self) -> agent_proto.Job:
        return self._job

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def room(self) -> models_proto.Room:
        return self._job.room

    @property
    def agent_name(self) -> str:
        return self._job.agent_name

    @property
    def publisher(self) -> None:
        """LiveKit's publisher-job field; rayvisor jobs are room jobs."""
        return None

    async def accept(self, *, name: str = "", identity: str = "", metadata: str = "",
                     attributes: dict[str, str] | None = None) -> None:
        """Run the job; the agent joins as ``identity`` (default ``agent-<job id>``) named ``name``."""
        if self.answer is Answer.PENDING:
            self.answer = Answer.ACCEPTED
            self.acceptance = Acceptance(name=name, identity=identity, metadata=metadata,
                                         attributes=dict(attributes or {}))

    async def reject(self, *, terminate: bool = True) -> None:
        """Do not run the job (it is recorded REJECTED, cause ``rejected``). ``terminate`` is
        accepted for livekit-agents' signature: one rayvisor worker fronts the whole cluster,
        so a rejected job is never offered to another of its workers either way."""
        if self.answer is Answer.PENDING:
            self.answer = Answer.REJECTED


@dataclass(frozen=True)
class LoadInfo:
    """What ``load_fnc`` sees when the supervisor admits a job."""

    active_jobs: int
    max_jobs: int | None
    idle_actors: int
