"""Room backends: ``local`` (embedded, a named Ray actor)."""

from .local import LocalParticipant, LocalRooms, LocalRoomSettings
from .records import ParticipantInfo, RoomEventType

__all__ = ["LocalParticipant", "LocalRoomSettings", "LocalRooms", "ParticipantInfo", "RoomEventType"]
