"""The LiveKit room backend: a job's connection is a real ``livekit.rtc.Room``.

The connection turns rtc's events into the same ordered ``RoomEvent`` records the local
backend produces, so the job's room facade, the ``room_empty`` end condition and the
participant child actors work unchanged. Media events (tracks, speakers, quality ...)
carry native rtc objects that cannot become records: they are queued in the same order
as ``NATIVE`` records whose arguments stay in this process (``take_native``).

Runs inside the job actor, with the url and token its start record brought; it never
sees the API secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from livekit import rtc
from livekit.protocol import room as room_proto

if TYPE_CHECKING:  # livekit.api (and aiohttp) load only in jobs that use LiveKit
    from livekit import api

from ..aio import supervised_task
from ..errors import ConnectFailed, NotConnected
from .base import HasRtcRoom, HoldsNativeEvents, PreparesRtcRoom, RoomConnection, WatchesTextTopics
from .inbox import EventInbox
from .records import EventBatch, ParticipantInfo, RoomEvent, RoomEventType, RoomSnapshot

logger = logging.getLogger("rayvisor.room.livekit")

RoomFactory = Callable[[], Any]
_room_factory: RoomFactory = rtc.Room


def use_room_factory(factory: RoomFactory | None) -> None:
    """Build job rooms with ``factory`` instead of ``rtc.Room`` (None restores it). For a
    stand-in where no LiveKit media server exists, e.g. tests; call it in ``prewarm_fnc``."""
    global _room_factory
    _room_factory = factory or rtc.Room


NATIVE_EVENTS = (
    "track_published", "track_unpublished", "track_subscribed", "track_unsubscribed",
    "track_subscription_failed", "track_muted", "track_unmuted", "local_track_published",
    "local_track_unpublished", "active_speakers_changed", "participant_name_changed",
    "connection_quality_changed", "participant_permissions_changed", "sip_dtmf_received",
    "transcription_received", "reconnecting", "reconnected",
)
"""rtc events forwarded as they are (their arguments are rtc objects)."""

_KNOWN_KINDS = frozenset(value for _, value in rtc.ParticipantKind.items())


def participant_info(participant: Any) -> ParticipantInfo:
    """An rtc participant as a record (an unknown kind counts as STANDARD)."""
    kind = int(getattr(participant, "kind", rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD))
    return ParticipantInfo(
        identity=participant.identity, name=participant.name or "",
        kind=kind if kind in _KNOWN_KINDS else rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
        attributes=dict(participant.attributes), metadata=participant.metadata or "",
    )


def _auto_subscribe(value: str) -> tuple[bool, int | None]:
    """livekit-agents' AutoSubscribe as (RoomOptions.auto_subscribe, the one track kind to
    subscribe to by hand, if any)."""
    if value == "subscribe_all":
        return True, None
    if value == "audio_only":
        return False, rtc.TrackKind.KIND_AUDIO
    if value == "video_only":
        return False, rtc.TrackKind.KIND_VIDEO
    return False, None


class LiveKitRoomConnection(RoomConnection, HasRtcRoom, PreparesRtcRoom, WatchesTextTopics, HoldsNativeEvents):
    """A ``RoomConnection`` over ``livekit.rtc.Room`` (see the module docstring), with every
    optional capability: it is an rtc room, so it has media, native events and text topics."""

    def __init__(self, url: str, token: str, *, connect_timeout: float, call_timeout: float,
                 room_api: Callable[[], api.LiveKitAPI] | None = None) -> None:
        self._url = url
        self._token = token
        self._connect_timeout = connect_timeout
        self._call_timeout = call_timeout
        self._room_api = room_api
        self._room: Any = None
        self._prepared: Any = None
        self._room_name = ""
        # Unbounded: the job's own pump reads it, and a dropped record would leave the facade
        # wrong (a participant missed) or orphan a NATIVE record's rtc objects in ``_native``.
        self._inbox = EventInbox(max_events=None)
        self._native: dict[int, tuple[str, tuple[Any, ...]]] = {}
        self._text_topics: set[str] = set()
        self._subscribe_kind: int | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- HasRtcRoom, PreparesRtcRoom -----------------------------------------------------

    @property
    def rtc_room(self) -> Any:
        """The underlying ``rtc.Room`` once connected (for media: tracks, audio sources ...)."""
        return self._room

    def prepare_rtc_room(self) -> Any:
        """The ``rtc.Room`` this connection joins, created on first use: code that needs the
        room before it connects (livekit-agents' ``ctx.room``, RoomIO) attaches to the same
        object rayvisor's listeners are on."""
        if self._prepared is None:
            self._prepared = _room_factory()
            self._listen(self._prepared)
        return self._prepared

    # -- RoomConnection -------------------------------------------------------------

    async def connect(self, room: str, local: ParticipantInfo, auto_subscribe: str = "subscribe_all") -> RoomSnapshot:
        """Join with the job's token. Who the agent is (identity, name, attributes) is in the
        token, so ``local`` is not sent. Any failure, or no answer within the timeout, is
        ``ConnectFailed``."""
        self._room_name = room
        rtc_room = self.prepare_rtc_room()
        subscribe_all, self._subscribe_kind = _auto_subscribe(auto_subscribe)
        options = rtc.RoomOptions(auto_subscribe=subscribe_all, connect_timeout=self._connect_timeout)
        try:
            await asyncio.wait_for(rtc_room.connect(self._url, self._token, options), self._connect_timeout)
        except asyncio.CancelledError:  # the job is shutting down mid-connect: leave no ghost agent behind
            self._prepared = None
            supervised_task(self._abandon(rtc_room), name="room-abandon", logger=logger, tasks=self._tasks)
            raise
        except asyncio.TimeoutError:
            self._prepared = None
            await self._abandon(rtc_room)
            raise ConnectFailed(f"no connection to {self._url} within room_connect_timeout={self._connect_timeout}s") from None
        except Exception as err:
            self._prepared = None
            await self._abandon(rtc_room)
            detail = getattr(err, "message", "") or str(err) or type(err).__name__
            raise ConnectFailed(f"cannot join room {room!r} at {self._url}: {detail}") from None
        self._room = rtc_room
        for topic in self._text_topics:
            self._register_text_topic(topic)
        for participant in rtc_room.remote_participants.values():  # tracks published before we came
            for publication in getattr(participant, "track_publications", {}).values():
                self._maybe_subscribe(publication, participant)
        return RoomSnapshot(
            room=room, metadata=rtc_room.metadata or "", connection_id=getattr(rtc_room, "name", room),
            local=participant_info(rtc_room.local_participant),
            participants=[participant_info(p) for p in rtc_room.remote_participants.values()],
        )

    async def next_events(self, after_seq: int, timeout: float) -> EventBatch:
        return await self._inbox.next_events(after_seq, timeout)

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        await self._bounded(self._connected().local_participant.set_attributes(attributes))

    async def set_metadata(self, metadata: str) -> None:
        await self._bounded(self._connected().local_participant.set_metadata(metadata))

    async def send(self, *, topic: str, text: str | None, data: bytes | None,
                   destination_identities: list[str], stream_name: str | None = None,
                   stream_attributes: dict[str, str] | None = None) -> None:
        local = self._connected().local_participant
        attributes = dict(stream_attributes or {})
        if text is not None:
            await self._bounded(local.send_text(text, topic=topic, destination_identities=destination_identities,
                                                attributes=attributes))
        elif stream_name is not None:
            await self._bounded(local.send_bytes(data or b"", name=stream_name, topic=topic, attributes=attributes,
                                                 destination_identities=destination_identities))
        else:
            await self._bounded(local.publish_data(data or b"", reliable=True, topic=topic,
                                                   destination_identities=destination_identities))

    async def disconnect(self) -> None:
        self._native.clear()
        rtc_room, self._room = self._room, None
        if rtc_room is not None:
            await self._bounded(rtc_room.disconnect())

    async def delete_room(self) -> None:
        """RoomService.DeleteRoom through the job's API client; the server then disconnects
        everyone, this job included (``disconnected`` with ROOM_DELETED)."""
        if self._room_api is None:
            raise NotConnected("deleting a LiveKit room needs the job's server API token")
        await self._bounded(self._room_api().room.delete_room(room_proto.DeleteRoomRequest(room=self._room_name)))

    # -- WatchesTextTopics, HoldsNativeEvents -------------------------------------------

    def watch_text_topic(self, topic: str) -> None:
        """Receive text streams on ``topic`` (rtc needs a handler per topic)."""
        if topic not in self._text_topics:
            self._text_topics.add(topic)
            if self._room is not None:
                self._register_text_topic(topic)

    def take_native(self, seq: int) -> tuple[str, tuple[Any, ...]] | None:
        """The event name and rtc arguments of the ``NATIVE`` record ``seq`` (once)."""
        return self._native.pop(seq, None)

    # -- rtc events -> records --------------------------------------------------------

    def _push(self, type_: RoomEventType, **fields: Any) -> RoomEvent | None:
        return self._inbox.add(type_, **fields)

    def _listen(self, rtc_room: Any) -> None:
        push = self._push
        rtc_room.on("participant_connected", lambda p: push(RoomEventType.PARTICIPANT_CONNECTED, participant=participant_info(p)))
        rtc_room.on("participant_disconnected", lambda p: push(
            RoomEventType.PARTICIPANT_DISCONNECTED, participant=participant_info(p),
            reason=int(getattr(p, "disconnect_reason", 0) or 0)))
        rtc_room.on("participant_attributes_changed", lambda changed, p: push(
            RoomEventType.PARTICIPANT_ATTRIBUTES_CHANGED, participant=participant_info(p),
            changed_attributes=dict(changed)))
        rtc_room.on("participant_metadata_changed", lambda p, old, new: push(
            RoomEventType.PARTICIPANT_METADATA_CHANGED, participant=participant_info(p),
            old_metadata=old or "", new_metadata=new or ""))
        rtc_room.on("room_metadata_changed", lambda old, new: push(
            RoomEventType.ROOM_METADATA_CHANGED, old_metadata=old or "", new_metadata=new or ""))
        rtc_room.on("data_received", self._on_data)
        rtc_room.on("disconnected", self._on_disconnected)
        rtc_room.on("track_published", self._maybe_subscribe)
        for name in NATIVE_EVENTS:
            rtc_room.on(name, self._native_forwarder(name))

    def _native_forwarder(self, name: str) -> Callable[..., None]:
        def forward(*args: Any) -> None:
            event = self._push(RoomEventType.NATIVE, topic=name)
            if event is not None:
                self._native[event.seq] = (name, args)

        return forward

    def _on_data(self, packet: Any) -> None:
        sender = packet.participant
        self._push(RoomEventType.DATA_RECEIVED, participant=participant_info(sender) if sender is not None else None,
                   topic=packet.topic or "", data=bytes(packet.data))

    def _on_disconnected(self, reason: int) -> None:
        self._push(RoomEventType.DISCONNECTED, reason=int(reason))
        self._inbox.close()

    def _maybe_subscribe(self, publication: Any, _participant: Any) -> None:
        """AUDIO_ONLY / VIDEO_ONLY: subscribe to that kind of track by hand, as livekit-agents does."""
        if self._subscribe_kind is not None and publication.kind == self._subscribe_kind:
            publication.set_subscribed(True)

    def _register_text_topic(self, topic: str) -> None:
        def on_stream(reader: Any, identity: str) -> None:
            supervised_task(self._read_text(topic, reader, identity), name=f"text-stream:{topic}", logger=logger,
                            tasks=self._tasks)

        self._room.register_text_stream_handler(topic, on_stream)

    async def _read_text(self, topic: str, reader: Any, identity: str) -> None:
        text = await reader.read_all()
        sender = self._room.remote_participants.get(identity) if self._room is not None else None
        info = participant_info(sender) if sender is not None else ParticipantInfo(identity=identity)
        self._push(RoomEventType.TEXT_RECEIVED, participant=info, topic=topic, text=text,
                   stream_id=getattr(reader.info, "stream_id", ""), timestamp=getattr(reader.info, "timestamp", 0) / 1000)

    # -- helpers ------------------------------------------------------------------------

    def _connected(self) -> Any:
        if self._room is None:
            raise NotConnected("the LiveKit room is not connected")
        return self._room

    async def _bounded(self, operation: Any) -> Any:
        return await asyncio.wait_for(operation, self._call_timeout)

    async def _abandon(self, rtc_room: Any) -> None:
        try:
            await asyncio.wait_for(rtc_room.disconnect(), self._call_timeout)
        except Exception:  # it never connected: nothing to leave
            pass
