"""What an agent author imports (mirrors livekit.agents)."""

from .job import JobContext, JobProcess
from .options import AutoSubscribe, EndWhen, WorkerOptions, WorkerPermissions
from .participant import ParticipantContext
from .request import JobRequest, LoadInfo
from .room import LocalParticipant, Participant, RemoteParticipant, Room

__all__ = [
    "AutoSubscribe", "EndWhen", "JobContext", "JobProcess", "JobRequest", "LoadInfo", "LocalParticipant",
    "Participant", "ParticipantContext",
    "RemoteParticipant", "Room", "WorkerOptions", "WorkerPermissions",
]
