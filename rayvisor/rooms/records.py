"""Control-plane records of the room backends (same envelope as ``rayvisor.messages``)."""

from __future__ import annotations

import enum

from livekit import rtc
from pydantic import Field, field_validator

from typing import ClassVar

from ..errors import InvalidRoomRequest, RayvisorError
from ..messages import MAX_IDENTITY_CHARS, MAX_ROOM_NAME_CHARS, Record, register

RoomName = str
_KINDS = frozenset(value for _, value in rtc.ParticipantKind.items())


class RoomRecord(Record):
    """A room backend record: invalid ones are ``InvalidRoomRequest``."""

    invalid_error: ClassVar[type[RayvisorError]] = InvalidRoomRequest


class RoomEventType(str, enum.Enum):
    """Room events, named as livekit.rtc names them."""

    PARTICIPANT_CONNECTED = "participant_connected"
    PARTICIPANT_DISCONNECTED = "participant_disconnected"
    PARTICIPANT_ATTRIBUTES_CHANGED = "participant_attributes_changed"
    PARTICIPANT_METADATA_CHANGED = "participant_metadata_changed"
    ROOM_METADATA_CHANGED = "room_metadata_changed"
    DATA_RECEIVED = "data_received"
    TEXT_RECEIVED = "text_received"
    """A text stream (``send_text``); delivered to ``register_text_stream_handler`` handlers."""
    BYTES_RECEIVED = "bytes_received"
    """A byte stream (``send_bytes``); delivered to ``register_byte_stream_handler`` handlers."""
    DISCONNECTED = "disconnected"
    NATIVE = "native"
    """An rtc event whose arguments are rtc objects (LiveKit backend only; ``topic`` names it)."""


@register
class ParticipantInfo(RoomRecord):
    identity: str = Field(min_length=1, max_length=MAX_IDENTITY_CHARS)
    name: str = ""
    kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
    attributes: dict[str, str] = {}
    metadata: str = ""

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: int) -> int:
        if kind not in _KINDS:
            raise ValueError(f"unknown participant kind {kind}; use rtc.ParticipantKind values")
        return kind


@register
class RoomEvent(RoomRecord):
    seq: int
    type: RoomEventType = Field(strict=False)
    participant: ParticipantInfo | None = None
    changed_attributes: dict[str, str] = {}
    old_metadata: str = ""
    new_metadata: str = ""
    topic: str = ""
    text: str | None = None
    data: bytes | None = None
    reason: int = 0
    """For ``disconnected``: an ``rtc.DisconnectReason`` value."""
    stream_id: str = ""
    stream_name: str = ""
    """For ``bytes_received``: the byte stream's name (a file name)."""
    stream_attributes: dict[str, str] = {}
    """For text and byte streams: the attributes the sender gave the stream."""
    timestamp: float = 0.0


@register
class JoinRequest(RoomRecord):
    room: RoomName = Field(min_length=1, max_length=MAX_ROOM_NAME_CHARS)
    participant: ParticipantInfo


@register
class RoomSnapshot(RoomRecord):
    """What a participant sees on joining: the room and everybody else in it."""

    room: RoomName
    metadata: str
    connection_id: str
    local: ParticipantInfo
    participants: list[ParticipantInfo]


@register
class ParticipantRef(RoomRecord):
    room: RoomName = Field(min_length=1, max_length=MAX_ROOM_NAME_CHARS)
    identity: str = Field(min_length=1, max_length=MAX_IDENTITY_CHARS)


@register
class SetAttributesRequest(RoomRecord):
    who: ParticipantRef
    attributes: dict[str, str]


@register
class SetMetadataRequest(RoomRecord):
    who: ParticipantRef
    metadata: str


@register
class SendRequest(RoomRecord):
    """Text (a text stream) or bytes (a data packet, or a byte stream when ``stream_name``
    is given) from one participant."""

    who: ParticipantRef
    topic: str = ""
    text: str | None = None
    data: bytes | None = None
    destination_identities: list[str] = []
    stream_name: str | None = None
    stream_attributes: dict[str, str] = {}


@register
class PollRequest(RoomRecord):
    connection_id: str
    after_seq: int = Field(ge=0)
    timeout: float = Field(ge=0)


@register
class EventBatch(RoomRecord):
    events: list[RoomEvent]
    closed: bool
    """True once the connection has ended (left, replaced, or the room was deleted)."""


@register
class MessagesRequest(RoomRecord):
    connection_id: str
    count: int = Field(default=0, ge=0)
    topic: str | None = None
    timeout: float = Field(default=0.0, ge=0)


@register
class ReceivedMessage(RoomRecord):
    sender: str
    topic: str
    text: str | None = None
    data: bytes | None = None

    @property
    def payload(self) -> str | bytes:
        return self.text if self.text is not None else (self.data or b"")


@register
class ReceivedMessages(RoomRecord):
    messages: list[ReceivedMessage]


@register
class RoomRequest(RoomRecord):
    room: RoomName = Field(min_length=1, max_length=MAX_ROOM_NAME_CHARS)


@register
class RoomMetadataRequest(RoomRecord):
    room: RoomName = Field(min_length=1, max_length=MAX_ROOM_NAME_CHARS)
    metadata: str


@register
class ParticipantList(RoomRecord):
    participants: list[ParticipantInfo]


@register
class RoomNames(RoomRecord):
    names: list[str]


class RelayAction(str, enum.Enum):
    """What a participant actor asks its job to do on the room connection it shares."""

    SEND = "send"
    SET_ATTRIBUTES = "set_attributes"
    SET_METADATA = "set_metadata"
    DELETE_ROOM = "delete_room"
    SHUTDOWN = "shutdown"


@register
class RelayRequest(RoomRecord):
    action: RelayAction = Field(strict=False)
    topic: str = ""
    text: str | None = None
    data: bytes | None = None
    destination_identities: list[str] = []
    stream_name: str | None = None
    stream_attributes: dict[str, str] = {}
    attributes: dict[str, str] = {}
    metadata: str = ""
    reason: str = ""


@register
class EventDelivery(RoomRecord):
    """Job actor -> participant actor: the ``index``-th batch of events for its participant
    (numbered so the child applies them in order even if Ray runs two deliveries out of order)."""

    index: int = Field(ge=1)
    events: list[RoomEvent]
