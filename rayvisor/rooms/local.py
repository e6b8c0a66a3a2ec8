"""The embedded room backend: rooms held by one named Ray actor.

For demos, tests and simulations without a LiveKit server. The room server is a
detached, named async actor pinned to the node of the driver that created it (the
head), so losing a worker node never loses the rooms. Every call is a msgpack record;
malformed or oversized requests get a typed error and change nothing.

Participants pull their events (long-poll on ``poll``) from a bounded per-connection
``EventInbox``, which keeps the server free of callbacks into job actors whose loops may
be blocked.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import ray
from livekit import rtc
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import InvalidRoomRequest, ParticipantNotFound, RoomNotFound, RoomUnavailable, WaitTimeout
from ..messages import Record, decode_reply, encode, endpoint
from .base import RoomConnection
from .inbox import EventInbox
from .records import (
    EventBatch,
    JoinRequest,
    MessagesRequest,
    ParticipantInfo,
    ParticipantList,
    ParticipantRef,
    PollRequest,
    ReceivedMessage,
    ReceivedMessages,
    RoomEventType,
    RoomMetadataRequest,
    RoomNames,
    RoomRequest,
    RoomSnapshot,
    SendRequest,
    SetAttributesRequest,
    SetMetadataRequest,
)

ROOM_SERVER_NAME = "rayvisor-rooms"
DEFAULT_NAMESPACE = "rayvisor"


@dataclass(frozen=True)
class LocalRoomSettings:
    """Limits of the embedded room server."""

    max_payload_bytes: int = 64 * 1024
    """Largest text or data message a participant may send."""
    max_attributes_bytes: int = 64 * 1024
    """Largest total size of a participant's attributes (keys + values)."""
    max_inbox_events: int = 10_000
    """Unread events kept per connection (and received messages, for ``messages``); the
    oldest are dropped past this."""
    max_closed_connections: int = 1_024
    """Ended connections kept so their owners can read their last events and messages."""
    max_poll_timeout: float = 30.0
    """Longest a single ``poll`` call may wait; callers loop."""


_MESSAGE_EVENTS = frozenset((RoomEventType.DATA_RECEIVED, RoomEventType.TEXT_RECEIVED, RoomEventType.BYTES_RECEIVED))


class _Connection:
    """One participant's presence in a room, its inbox of events, and the text and data
    it received (kept for drivers' ``messages``)."""

    def __init__(self, room: str, info: ParticipantInfo, max_events: int) -> None:
        self.id = uuid.uuid4().hex
        self.room = room
        self.info = info
        self.inbox = EventInbox(max_events=max_events, room=room, identity=info.identity)
        self.messages: deque[ReceivedMessage] = deque(maxlen=max_events)

    @property
    def closed(self) -> bool:
        return self.inbox.closed

    def push(self, type_: RoomEventType, **fields: Any) -> None:
        event = self.inbox.add(type_, timestamp=time.time(), **fields)
        if event is not None and type_ in _MESSAGE_EVENTS:
            sender = event.participant.identity if event.participant else ""
            self.messages.append(
                ReceivedMessage(sender=sender, topic=event.topic, text=event.text, data=event.data)
            )

    def close(self, reason: int) -> None:
        self.push(RoomEventType.DISCONNECTED, reason=reason)
        self.inbox.close()


@dataclass
class _Room:
    name: str
    metadata: str = ""
    explicit: bool = False
    """Created with ``create_room``: kept when empty (rooms created by a join are not)."""
    participants: dict[str, _Connection] = field(default_factory=dict)


@ray.remote(num_cpus=0, max_restarts=-1)
class LocalRoomServer:
    """Holds every local room; see the module docstring."""

    def __init__(self, settings: LocalRoomSettings | None = None) -> None:
        self._settings = settings or LocalRoomSettings()
        self._rooms: dict[str, _Room] = {}
        self._connections: dict[str, _Connection] = {}
        self._closed: OrderedDict[str, _Connection] = OrderedDict()

    # -- helpers ---------------------------------------------------------------------

    def _room(self, name: str) -> _Room:
        room = self._rooms.get(name)
        if room is None:
            raise RoomNotFound(f"room {name!r} does not exist")
        return room

    def _participant(self, who: ParticipantRef) -> _Connection:
        conn = self._room(who.room).participants.get(who.identity)
        if conn is None:
            raise ParticipantNotFound(f"{who.identity!r} is not in room {who.room!r}")
        return conn

    def _connection(self, connection_id: str) -> _Connection:
        conn = self._connections.get(connection_id) or self._closed.get(connection_id)
        if conn is None:
            raise ParticipantNotFound(f"unknown connection {connection_id!r}")
        return conn

    def _check_attributes(self, attributes: dict[str, str]) -> None:
        size = sum(len(k.encode()) + len(v.encode()) for k, v in attributes.items())
        if size > self._settings.max_attributes_bytes:
            raise InvalidRoomRequest(
                f"attributes of {size} bytes exceed max_attributes_bytes={self._settings.max_attributes_bytes}"
            )

    def _broadcast(self, room: _Room, sender: str | None, type_: RoomEventType, **fields: Any) -> None:
        for identity, conn in room.participants.items():
            if identity != sender:
                conn.push(type_, **fields)

    def _end(self, room: _Room, conn: _Connection, reason: int) -> None:
        """Remove ``conn`` from ``room``, tell the others, and keep its inbox readable."""
        room.participants.pop(conn.info.identity, None)
        conn.close(reason)
        self._connections.pop(conn.id, None)
        self._closed[conn.id] = conn
        while len(self._closed) > self._settings.max_closed_connections:
            self._closed.popitem(last=False)
        self._broadcast(room, None, RoomEventType.PARTICIPANT_DISCONNECTED, participant=conn.info, reason=reason)
        if not room.participants and not room.explicit and not room.metadata:
            self._rooms.pop(room.name, None)

    # -- endpoints -------------------------------------------------------------------

    @endpoint(JoinRequest)
    async def join(self, request: JoinRequest) -> RoomSnapshot:
        """Join (creating the room if needed). A second join with the same identity
        replaces the first, which is disconnected with DUPLICATE_IDENTITY (as LiveKit does)."""
        self._check_attributes(request.participant.attributes)
        room = self._rooms.setdefault(request.room, _Room(name=request.room))
        previous = room.participants.get(request.participant.identity)
        if previous is not None:
            self._end(room, previous, rtc.DisconnectReason.DUPLICATE_IDENTITY)
        conn = _Connection(request.room, request.participant, self._settings.max_inbox_events)
        others = [c.info for c in room.participants.values()]
        self._broadcast(room, None, RoomEventType.PARTICIPANT_CONNECTED, participant=conn.info)
        room.participants[conn.info.identity] = conn
        self._connections[conn.id] = conn
        return RoomSnapshot(
            room=room.name, metadata=room.metadata, connection_id=conn.id, local=conn.info, participants=others
        )

    @endpoint(ParticipantRef)
    async def leave(self, request: ParticipantRef) -> None:
        """Leave the room (CLIENT_INITIATED)."""
        conn = self._participant(request)
        self._end(self._rooms[request.room], conn, rtc.DisconnectReason.CLIENT_INITIATED)

    @endpoint(SetAttributesRequest)
    async def set_attributes(self, request: SetAttributesRequest) -> None:
        """Merge attributes (an empty value deletes the key, as in LiveKit)."""
        conn = self._participant(request.who)
        merged = {**conn.info.attributes, **request.attributes}
        merged = {k: v for k, v in merged.items() if v != ""}
        self._check_attributes(merged)
        changed = {k: v for k, v in request.attributes.items() if conn.info.attributes.get(k, "") != v}
        conn.info = conn.info.model_copy(update={"attributes": merged})
        if changed:
            room = self._rooms[request.who.room]
            self._broadcast(
                room, None, RoomEventType.PARTICIPANT_ATTRIBUTES_CHANGED,
                participant=conn.info, changed_attributes=changed,
            )

    @endpoint(SetMetadataRequest)
    async def set_metadata(self, request: SetMetadataRequest) -> None:
        conn = self._participant(request.who)
        old = conn.info.metadata
        conn.info = conn.info.model_copy(update={"metadata": request.metadata})
        self._broadcast(
            self._rooms[request.who.room], None, RoomEventType.PARTICIPANT_METADATA_CHANGED,
            participant=conn.info, old_metadata=old, new_metadata=request.metadata,
        )

    @endpoint(SendRequest)
    async def send(self, request: SendRequest) -> None:
        """Deliver text (as a text stream) or bytes (as a data packet, or a byte stream when
        ``stream_name`` is given) to the others."""
        if (request.text is None) == (request.data is None):
            raise InvalidRoomRequest("send exactly one of text or data")
        if request.stream_name is not None and request.data is None:
            raise InvalidRoomRequest("a byte stream (stream_name) carries data, not text")
        size = len(request.text.encode()) if request.text is not None else len(request.data or b"")
        size += sum(len(k.encode()) + len(v.encode()) for k, v in request.stream_attributes.items())
        if size > self._settings.max_payload_bytes:
            raise InvalidRoomRequest(
                f"payload of {size} bytes exceeds max_payload_bytes={self._settings.max_payload_bytes}"
            )
        sender = self._participant(request.who)
        room = self._rooms[request.who.room]
        if request.text is not None:
            type_ = RoomEventType.TEXT_RECEIVED
        elif request.stream_name is not None:
            type_ = RoomEventType.BYTES_RECEIVED
        else:
            type_ = RoomEventType.DATA_RECEIVED
        targets = set(request.destination_identities)
        stream_id = uuid.uuid4().hex if type_ != RoomEventType.DATA_RECEIVED else ""
        for identity, conn in room.participants.items():
            if identity == sender.info.identity or (targets and identity not in targets):
                continue
            conn.push(
                type_, participant=sender.info, topic=request.topic,
                text=request.text, data=request.data, stream_id=stream_id,
                stream_name=request.stream_name or "", stream_attributes=request.stream_attributes,
            )

    @endpoint(PollRequest)
    async def poll(self, request: PollRequest) -> EventBatch:
        """Events after ``after_seq`` (acknowledging those up to it); waits up to ``timeout``
        (at most ``max_poll_timeout``) if there are none yet."""
        conn = self._connection(request.connection_id)
        return await conn.inbox.next_events(request.after_seq, min(request.timeout, self._settings.max_poll_timeout))

    @endpoint(MessagesRequest)
    async def messages(self, request: MessagesRequest) -> ReceivedMessages:
        """Text and data the connection received (optionally waiting for ``count`` on ``topic``)."""
        conn = self._connection(request.connection_id)
        deadline = time.monotonic() + min(request.timeout, self._settings.max_poll_timeout)

        def matching() -> list[ReceivedMessage]:
            return [m for m in conn.messages if request.topic is None or m.topic == request.topic]

        while len(matching()) < request.count and not conn.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(
                    f"{conn.info.identity!r} received {len(matching())} of {request.count} messages"
                    f" on topic {request.topic!r} within {request.timeout}s"
                )
            await conn.inbox.changed(remaining)
        return ReceivedMessages(messages=matching())

    @endpoint(RoomMetadataRequest)
    async def create_room(self, request: RoomMetadataRequest) -> None:
        """Create a room (idempotent); sets its metadata if it is new."""
        room = self._rooms.setdefault(request.room, _Room(name=request.room, metadata=request.metadata))
        room.explicit = True

    @endpoint(RoomMetadataRequest)
    async def set_room_metadata(self, request: RoomMetadataRequest) -> None:
        room = self._room(request.room)
        old, room.metadata = room.metadata, request.metadata
        self._broadcast(room, None, RoomEventType.ROOM_METADATA_CHANGED, old_metadata=old, new_metadata=request.metadata)

    @endpoint(RoomRequest)
    async def delete_room(self, request: RoomRequest) -> None:
        """Delete the room: every participant is disconnected with ROOM_DELETED."""
        room = self._room(request.room)
        del self._rooms[request.room]
        for conn in list(room.participants.values()):
            room.participants.pop(conn.info.identity, None)
            conn.close(rtc.DisconnectReason.ROOM_DELETED)
            self._connections.pop(conn.id, None)
            self._closed[conn.id] = conn

    @endpoint(ParticipantRef)
    async def describe(self, request: ParticipantRef) -> RoomSnapshot:
        """The room as an existing participant sees it (no join)."""
        conn = self._participant(request)
        room = self._rooms[request.room]
        others = [c.info for c in room.participants.values() if c is not conn]
        return RoomSnapshot(
            room=room.name, metadata=room.metadata, connection_id=conn.id, local=conn.info, participants=others
        )

    @endpoint(RoomRequest)
    async def participants(self, request: RoomRequest) -> ParticipantList:
        return ParticipantList(participants=[c.info for c in self._room(request.room).participants.values()])

    @endpoint(RoomRequest)
    async def rooms(self, request: RoomRequest) -> RoomNames:
        """Names of all rooms (the request's room name is ignored)."""
        return RoomNames(names=sorted(self._rooms))


# --------------------------------------------------------------------------- access


def room_server(namespace: str = DEFAULT_NAMESPACE, *, create: bool = False,
                settings: LocalRoomSettings | None = None) -> Any:
    """The namespace's room server; created on this driver's node when ``create``."""
    if create:
        return LocalRoomServer.options(
            name=ROOM_SERVER_NAME,
            max_concurrency=10_000,  # every connected job holds one long-poll open
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=False
            ),
        ).remote(settings)
    try:
        return ray.get_actor(ROOM_SERVER_NAME, namespace=namespace)
    except ValueError:
        raise RoomNotFound(
            f"no local room server in namespace {namespace!r}; start one with rayvisor.serve() or rayvisor.local_rooms()"
        ) from None


def evict_participant(namespace: str, room: str, identity: str) -> None:
    """Fire-and-forget: take ``identity`` out of ``room`` if it is still there (a job that was
    killed or crashed never left). Missing rooms, participants or servers are fine."""
    try:
        server = ray.get_actor(ROOM_SERVER_NAME, namespace=namespace)
    except ValueError:
        return
    server.leave.remote(encode(ParticipantRef(room=room, identity=identity)))


class LocalRoomConnection(RoomConnection):
    """A job's connection to a local room (the ``RoomConnection`` of this backend). It has
    none of the optional capabilities: no media, and every text stream arrives as an event."""

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, *, call_timeout: float = 10.0) -> None:
        self._namespace = namespace
        self._call_timeout = call_timeout
        self._server: Any = None
        self._who: ParticipantRef | None = None
        self._connection_id = ""

    async def _call(self, method: str, request: Record, *reply: type, timeout: float | None = None) -> Any:
        limit = timeout if timeout is not None else self._call_timeout
        ref = getattr(self._server, method).remote(encode(request))
        try:
            data = await asyncio.wait_for(ref, limit)
        except asyncio.TimeoutError:
            raise RoomUnavailable(f"the local room server did not answer {method} within {limit}s") from None
        except RayActorError as err:
            raise RoomUnavailable(f"the local room server is unavailable: {err}") from None
        return decode_reply(data, *reply)

    async def connect(self, room: str, local: ParticipantInfo, auto_subscribe: str = "subscribe_all") -> RoomSnapshot:
        self._server = room_server(self._namespace)
        # Known before the join is sent, so a disconnect racing the join still leaves.
        self._who = ParticipantRef(room=room, identity=local.identity)
        snapshot = await self._call("join", JoinRequest(room=room, participant=local), RoomSnapshot)
        self._connection_id = snapshot.connection_id
        return snapshot

    async def next_events(self, after_seq: int, timeout: float) -> EventBatch:
        request = PollRequest(connection_id=self._connection_id, after_seq=after_seq, timeout=timeout)
        return await self._call("poll", request, EventBatch, timeout=timeout + self._call_timeout)

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        await self._call("set_attributes", SetAttributesRequest(who=self._who, attributes=attributes))

    async def set_metadata(self, metadata: str) -> None:
        await self._call("set_metadata", SetMetadataRequest(who=self._who, metadata=metadata))

    async def send(self, *, topic: str, text: str | None, data: bytes | None,
                   destination_identities: list[str], stream_name: str | None = None,
                   stream_attributes: dict[str, str] | None = None) -> None:
        request = SendRequest(
            who=self._who, topic=topic, text=text, data=data, destination_identities=destination_identities,
            stream_name=stream_name, stream_attributes=dict(stream_attributes or {}),
        )
        await self._call("send", request)

    async def disconnect(self) -> None:
        if self._who is None:
            return
        who, self._who = self._who, None
        try:
            await self._call("leave", who)
        except (ParticipantNotFound, RoomNotFound):
            pass  # already gone: replaced, or the room was deleted

    async def delete_room(self) -> None:
        if self._who is None:
            raise RoomNotFound("not connected to a room")
        await self._call("delete_room", RoomRequest(room=self._who.room))


# --------------------------------------------------------------------------- drivers


class LocalParticipant:
    """A simulated participant, driven synchronously from a driver (tests, demos, CLI)."""

    def __init__(self, rooms: "LocalRooms", room: str, identity: str, connection_id: str) -> None:
        self._rooms = rooms
        self.room = room
        self.identity = identity
        self.connection_id = connection_id

    @property
    def _who(self) -> ParticipantRef:
        return ParticipantRef.build(room=self.room, identity=self.identity)

    def set_attributes(self, attributes: dict[str, str]) -> None:
        self._rooms._call("set_attributes", SetAttributesRequest.build(who=self._who, attributes=attributes))

    def set_metadata(self, metadata: str) -> None:
        self._rooms._call("set_metadata", SetMetadataRequest.build(who=self._who, metadata=metadata))

    def send_text(self, text: str, *, topic: str = "", destination_identities: list[str] | None = None) -> None:
        self._rooms._call("send", SendRequest.build(
            who=self._who, topic=topic, text=text, destination_identities=destination_identities or []))

    def send_bytes(self, data: bytes, *, name: str = "unknown", topic: str = "",
                   destination_identities: list[str] | None = None) -> None:
        """Send ``data`` as a byte stream named ``name`` (``register_byte_stream_handler`` receives it)."""
        self._rooms._call("send", SendRequest.build(
            who=self._who, topic=topic, data=bytes(data), stream_name=name,
            destination_identities=destination_identities or []))

    def publish_data(self, payload: bytes | str, *, topic: str = "",
                     destination_identities: list[str] | None = None) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self._rooms._call("send", SendRequest.build(
            who=self._who, topic=topic, data=data, destination_identities=destination_identities or []))

    def messages(self) -> list[tuple[str, str, str | bytes]]:
        """Everything this participant received so far: ``(sender_identity, topic, text_or_bytes)``."""
        return self.wait_for_messages(0)

    def wait_for_messages(self, count: int, *, topic: str | None = None,
                          timeout: float = 10.0) -> list[tuple[str, str, str | bytes]]:
        """Wait until ``count`` messages (on ``topic``, if given) arrived; ``WaitTimeout`` otherwise."""
        reply = self._rooms._call(
            "messages",
            MessagesRequest.build(connection_id=self.connection_id, count=count, topic=topic, timeout=timeout),
            ReceivedMessages,
            timeout=timeout + self._rooms.call_timeout,
        )
        return [(m.sender, m.topic, m.payload) for m in reply.messages]

    def leave(self) -> None:
        self._rooms._call("leave", self._who)


class LocalRooms:
    """Driver-side access to the local room backend: ``rayvisor.local_rooms()``."""

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, *, call_timeout: float = 10.0) -> None:
        self.namespace = namespace
        self.call_timeout = call_timeout
        self._server = room_server(namespace, create=True)

    def _call(self, method: str, request: Record, *reply: type, timeout: float | None = None) -> Any:
        limit = timeout or self.call_timeout
        try:
            data = ray.get(getattr(self._server, method).remote(encode(request)), timeout=limit)
        except GetTimeoutError:
            raise RoomUnavailable(f"the local room server did not answer {method} within {limit}s") from None
        except RayActorError as err:
            raise RoomUnavailable(f"the local room server is unavailable: {err}") from None
        return decode_reply(data, *reply)

    def join(self, room: str, identity: str, *, kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
             name: str = "", attributes: dict[str, str] | None = None, metadata: str = "") -> LocalParticipant:
        """Join ``room`` as a simulated participant (the room is created if needed)."""
        info = ParticipantInfo.build(
            identity=identity, name=name or identity, kind=kind, attributes=attributes or {}, metadata=metadata
        )
        request = JoinRequest.build(room=room, participant=info)
        snapshot = self._call("join", request, RoomSnapshot)
        return LocalParticipant(self, room, identity, snapshot.connection_id)

    def participant(self, room: str, identity: str) -> LocalParticipant:
        """A handle on a participant already in the room (e.g. one joined from the CLI)."""
        snapshot = self._call("describe", ParticipantRef.build(room=room, identity=identity), RoomSnapshot)
        return LocalParticipant(self, room, identity, snapshot.connection_id)

    def participants(self, room: str) -> list[ParticipantInfo]:
        return self._call("participants", RoomRequest.build(room=room), ParticipantList).participants

    def create_room(self, room: str, metadata: str = "") -> None:
        self._call("create_room", RoomMetadataRequest.build(room=room, metadata=metadata))

    def set_room_metadata(self, room: str, metadata: str) -> None:
        self._call("set_room_metadata", RoomMetadataRequest.build(room=room, metadata=metadata))

    def delete_room(self, room: str) -> None:
        self._call("delete_room", RoomRequest.build(room=room))

    def list_rooms(self) -> list[str]:
        return self._call("rooms", RoomRequest(room="*"), RoomNames).names
