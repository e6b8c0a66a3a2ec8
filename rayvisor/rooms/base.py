"""The interface a room backend offers to a job's room facade, and its optional features.

Every backend is a ``RoomConnection``. What only some backends can do is a small
capability protocol of its own, which a backend subclasses to declare it; the facade
asks ``isinstance(connection, Capability)`` instead of probing for attributes.

=========================  =====  ========  =====
capability                 local  livekit   relay
=========================  =====  ========  =====
``HasRtcRoom``                    yes
``PreparesRtcRoom``               yes
``WatchesTextTopics``             yes
``HoldsNativeEvents``             yes
=========================  =====  ========  =====
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

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
        """Events after ``after_seq`` (acknowledging those up to it), waiting up to ``timeout``
        seconds for the first one; every backend serves them from an ``inbox.EventInbox``."""

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


# --------------------------------------------------------------------------- capabilities


@runtime_checkable
class HasRtcRoom(Protocol):
    """A connection that is a real ``livekit.rtc.Room`` underneath (the LiveKit backend).
    The facade hands it out as ``ctx.room.rtc_room``, since media (tracks, audio and video)
    is only there; backends without media have none, and the facade answers None."""

    @property
    def rtc_room(self) -> Any:
        """The connected ``rtc.Room``; None before ``connect`` and after ``disconnect``."""


@runtime_checkable
class PreparesRtcRoom(Protocol):
    """A connection whose ``rtc.Room`` exists before it connects (the LiveKit backend).
    livekit-agents' ``ctx.room`` and RoomIO attach to that object before the job connects,
    so they and rayvisor's listeners are on the one room the connection later joins."""

    def prepare_rtc_room(self) -> Any:
        """The ``rtc.Room`` this connection joins, created (with its listeners) on first call."""


@runtime_checkable
class WatchesTextTopics(Protocol):
    """A connection that receives text streams only on topics named up front (the LiveKit
    backend: rtc delivers a text stream only to a handler registered for its topic). The
    facade names each topic it has a handler for; other backends deliver every text stream."""

    def watch_text_topic(self, topic: str) -> None:
        """Receive text streams on ``topic`` from now on (idempotent; before or after connect)."""


@runtime_checkable
class HoldsNativeEvents(Protocol):
    """A connection whose ``NATIVE`` event records stand for rtc events with rtc objects as
    arguments (the LiveKit backend: tracks, speakers, quality ...). Those objects cannot
    become records, so they stay in the connection until the facade takes them to emit."""

    def take_native(self, seq: int) -> tuple[str, tuple[Any, ...]] | None:
        """The rtc event name and arguments of the ``NATIVE`` record ``seq`` (once; None after)."""
