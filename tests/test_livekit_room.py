"""The LiveKit room backend: rtc events become the facade's LiveKit events, failures are clear.

No media server can run here, so these drive ``LiveKitRoomConnection`` with a scripted
stand-in for ``rtc.Room`` (livekit's own ``EventEmitter``, so ``on()`` behaves as rtc's),
in plain asyncio: what is checked is the mapping and the error handling, not WebRTC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from livekit import rtc
from livekit.rtc.event_emitter import EventEmitter

from rayvisor import Cause, JobState, WorkerOptions
from rayvisor.actors.job_actor import JobRunner
from rayvisor.agents.job import JobProcess, LiveKitAccess
from rayvisor.errors import ConnectFailed, LiveKitNotConfigured
from rayvisor.messages import JobStart
from rayvisor.rooms import livekit as livekit_backend
from rayvisor.rooms.livekit import LiveKitRoomConnection

STANDARD = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
SIP = rtc.ParticipantKind.PARTICIPANT_KIND_SIP
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


class FakeParticipant:
    def __init__(self, identity: str, kind: int = STANDARD, **fields: Any) -> None:
        self.identity, self.kind, self.sid = identity, kind, f"PA_{identity}"
        self.name = fields.get("name", "")
        self.attributes = dict(fields.get("attributes", {}))
        self.metadata = fields.get("metadata", "")
        self.calls: list[tuple[str, Any]] = []

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        self.calls.append(("set_attributes", attributes))

    async def set_metadata(self, metadata: str) -> None:
        self.calls.append(("set_metadata", metadata))

    async def publish_data(self, payload: bytes, *, reliable: bool = True, destination_identities: list[str] = [],
                           topic: str = "") -> None:
        self.calls.append(("publish_data", (payload, topic, destination_identities)))

    async def send_text(self, text: str, *, destination_identities: list[str] | None = None, topic: str = "",
                        **_: Any) -> None:
        self.calls.append(("send_text", (text, topic, destination_identities)))


class FakePublication:
    def __init__(self, kind: int) -> None:
        self.kind = kind
        self.subscribed = False

    def set_subscribed(self, subscribed: bool) -> None:
        self.subscribed = subscribed


class FakeTextReader:
    def __init__(self, text: str, topic: str) -> None:
        self._text = text
        self.info = rtc.TextStreamInfo(stream_id="TS_1", mime_type="text/plain", topic=topic, timestamp=1000,
                                       size=len(text), attributes={}, attachments=[])

    async def read_all(self) -> str:
        return self._text


class ScriptedRoom(EventEmitter):
    """What ``connect`` does is set per test: join, raise, or never answer."""

    behaviour = "join"
    instances: list["ScriptedRoom"] = []

    def __init__(self) -> None:
        super().__init__()
        self.local_participant = FakeParticipant("agent-RJ_1", AGENT)
        self.remote_participants: dict[str, FakeParticipant] = {"alice": FakeParticipant("alice", attributes={"a": "1"})}
        self.metadata = "room-meta"
        self.name = "support"
        self.connected_with: tuple[str, str, rtc.RoomOptions] | None = None
        self.text_handlers: dict[str, Any] = {}
        self.disconnects = 0
        ScriptedRoom.instances.append(self)

    async def connect(self, url: str, token: str, options: rtc.RoomOptions = rtc.RoomOptions()) -> None:
        if self.behaviour == "refuse":
            raise rtc.ConnectError("engine: signal failure: 401 Unauthorized")
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        self.connected_with = (url, token, options)

    async def disconnect(self) -> None:
        self.disconnects += 1

    def register_text_stream_handler(self, topic: str, handler: Any) -> None:
        self.text_handlers[topic] = handler

    def join(self, participant: FakeParticipant) -> None:
        self.remote_participants[participant.identity] = participant
        self.emit("participant_connected", participant)

    def leave(self, identity: str) -> None:
        self.emit("participant_disconnected", self.remote_participants.pop(identity))


@pytest.fixture
def scripted() -> Iterator[type[ScriptedRoom]]:
    ScriptedRoom.behaviour = "join"
    ScriptedRoom.instances = []
    livekit_backend.use_room_factory(ScriptedRoom)
    yield ScriptedRoom
    livekit_backend.use_room_factory(None)


def job_start(**fields: Any) -> JobStart:
    return JobStart(job_id="RJ_1", room="support", metadata="{}", agent_name="", dispatch_id="", worker_id="RW_1",
                    identity="agent-RJ_1", url="ws://lk.example", token="room-token", api_token="api-token", **fields)


class Reports:
    def __init__(self) -> None:
        self.shutdowns: list[Any] = []

    def shutdown_started(self, record: Any) -> None:
        self.shutdowns.append(record)

    def participants_changed(self, record: Any) -> None:
        pass


def runner_for(entrypoint: Any, *, connect_timeout: float = 5.0, **options: Any) -> JobRunner:
    opts = WorkerOptions(entrypoint_fnc=entrypoint, room_connect_timeout=connect_timeout, ws_url="", api_key="",
                         api_secret="", **options)
    start = job_start()
    connection = LiveKitRoomConnection(start.url, start.token, connect_timeout=connect_timeout, call_timeout=5.0)
    return JobRunner(opts, start, JobProcess(), connection, Reports(),
                     livekit=LiveKitAccess(url=start.url, api_token=start.api_token))


async def run_until_done(runner: JobRunner, timeout: float = 10.0):
    runner.start()
    return await asyncio.wait_for(runner.wait_done(), timeout)


EVENTUALLY_TIMEOUT = 5.0


async def eventually(predicate, timeout: float = EVENTUALLY_TIMEOUT) -> None:
    """Yield to the loop until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def test_connect_joins_with_the_jobs_url_and_token_and_sees_who_is_there(scripted: type[ScriptedRoom]) -> None:
    seen: dict[str, Any] = {}

    async def entrypoint(ctx):
        await ctx.connect(auto_subscribe=rayvisor_auto("subscribe_none"))
        seen["remote"] = {p.identity: (p.kind, p.attributes) for p in ctx.room.remote_participants.values()}
        seen["metadata"] = ctx.room.metadata
        seen["local"] = ctx.room.local_participant.identity
        seen["rtc_room"] = ctx.room.rtc_room
        ctx.shutdown("done")

    async def main():
        return await run_until_done(runner_for(entrypoint))

    outcome = asyncio.run(main())
    room = scripted.instances[0]
    url, token, options = room.connected_with
    assert (url, token, options.auto_subscribe) == ("ws://lk.example", "room-token", False)
    assert seen == {"remote": {"alice": (STANDARD, {"a": "1"})}, "metadata": "room-meta", "local": "agent-RJ_1",
                    "rtc_room": room}
    assert (outcome.state, outcome.cause) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN)
    assert room.disconnects == 1


def rayvisor_auto(value: str):
    from rayvisor import AutoSubscribe

    return AutoSubscribe(value)


def test_rtc_events_reach_the_entrypoint_with_livekit_names_and_one_object_per_identity(
        scripted: type[ScriptedRoom]) -> None:
    events: list[tuple] = []

    async def entrypoint(ctx):
        room = ctx.room
        room.on("participant_connected", lambda p: events.append(("connected", p.identity, p.kind)))
        room.on("participant_attributes_changed",
                lambda changed, p: events.append(("attributes", p.identity, changed, p is room.remote_participants[p.identity])))
        room.on("participant_metadata_changed", lambda p, old, new: events.append(("metadata", p.identity, old, new)))
        room.on("room_metadata_changed", lambda old, new: events.append(("room_metadata", old, new)))
        room.on("data_received", lambda packet: events.append(("data", packet.data, packet.topic,
                                                               packet.participant.identity)))
        room.on("track_subscribed", lambda track, publication, p: events.append(
            ("track", track, p is room.remote_participants["bob"])))
        room.on("participant_disconnected", lambda p: events.append(("disconnected", p.identity)))
        await ctx.connect()
        await asyncio.Event().wait()

    async def main():
        runner = runner_for(entrypoint, end_when="never")
        runner.start()
        await eventually(runner.ctx.room.isconnected)
        rtc_room = scripted.instances[0]
        bob = FakeParticipant("bob", SIP, name="Bob")
        rtc_room.join(bob)
        bob.attributes["mood"] = "ok"
        rtc_room.emit("participant_attributes_changed", {"mood": "ok"}, bob)
        rtc_room.emit("participant_metadata_changed", bob, "", "vip")
        rtc_room.emit("room_metadata_changed", "room-meta", "new")
        rtc_room.emit("data_received", rtc.DataPacket(data=b"hi", kind=rtc.DataPacketKind.KIND_RELIABLE,
                                                      participant=bob, topic="chat"))
        rtc_room.emit("track_subscribed", "audio-track", FakePublication(rtc.TrackKind.KIND_AUDIO), bob)
        rtc_room.leave("bob")
        await eventually(lambda: ("disconnected", "bob") in events)
        runner.request_shutdown(Cause.USER_SHUTDOWN, "test over")
        return await asyncio.wait_for(runner.wait_done(), 10)

    asyncio.run(main())
    assert events == [
        ("connected", "bob", SIP),
        ("attributes", "bob", {"mood": "ok"}, True),
        ("metadata", "bob", "", "vip"),
        ("room_metadata", "room-meta", "new"),
        ("data", b"hi", "chat", "bob"),
        ("track", "audio-track", True),
        ("disconnected", "bob"),
    ]


def test_the_last_standard_participant_leaving_ends_the_job_room_empty(scripted: type[ScriptedRoom]) -> None:
    async def entrypoint(ctx):
        await ctx.connect()
        await asyncio.Event().wait()

    async def main():
        runner = runner_for(entrypoint)
        runner.start()
        await eventually(runner.ctx.room.isconnected)
        scripted.instances[0].leave("alice")
        return await asyncio.wait_for(runner.wait_done(), 10)

    outcome = asyncio.run(main())
    assert (outcome.state, outcome.cause) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY)


def test_room_deleted_by_the_server_ends_the_job_room_deleted(scripted: type[ScriptedRoom]) -> None:
    async def entrypoint(ctx):
        await ctx.connect()
        await asyncio.Event().wait()

    async def main():
        runner = runner_for(entrypoint)
        runner.start()
        await eventually(runner.ctx.room.isconnected)
        scripted.instances[0].emit("disconnected", rtc.DisconnectReason.ROOM_DELETED)
        return await asyncio.wait_for(runner.wait_done(), 10)

    outcome = asyncio.run(main())
    assert (outcome.state, outcome.cause) == (JobState.SUCCEEDED, Cause.ROOM_DELETED)


def test_local_participant_actions_go_to_the_real_room(scripted: type[ScriptedRoom]) -> None:
    async def entrypoint(ctx):
        await ctx.connect()
        local = ctx.room.local_participant
        await local.set_attributes({"state": "listening"})
        await local.set_metadata("m")
        await local.send_text("hello", topic="chat", destination_identities=["alice"])
        await local.publish_data(b"\x00\x01", topic="bin")
        ctx.shutdown()

    asyncio.run(run_until_done(runner_for(entrypoint)))
    assert scripted.instances[0].local_participant.calls == [
        ("set_attributes", {"state": "listening"}),
        ("set_metadata", "m"),
        ("send_text", ("hello", "chat", ["alice"])),
        ("publish_data", (b"\x00\x01", "bin", [])),
    ]


def test_text_streams_reach_handlers_registered_before_connect(scripted: type[ScriptedRoom]) -> None:
    received: list[tuple[str, str]] = []

    async def entrypoint(ctx):
        async def on_text(reader, identity):
            received.append((await reader.read_all(), identity))

        ctx.room.register_text_stream_handler("chat", lambda reader, identity: asyncio.ensure_future(on_text(reader, identity)))
        await ctx.connect()
        await asyncio.Event().wait()

    async def main():
        runner = runner_for(entrypoint, end_when="never")
        runner.start()
        await eventually(runner.ctx.room.isconnected)
        rtc_room = scripted.instances[0]
        rtc_room.text_handlers["chat"](FakeTextReader("hi agent", "chat"), "alice")
        await eventually(lambda: received)
        runner.request_shutdown(Cause.USER_SHUTDOWN)
        await asyncio.wait_for(runner.wait_done(), 10)

    asyncio.run(main())
    assert received == [("hi agent", "alice")]


def test_audio_only_subscribes_to_audio_tracks_only(scripted: type[ScriptedRoom]) -> None:
    audio, video = FakePublication(rtc.TrackKind.KIND_AUDIO), FakePublication(rtc.TrackKind.KIND_VIDEO)
    early_audio, early_video = FakePublication(rtc.TrackKind.KIND_AUDIO), FakePublication(rtc.TrackKind.KIND_VIDEO)
    FakeParticipant.track_publications = {"TR_a": early_audio, "TR_v": early_video}  # published before we joined

    async def entrypoint(ctx):
        await ctx.connect(auto_subscribe=rayvisor_auto("audio_only"))
        await asyncio.Event().wait()

    async def main():
        runner = runner_for(entrypoint, end_when="never")
        runner.start()
        await eventually(runner.ctx.room.isconnected)
        rtc_room = scripted.instances[0]
        alice = rtc_room.remote_participants["alice"]
        rtc_room.emit("track_published", audio, alice)
        rtc_room.emit("track_published", video, alice)
        runner.request_shutdown(Cause.USER_SHUTDOWN)
        await asyncio.wait_for(runner.wait_done(), 10)

    try:
        asyncio.run(main())
    finally:
        del FakeParticipant.track_publications
    assert (audio.subscribed, video.subscribed, early_audio.subscribed, early_video.subscribed) == (True, False, True, False)


@pytest.mark.parametrize("behaviour, message", [("refuse", "401 Unauthorized"), ("hang", "room_connect_timeout=0.3s")])
def test_a_failed_connect_fails_the_job_with_connect_failed(scripted: type[ScriptedRoom], behaviour: str,
                                                            message: str) -> None:
    scripted.behaviour = behaviour
    caught: list[BaseException] = []

    async def entrypoint(ctx):
        try:
            await ctx.connect()
        except ConnectFailed as err:
            caught.append(err)
            raise

    outcome = asyncio.run(run_until_done(runner_for(entrypoint, connect_timeout=0.3)))
    assert (outcome.state, outcome.cause) == (JobState.FAILED, Cause.CONNECT_FAILED)
    assert message in outcome.error and len(caught) == 1
    assert not scripted.instances[0].connected_with


def test_ctx_api_exists_only_with_livekit_and_authenticates_with_the_jobs_token(scripted: type[ScriptedRoom]) -> None:
    seen: dict[str, Any] = {}

    async def entrypoint(ctx):
        seen["header"] = ctx.api.room._auth_header(None)
        ctx.shutdown()

    asyncio.run(run_until_done(runner_for(entrypoint)))
    assert seen["header"] == {"authorization": "Bearer api-token"}

    local = JobStart(job_id="RJ_2", room="r", metadata="", agent_name="", dispatch_id="", worker_id="w", identity="a")
    opts = WorkerOptions(entrypoint_fnc=entrypoint, ws_url="", api_key="", api_secret="")
    runner = JobRunner(opts, local, JobProcess(), LiveKitRoomConnection("", "", connect_timeout=1, call_timeout=1),
                       Reports())
    with pytest.raises(LiveKitNotConfigured):
        runner.ctx.api
