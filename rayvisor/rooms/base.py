"""The interface a room backend offers to a job's room facade."""

from __future__ import annotations

from typing import Protocol

from .records import EventBatch, ParticipantInfo, RoomSnapshot


class RoomConnection(Protocol):
    """One participant's connection to a room, as the job actor uses it.

    The facade (``rayvisor.agents.room.Room``) owns the state users see; a backend only
    moves records: it joins, pulls events in order, and performs the participant's actions.
    """

    async def connect(self, room: str, local: ParticipantInfo, auto_subscribe: str = "subscribe_all") -> RoomSnapshot:
        """Join ``room`` as ``local``; returns who is already there. ``auto_subscribe`` is an
        ``AutoSubscribe`` value (backends without media ignore it)."""

    async def next_events(self, after_seq: int, timeout: float) -> EventBatch:
        """Events after ``after_seq``, waiting up to ``timeout`` seconds for the first one."""

    async def set_attributes(self, attributes: dict[str, str]) -> None: ...

    async def set_metadata(self, metadata: str) -> None: ...

    async def send(
        self, *, topic: str, text: str | None, data: bytes | None, destination_identities: list[str],
        stream_name: str | None = None, stream_attributes: dict[str, str] | None = None,
    ) -> None:
        """Text as a text stream; bytes as a data packet, or as a byte stream named
        ``stream_name`` when it is given. ``stream_attributes`` go with a stream."""

    async def disconnect(self) -> None:
        """Leave the room; idempotent."""

    async def delete_room(self) -> None:
        """End the room for everyone."""
