"""The room facade a job sees as ``ctx.room``: livekit.rtc.Room's names over any backend.

The facade owns the state users read (participants, attributes, metadata) and emits
LiveKit's events; a backend (``rayvisor.rooms``) only moves records. One participant
object is kept per identity and updated in place, so ``if p == participant:`` holds
across events, as with livekit.rtc.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from livekit import rtc
from livekit.rtc._proto import participant_pb2

from ..aio import supervised_task
from ..errors import NotConnected, NotSupported, RoomUnavailable
from ..rooms.base import HasRtcRoom, HoldsNativeEvents, RoomConnection, WatchesTextTopics
from ..rooms.records import EventBatch, ParticipantInfo, RoomEvent, RoomEventType, RoomSnapshot

logger = logging.getLogger("rayvisor.room")

TextStreamHandler = Callable[["TextStreamReader", str], Any]
ByteStreamHandler = Callable[["ByteStreamReader", str], Any]

MAX_POLL_FAILURES = 3
"""Consecutive failed event polls after which the room counts as disconnected."""


class Participant:
    """Common fields of local and remote participants (livekit.rtc names), read from the
    backend's ``ParticipantInfo`` record."""

    def __init__(self, record: ParticipantInfo) -> None:
        self._record = record

    @property
    def identity(self) -> str:
        return self._record.identity

    @property
    def sid(self) -> str:
        return f"PA_{self.identity}"

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def kind(self) -> int:
        """An ``rtc.ParticipantKind`` value."""
        return self._record.kind

    @property
    def attributes(self) -> dict[str, str]:
        return dict(self._record.attributes)

    @property
    def metadata(self) -> str:
        return self._record.metadata

    def _update(self, record: ParticipantInfo) -> None:
        self._record = record

    def __repr__(self) -> str:
        return f"{type(self).__name__}(identity={self.identity!r}, kind={self.kind})"


def _rtc_info(record: ParticipantInfo) -> participant_pb2.ParticipantInfo:
    return participant_pb2.ParticipantInfo(
        sid=f"PA_{record.identity}", identity=record.identity, name=record.name, kind=record.kind,
        metadata=record.metadata, attributes=record.attributes, state=participant_pb2.ParticipantState.PARTICIPANT_STATE_ACTIVE,
    )


class RemoteParticipant(Participant, rtc.RemoteParticipant):
    """Another participant in the room: an ``rtc.RemoteParticipant`` (so code that checks
    ``isinstance`` accepts it) without media, whose fields come from the room backend."""

    def __init__(self, record: ParticipantInfo) -> None:
        super().__init__(record)
        self._info = _rtc_info(record)  # what rtc's own properties (state, permissions ...) read
        self._track_publications: dict[str, Any] = {}
        self._connection_quality = rtc.ConnectionQuality.QUALITY_UNKNOWN

    def _update(self, record: ParticipantInfo) -> None:
        super()._update(record)
        self._info = _rtc_info(record)

    def _disconnected(self, reason: int) -> None:
        """It left: ``disconnect_reason`` (an ``rtc.DisconnectReason``) and state say why, as in rtc."""
        self._info.disconnect_reason = reason  # type: ignore[assignment]
        self._info.state = participant_pb2.ParticipantState.PARTICIPANT_STATE_DISCONNECTED

    @property
    def track_publications(self) -> dict[str, Any]:
        """Always empty here: rayvisor's room facade carries no media (on the LiveKit
        backend, media is on ``ctx.room.rtc_room``)."""
        return self._track_publications

    def __repr__(self) -> str:
        return Participant.__repr__(self)


class LocalParticipant(Participant):
    """The agent itself; its actions go through the room backend."""

    def __init__(self, record: ParticipantInfo, connection: RoomConnection) -> None:
        super().__init__(record)
        self._connection = connection
        self._rpc_handlers: dict[str, Callable[..., Any]] = {}

    @property
    def track_publications(self) -> dict[str, Any]:
        """Tracks this participant published: none (the room facade has no media)."""
        return {}

    async def send_text(
        self, text: str, *, topic: str = "", destination_identities: list[str] | None = None,
        attributes: dict[str, str] | None = None, **_: Any,
    ) -> rtc.TextStreamInfo:
        """Send ``text`` as a text stream on ``topic`` (to everyone, or to the given identities)."""
        await self._connection.send(
            topic=topic, text=text, data=None, destination_identities=list(destination_identities or []),
            stream_attributes=dict(attributes or {}),
        )
        return _text_info(topic=topic, size=len(text.encode()), attributes=attributes)

    async def stream_text(
        self, *, destination_identities: list[str] | None = None, topic: str = "",
        attributes: dict[str, str] | None = None, stream_id: str | None = None, **_: Any,
    ) -> "TextStreamWriter":
        """A text stream written in chunks; the room backend delivers it whole when it is closed."""
        return TextStreamWriter(self, topic=topic, attributes=dict(attributes or {}),
                                destination_identities=list(destination_identities or []), stream_id=stream_id)

    async def send_bytes(
        self, data: bytes, *, topic: str = "", name: str | None = None, mime_type: str | None = None,
        destination_identities: list[str] | None = None, attributes: dict[str, str] | None = None, **_: Any,
    ) -> rtc.ByteStreamInfo:
        """Send ``data`` as one byte stream (receivers' ``register_byte_stream_handler``)."""
        await self._connection.send(
            topic=topic, text=None, data=bytes(data), destination_identities=list(destination_identities or []),
            stream_name=name or "unknown", stream_attributes=dict(attributes or {}),
        )
        return _bytes_info(topic=topic, name=name or "unknown", mime_type=mime_type, size=len(data),
                           attributes=attributes)

    async def stream_bytes(
        self, name: str, *, mime_type: str = "application/octet-stream", topic: str = "",
        attributes: dict[str, str] | None = None, destination_identities: list[str] | None = None, **_: Any,
    ) -> "ByteStreamWriter":
        """A byte stream written in chunks; delivered whole when it is closed."""
        return ByteStreamWriter(self, name=name, mime_type=mime_type, topic=topic, attributes=dict(attributes or {}),
                                destination_identities=list(destination_identities or []))

    async def publish_data(
        self, payload: bytes | str, *, reliable: bool = True,
        destination_identities: list[str] | None = None, topic: str = "",
    ) -> None:
        """Publish a data packet; receivers get ``data_received``."""
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        await self._connection.send(
            topic=topic, text=None, data=data, destination_identities=list(destination_identities or [])
        )

    async def publish_track(self, track: Any, options: Any = None) -> Any:
        raise NotSupported(
            "publish_track needs a LiveKit server: this room has no media (use text, e.g. "
            "room_io.RoomOptions(audio_input=False, audio_output=False), or serve with LiveKit settings)"
        )

    async def unpublish_track(self, track_sid: str) -> None:
        raise NotSupported("unpublish_track: this room has no media, so nothing was published")

    def register_rpc_method(self, method_name: str, handler: Callable[..., Any] | None = None) -> Any:
        """Kept for code that registers RPC methods; the local backend delivers no RPC calls."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._rpc_handlers[method_name] = fn
            return fn

        return register(handler) if handler is not None else register

    def unregister_rpc_method(self, method: str) -> None:
        self._rpc_handlers.pop(method, None)

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str, **_: Any) -> str:
        raise NotSupported(f"perform_rpc({method!r}): RPC needs a LiveKit server; the local room backend has none")

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        """Merge attributes (an empty value deletes a key); others get ``participant_attributes_changed``."""
        await self._connection.set_attributes(dict(attributes))
        merged = {**self._record.attributes, **attributes}
        self._update(self._record.model_copy(update={"attributes": {k: v for k, v in merged.items() if v}}))

    async def set_metadata(self, metadata: str) -> None:
        await self._connection.set_metadata(metadata)
        self._update(self._record.model_copy(update={"metadata": metadata}))


def _text_info(*, topic: str, size: int, attributes: dict[str, str] | None, stream_id: str = "") -> rtc.TextStreamInfo:
    return rtc.TextStreamInfo(
        stream_id=stream_id or uuid.uuid4().hex, mime_type="text/plain", topic=topic,
        timestamp=int(time.time() * 1000), size=size, attributes=dict(attributes or {}), attachments=[],
    )


def _bytes_info(*, topic: str, name: str, mime_type: str | None, size: int, attributes: dict[str, str] | None,
                stream_id: str = "") -> rtc.ByteStreamInfo:
    return rtc.ByteStreamInfo(
        stream_id=stream_id or uuid.uuid4().hex, mime_type=mime_type or "application/octet-stream", topic=topic,
        timestamp=int(time.time() * 1000), size=size, attributes=dict(attributes or {}), name=name,
    )


class _BufferedStreamWriter:
    """A stream written in chunks; the local backend moves whole messages, so the chunks are
    buffered and sent as one stream on ``aclose`` (by ``_send``)."""

    info: Any
    """rtc's ``TextStreamInfo`` or ``ByteStreamInfo`` of the stream."""

    def __init__(self, local: LocalParticipant, destination_identities: list[str]) -> None:
        self._local = local
        self._destinations = destination_identities
        self._chunks: list[Any] = []
        self._closed = False

    async def write(self, chunk: Any) -> None:
        if self._closed:
            raise RuntimeError("the stream is closed")
        self._chunks.append(chunk)

    async def aclose(self, *, reason: str = "", attributes: dict[str, str] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        await self._send({**self.info.attributes, **(attributes or {})})

    async def _send(self, attributes: dict[str, str]) -> None:
        raise NotImplementedError


class TextStreamWriter(_BufferedStreamWriter):
    """``local_participant.stream_text()``; nothing is sent if nothing was written."""

    def __init__(self, local: LocalParticipant, *, topic: str, attributes: dict[str, str],
                 destination_identities: list[str], stream_id: str | None) -> None:
        super().__init__(local, destination_identities)
        self.info = _text_info(topic=topic, size=0, attributes=attributes, stream_id=stream_id or "")

    async def _send(self, attributes: dict[str, str]) -> None:
        text = "".join(self._chunks)
        if text:
            await self._local._connection.send(topic=self.info.topic, text=text, data=None,
                                               destination_identities=self._destinations, stream_attributes=attributes)


class ByteStreamWriter(_BufferedStreamWriter):
    """``local_participant.stream_bytes()``."""

    def __init__(self, local: LocalParticipant, *, name: str, mime_type: str, topic: str,
                 attributes: dict[str, str], destination_identities: list[str]) -> None:
        super().__init__(local, destination_identities)
        self.info = _bytes_info(topic=topic, name=name, mime_type=mime_type, size=0, attributes=attributes)

    async def _send(self, attributes: dict[str, str]) -> None:
        await self._local._connection.send(
            topic=self.info.topic, text=None, data=b"".join(bytes(c) for c in self._chunks),
            destination_identities=self._destinations, stream_name=self.info.name, stream_attributes=attributes)


class StreamReader:
    """A received text or byte stream (``info`` is rtc's ``TextStreamInfo`` or
    ``ByteStreamInfo``); the local backend delivers it whole, in one chunk."""

    def __init__(self, info: Any, payload: Any) -> None:
        self.info = info
        self._payload = payload

    async def read_all(self) -> Any:
        return self._payload

    def __aiter__(self):
        async def chunks():
            yield self._payload

        return chunks()


TextStreamReader = StreamReader
ByteStreamReader = StreamReader


class Room:
    """``ctx.room``: a livekit.rtc.Room look-alike over a ``RoomConnection`` backend."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._metadata = ""
        self._connection: RoomConnection | None = None
        self._local: LocalParticipant | None = None
        self._remote: dict[str, RemoteParticipant] = {}
        self._handlers: dict[str, list[Callable[..., Any]]] = {}
        self._text_handlers: dict[str, TextStreamHandler] = {}
        self._byte_handlers: dict[str, ByteStreamHandler] = {}
        self._record_listeners: list[Callable[[RoomEvent], None]] = []
        self._state = rtc.ConnectionState.CONN_DISCONNECTED
        self._seq = 0
        self._pump: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._task_context: Callable[[], contextvars.Context | None] = lambda: None
        """The contextvars its event pump runs in (livekit-agents' job context sets its own):
        room callbacks and stream handlers see the job's context wherever the pump was started."""

    # -- livekit.rtc.Room surface ----------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def metadata(self) -> str:
        return self._metadata

    @property
    def remote_participants(self) -> dict[str, RemoteParticipant]:
        return self._remote

    @property
    def local_participant(self) -> LocalParticipant:
        if self._local is None:
            raise NotConnected("the room is not connected yet: await ctx.connect() first")
        return self._local

    @property
    def connection_state(self) -> int:
        return self._state

    def isconnected(self) -> bool:
        return self._state == rtc.ConnectionState.CONN_CONNECTED

    def on(self, event: str, callback: Callable[..., Any] | None = None) -> Callable[..., Any]:
        """Register a synchronous callback for ``event`` (usable as a decorator), as livekit.rtc."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.iscoroutinefunction(fn):
                raise ValueError(
                    "Cannot register an async callback with `.on()`. "
                    "Use `asyncio.create_task` within your synchronous callback instead."
                )
            self._handlers.setdefault(event, []).append(fn)
            return fn

        return register(callback) if callback is not None else register

    def once(self, event: str, callback: Callable[..., Any] | None = None) -> Callable[..., Any]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any) -> None:
                self.off(event, wrapper)
                fn(*args)

            self.on(event, wrapper)
            return fn

        return register(callback) if callback is not None else register

    def off(self, event: str, callback: Callable[..., Any]) -> None:
        handlers = self._handlers.get(event, [])
        if callback in handlers:
            handlers.remove(callback)

    def emit(self, event: str, *args: Any) -> None:
        """Call every callback of ``event``; one that raises is logged, the rest still run."""
        for fn in list(self._handlers.get(event, [])):
            try:
                fn(*args)
            except Exception:
                logger.exception("room event callback for %r raised", event)

    def register_text_stream_handler(self, topic: str, handler: TextStreamHandler) -> None:
        """``handler(reader, participant_identity)`` for text streams on ``topic``."""
        if topic in self._text_handlers:
            raise ValueError(f"A text stream handler for topic '{topic}' is already set.")
        self._text_handlers[topic] = handler
        if self._connection is not None:
            self._watch_text_topic(self._connection, topic)

    def unregister_text_stream_handler(self, topic: str) -> None:
        self._text_handlers.pop(topic, None)

    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None:
        """``handler(reader, participant_identity)`` for byte streams on ``topic``."""
        if topic in self._byte_handlers:
            raise ValueError(f"A byte stream handler for topic '{topic}' is already set.")
        self._byte_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self._byte_handlers.pop(topic, None)

    # -- driven by the job ---------------------------------------------------------

    @property
    def rtc_room(self) -> rtc.Room | None:
        """The underlying ``livekit.rtc.Room`` on the LiveKit backend (for media: tracks,
        audio and video); None on the local backend, which has no media."""
        connection = self._connection
        return connection.rtc_room if isinstance(connection, HasRtcRoom) else None

    async def _connect(self, connection: RoomConnection, local: ParticipantInfo, poll_timeout: float,
                       *, start_events: bool = True, auto_subscribe: str = "subscribe_all") -> None:
        """Join through ``connection`` and (unless ``start_events`` is False) start delivering
        events; with False, ``_start_events`` starts them later."""
        if self._connection is not None:
            return
        self._state = rtc.ConnectionState.CONN_RECONNECTING
        for topic in self._text_handlers:
            self._watch_text_topic(connection, topic)
        try:
            snapshot: RoomSnapshot = await connection.connect(self._name, local, auto_subscribe)
        except BaseException:
            self._state = rtc.ConnectionState.CONN_DISCONNECTED
            raise
        self._connection = connection
        self._metadata = snapshot.metadata
        self._local = LocalParticipant(snapshot.local, connection)
        for info in snapshot.participants:
            self._remote[info.identity] = RemoteParticipant(info)
        self._state = rtc.ConnectionState.CONN_CONNECTED
        self.emit("connection_state_changed", self._state)
        self.emit("connected")
        if start_events:
            self._start_events(poll_timeout)

    @staticmethod
    def _watch_text_topic(connection: RoomConnection, topic: str) -> None:
        if isinstance(connection, WatchesTextTopics):  # backends that need topics named up front
            connection.watch_text_topic(topic)

    def _start_events(self, poll_timeout: float) -> None:
        if self._pump is None and self._connection is not None:
            self._pump = supervised_task(
                self._pump_events(poll_timeout), name=f"room-events:{self._name}", logger=logger, tasks=self._tasks,
                context=self._task_context(),
            )

    async def _disconnect(self) -> None:
        """Leave the room (used by the job's shutdown); no ``disconnected`` event is emitted."""
        if self._pump is not None:
            self._pump.cancel()
        connection, self._connection = self._connection, None
        if connection is not None and self._state == rtc.ConnectionState.CONN_CONNECTED:
            self._state = rtc.ConnectionState.CONN_DISCONNECTED
            await connection.disconnect()
        self._state = rtc.ConnectionState.CONN_DISCONNECTED

    async def _delete(self) -> None:
        if self._connection is None:
            raise NotConnected("the room is not connected: await ctx.connect() first")
        await self._connection.delete_room()

    async def _pump_events(self, poll_timeout: float) -> None:
        """Pull events in order until the connection closes. If the backend cannot be
        reached ``MAX_POLL_FAILURES`` times in a row, the room counts as disconnected, so
        the job ends instead of sitting unaware of its room."""
        assert self._connection is not None
        failures = 0
        while self._connection is not None:
            try:
                batch: EventBatch = await self._connection.next_events(self._seq, poll_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                failures += 1
                if isinstance(err, RoomUnavailable) and failures < MAX_POLL_FAILURES:
                    logger.warning("room events poll failed (%d/%d): %s", failures, MAX_POLL_FAILURES, err)
                    continue
                logger.error("lost the room %r: %r", self._name, err)
                self._lose_connection(rtc.DisconnectReason.UNKNOWN_REASON)
                return
            failures = 0
            for event in batch.events:
                self._seq = max(self._seq, event.seq)
                self._apply(event)
            if batch.closed:
                return

    def _lose_connection(self, reason: int) -> None:
        self._state = rtc.ConnectionState.CONN_DISCONNECTED
        self._connection = None
        self.emit("connection_state_changed", self._state)
        self.emit("disconnected", reason)

    def _participant(self, info: ParticipantInfo) -> Participant:
        """The one object for ``info.identity`` (the local participant included), updated in place."""
        if self._local is not None and info.identity == self._local.identity:
            self._local._update(info)
            return self._local
        participant = self._remote.get(info.identity)
        if participant is None:
            participant = self._remote[info.identity] = RemoteParticipant(info)
        else:
            participant._update(info)
        return participant

    def _listen_records(self, listener: Callable[[RoomEvent], None]) -> None:
        """Also hand every backend event, after it was applied and emitted, to ``listener``."""
        self._record_listeners.append(listener)

    def _participant_info(self, identity: str) -> ParticipantInfo | None:
        participant = self._remote.get(identity)
        return participant._record if participant is not None else None

    @property
    def _local_info(self) -> ParticipantInfo:
        return self.local_participant._record

    def _apply(self, event: RoomEvent) -> None:
        self._apply_event(event)
        for listener in list(self._record_listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("room record listener failed")

    def _apply_event(self, event: RoomEvent) -> None:
        """Update the facade's state from one backend event, then emit LiveKit's event."""
        kind = event.type
        if kind == RoomEventType.PARTICIPANT_CONNECTED and event.participant:
            self.emit("participant_connected", self._participant(event.participant))
        elif kind == RoomEventType.PARTICIPANT_DISCONNECTED and event.participant:
            participant = self._remote.pop(event.participant.identity, None)
            if participant is not None:
                participant._disconnected(event.reason)
                self.emit("participant_disconnected", participant)
        elif kind == RoomEventType.PARTICIPANT_ATTRIBUTES_CHANGED and event.participant:
            self.emit("participant_attributes_changed", dict(event.changed_attributes),
                      self._participant(event.participant))
        elif kind == RoomEventType.PARTICIPANT_METADATA_CHANGED and event.participant:
            self.emit("participant_metadata_changed", self._participant(event.participant),
                      event.old_metadata, event.new_metadata)
        elif kind == RoomEventType.ROOM_METADATA_CHANGED:
            self._metadata = event.new_metadata
            self.emit("room_metadata_changed", event.old_metadata, event.new_metadata)
        elif kind == RoomEventType.DATA_RECEIVED:
            sender = self._remote.get(event.participant.identity) if event.participant else None
            packet = rtc.DataPacket(
                data=event.data or b"", kind=rtc.DataPacketKind.KIND_RELIABLE, participant=sender, topic=event.topic
            )
            self.emit("data_received", packet)
        elif kind == RoomEventType.TEXT_RECEIVED:
            self._deliver_text(event)
        elif kind == RoomEventType.BYTES_RECEIVED:
            self._deliver_bytes(event)
        elif kind == RoomEventType.DISCONNECTED:
            self._lose_connection(event.reason)
        elif kind == RoomEventType.NATIVE:
            self._emit_native(event)

    def _emit_native(self, event: RoomEvent) -> None:
        """Emit an rtc event as rtc does, with this facade's participant objects in place of
        rtc's (so one object per identity holds across all events)."""
        connection = self._connection
        native = connection.take_native(event.seq) if isinstance(connection, HoldsNativeEvents) else None
        if native is None:
            return
        name, args = native

        def ours(arg: Any) -> Any:
            if isinstance(arg, list):
                return [ours(item) for item in arg]
            identity = getattr(arg, "identity", None)
            if isinstance(identity, str) and hasattr(arg, "kind"):
                if self._local is not None and identity == self._local.identity:
                    return self._local
                return self._remote.get(identity, arg)
            return arg

        self.emit(name, *(ours(arg) for arg in args))

    def _deliver_text(self, event: RoomEvent) -> None:
        info = _text_info(topic=event.topic, size=len((event.text or "").encode()), attributes=event.stream_attributes,
                          stream_id=event.stream_id)
        self._deliver_stream(self._text_handlers.get(event.topic), TextStreamReader(info, event.text or ""), event)

    def _deliver_bytes(self, event: RoomEvent) -> None:
        info = _bytes_info(topic=event.topic, name=event.stream_name, mime_type=None, size=len(event.data or b""),
                           attributes=event.stream_attributes, stream_id=event.stream_id)
        self._deliver_stream(self._byte_handlers.get(event.topic), ByteStreamReader(info, event.data or b""), event)

    def _deliver_stream(self, handler: Callable[[Any, str], Any] | None, reader: Any, event: RoomEvent) -> None:
        """Hand a received stream to its topic's handler (a coroutine it returns runs as a task)."""
        if handler is None:
            logger.debug("ignoring a %s on topic %r: no handler registered", event.type.value, event.topic)
            return
        identity = event.participant.identity if event.participant else ""
        try:
            result = handler(reader, identity)
        except Exception:
            logger.exception("stream handler for topic %r raised", event.topic)
            return
        if isinstance(result, Coroutine):
            supervised_task(result, name=f"stream:{event.topic}", logger=logger, tasks=self._tasks)
