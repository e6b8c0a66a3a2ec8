"""Room backends declare their optional capabilities as typed protocols (``rayvisor.rooms.base``),
each implements exactly what it declares, and the room facade goes by the declaration."""

from __future__ import annotations

from typing import Any

import pytest

from rayvisor.agents.room import Room
from rayvisor.rooms import livekit as livekit_backend
from rayvisor.rooms.base import HasRtcRoom, HoldsNativeEvents, PreparesRtcRoom, RoomConnection, WatchesTextTopics
from rayvisor.rooms.livekit import LiveKitRoomConnection
from rayvisor.rooms.local import LocalRoomConnection
from rayvisor.rooms.records import ParticipantInfo, RoomEvent, RoomEventType, RoomSnapshot
from rayvisor.rooms.relay import RelayConnection

CAPABILITIES = (HasRtcRoom, PreparesRtcRoom, WatchesTextTopics, HoldsNativeEvents)

CLAIMS: dict[type, set[type]] = {
    LocalRoomConnection: set(),
    RelayConnection: set(),
    LiveKitRoomConnection: {HasRtcRoom, PreparesRtcRoom, WatchesTextTopics, HoldsNativeEvents},
}
"""What each backend provides, as rooms/base.py's table says."""

CALL_TIMEOUT = 1.0
"""Call timeout of the connections built here (none of them makes a call)."""


def members(protocol: type) -> set[str]:
    """The public methods and properties a protocol asks for."""
    return {name for name, value in vars(protocol).items()
            if not name.startswith("_") and (callable(value) or isinstance(value, property))}


def owner(cls: type, name: str) -> type | None:
    """The class in ``cls``'s method order that defines ``name``."""
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def connection(cls: type) -> Any:
    if cls is LocalRoomConnection:
        return LocalRoomConnection("caps", call_timeout=CALL_TIMEOUT)
    if cls is RelayConnection:
        snapshot = RoomSnapshot(room="r", metadata="", connection_id="c", local=ParticipantInfo(identity="agent"),
                                participants=[])
        return RelayConnection(None, snapshot, call_timeout=CALL_TIMEOUT)
    return LiveKitRoomConnection("", "", connect_timeout=CALL_TIMEOUT, call_timeout=CALL_TIMEOUT)


@pytest.mark.parametrize("backend", list(CLAIMS), ids=lambda c: c.__name__)
def test_a_backend_declares_exactly_the_capabilities_it_claims(backend: type) -> None:
    assert RoomConnection in backend.__mro__
    assert {p for p in CAPABILITIES if p in backend.__mro__} == CLAIMS[backend]


@pytest.mark.parametrize("backend", list(CLAIMS), ids=lambda c: c.__name__)
def test_a_backend_implements_everything_it_declares_and_nothing_it_does_not(backend: type) -> None:
    """A declared member left to the protocol's stub would silently do nothing; an undeclared
    one would make ``isinstance`` match structurally behind the declaration's back."""
    for protocol in (RoomConnection, *CLAIMS[backend]):
        stubs = {name for name in members(protocol) if owner(backend, name).__module__ == "rayvisor.rooms.base"}
        assert not stubs, f"{backend.__name__} leaves {sorted(stubs)} of {protocol.__name__} unimplemented"
    for protocol in set(CAPABILITIES) - CLAIMS[backend]:
        present = {name for name in members(protocol) if owner(backend, name) is not None}
        assert not present, f"{backend.__name__} has {sorted(present)} of {protocol.__name__} without declaring it"


@pytest.mark.parametrize("backend", list(CLAIMS), ids=lambda c: c.__name__)
def test_isinstance_of_a_capability_holds_for_exactly_the_claimed_ones(backend: type) -> None:
    conn = connection(backend)
    assert {p for p in CAPABILITIES if isinstance(conn, p)} == CLAIMS[backend]


# --------------------------------------------------------------------------- the facade


class _StandIn:
    """A connection that declares nothing (the local and relay backends' case)."""


class _MediaStandIn(HasRtcRoom, WatchesTextTopics, HoldsNativeEvents):
    """A connection with the LiveKit backend's capabilities, recording what the facade asks."""

    def __init__(self) -> None:
        self.room = object()
        self.topics: list[str] = []
        self.native = {7: ("active_speakers_changed", (["speaker"],))}

    @property
    def rtc_room(self) -> Any:
        return self.room

    def watch_text_topic(self, topic: str) -> None:
        self.topics.append(topic)

    def take_native(self, seq: int) -> tuple[str, tuple[Any, ...]] | None:
        return self.native.pop(seq, None)


def test_the_facade_uses_a_capability_only_where_the_connection_declares_it() -> None:
    plain, media = Room("r"), Room("r")
    plain._connection, media._connection = _StandIn(), _MediaStandIn()  # type: ignore[assignment]
    plain.register_text_stream_handler("chat", lambda reader, identity: None)
    media.register_text_stream_handler("chat", lambda reader, identity: None)
    speakers: list[Any] = []
    plain.on("active_speakers_changed", speakers.append)
    media.on("active_speakers_changed", speakers.append)
    native = RoomEvent(seq=7, type=RoomEventType.NATIVE, topic="active_speakers_changed")

    plain._apply(native)
    media._apply(native)
    media._apply(native)  # taken once

    assert plain.rtc_room is None and media.rtc_room is media._connection.room
    assert media._connection.topics == ["chat"]
    assert speakers == [["speaker"]]


def test_the_livekit_connection_hands_out_one_prepared_rtc_room() -> None:
    conn = LiveKitRoomConnection("", "", connect_timeout=CALL_TIMEOUT, call_timeout=CALL_TIMEOUT)
    made: list[Any] = []

    class Prepared:
        def __init__(self) -> None:
            made.append(self)

        def on(self, event: str, callback: Any) -> None:
            pass

    livekit_backend.use_room_factory(Prepared)
    try:
        first, second = conn.prepare_rtc_room(), conn.prepare_rtc_room()
    finally:
        livekit_backend.use_room_factory(None)
    assert first is second and made == [first]
    assert conn.rtc_room is None  # not connected yet
