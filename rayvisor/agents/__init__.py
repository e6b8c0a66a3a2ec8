"""What an agent author imports (mirrors livekit.agents)."""

from .job import JobContext, JobProcess
from .options import AutoSubscribe, EndWhen, WorkerOptions
from .room import LocalParticipant, Participant, RemoteParticipant, Room

__all__ = [
    "AutoSubscribe", "EndWhen", "JobContext", "JobProcess", "LocalParticipant", "Participant",
    "RemoteParticipant", "Room", "WorkerOptions",
]
