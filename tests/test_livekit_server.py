"""The test-support LiveKit server and rtc stand-in, against the real livekit-api client (no Ray)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from livekit import api, rtc
from livekit.protocol import agent, agent_dispatch, models
from livekit.protocol import room as room_pb

from livekit_server import LocalLiveKitServer
from rtc_stand_in import StandInRoom


@pytest.fixture
def server() -> Iterator[LocalLiveKitServer]:
    with LocalLiveKitServer(availability_timeout=2.0) as srv:
        yield srv


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Async polling (``server.wait_for`` would block the test's own loop)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return value


def agent_token(server: LocalLiveKitServer, secret: str | None = None) -> str:
    grants = api.VideoGrants(agent=True)
    return api.AccessToken(server.api_key, secret or server.api_secret).with_grants(grants).to_jwt()


def room_token(server: LocalLiveKitServer, room: str, identity: str, **claims: Any) -> str:
    grants = api.VideoGrants(room_join=True, room=room, can_update_own_metadata=True)
    tok = api.AccessToken(server.api_key, server.api_secret).with_identity(identity).with_grants(grants)
    if "attributes" in claims:
        tok.with_attributes(claims["attributes"])
    if "kind" in claims:
        tok.with_kind(claims["kind"])
    return tok.to_jwt()


class RawWorker:
    """A hand-rolled agent worker speaking the protobuf protocol on /agent."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session, self.ws = session, ws

    @classmethod
    async def connect(cls, server: LocalLiveKitServer, token: str | None = None) -> RawWorker:
        session = aiohttp.ClientSession()
        try:
            headers = {"Authorization": f"Bearer {token or agent_token(server)}"}
            ws = await session.ws_connect(server.ws_url + "/agent", headers=headers)
        except BaseException:
            await session.close()
            raise
        return cls(session, ws)

    async def send(self, **fields: Any) -> None:
        await self.ws.send_bytes(agent.WorkerMessage(**fields).SerializeToString())

    async def recv(self) -> agent.ServerMessage:
        frame = await asyncio.wait_for(self.ws.receive(), 5)
        assert frame.type == aiohttp.WSMsgType.BINARY, frame
        return agent.ServerMessage.FromString(frame.data)

    async def register(self, agent_name: str) -> str:
        await self.send(register=agent.RegisterWorkerRequest(type=agent.JT_ROOM, agent_name=agent_name, version="9.9"))
        msg = await self.recv()
        assert msg.WhichOneof("message") == "register"
        return msg.register.worker_id

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 12))  # type: ignore[arg-type]


def test_twirp_rooms_dispatches_and_participants(server: LocalLiveKitServer) -> None:
    async def main() -> None:
        async with api.LiveKitAPI(server.url, server.api_key, server.api_secret) as lk:
            dispatch = await lk.agent_dispatch.create_dispatch(
                agent_dispatch.CreateAgentDispatchRequest(agent_name="nobody", room="r1", metadata="m")
            )
            assert dispatch.id.startswith("AD_") and dispatch.room == "r1" and dispatch.metadata == "m"
            (job,) = server.dispatch_jobs(dispatch.id)
            assert job.id.startswith("AJ_") and job.room.name == "r1" and job.room.sid.startswith("RM_")
            # no worker registered: the server gives up on the job
            await eventually(lambda: server.dispatch_jobs(dispatch.id)[0].state.status == agent.JS_FAILED)
            listed = await lk.agent_dispatch.list_dispatch("r1")
            assert [d.id for d in listed] == [dispatch.id] and listed[0].state.jobs[0].id == job.id

            await asyncio.to_thread(server.add_participant, "r1", "alice", attributes={"k": "v"}, metadata="md")
            resp = await lk.room.list_participants(room_pb.ListParticipantsRequest(room="r1"))
            (alice,) = resp.participants
            assert (alice.identity, dict(alice.attributes), alice.metadata) == ("alice", {"k": "v"}, "md")
            assert alice.state == models.ParticipantInfo.ACTIVE and alice.sid.startswith("PA_")

            rooms = await lk.room.list_rooms(room_pb.ListRoomsRequest())
            assert [r.name for r in rooms.rooms] == ["r1"]
            await lk.room.delete_room(room_pb.DeleteRoomRequest(room="r1"))
            assert server.deleted_rooms() == ["r1"] and server.participants("r1") == []
            with pytest.raises(api.TwirpError) as missing:
                await lk.room.delete_room(room_pb.DeleteRoomRequest(room="r1"))
            assert (missing.value.code, missing.value.status) == ("not_found", 404)

    run(main())


def test_twirp_errors(server: LocalLiveKitServer) -> None:
    async def main() -> None:
        async with api.LiveKitAPI(server.url, server.api_key, "wrong-secret-wrong-secret-wrong-secret") as lk:
            with pytest.raises(api.TwirpError) as bad_secret:
                await lk.room.list_participants(room_pb.ListParticipantsRequest(room="r1"))
            assert (bad_secret.value.code, bad_secret.value.status) == ("unauthenticated", 401)

        other_room = api.AccessToken(server.api_key, server.api_secret).with_grants(
            api.VideoGrants(room_admin=True, room="other")
        )
        async with api.LiveKitAPI.with_token(other_room.to_jwt(), server.url) as lk:
            with pytest.raises(api.TwirpError) as denied:
                await lk.agent_dispatch.create_dispatch(agent_dispatch.CreateAgentDispatchRequest(agent_name="a", room="r1"))
            assert (denied.value.code, denied.value.status) == ("permission_denied", 403)

        async with aiohttp.ClientSession() as session:
            client = api.twirp_client.TwirpClient(session, server.url, "livekit")
            headers = {"authorization": f"Bearer {agent_token(server)}"}
            with pytest.raises(api.TwirpError) as bad_route:
                await client.request("RoomService", "NoSuchMethod", room_pb.ListRoomsRequest(), headers, room_pb.ListRoomsResponse)
            assert (bad_route.value.code, bad_route.value.status) == ("bad_route", 404)

    run(main())


def test_agent_protocol_end_to_end(server: LocalLiveKitServer) -> None:
    async def main() -> None:
        declining, accepting = await RawWorker.connect(server), await RawWorker.connect(server)
        first_id = await declining.register("bot")
        second_id = await accepting.register("bot")
        assert first_id.startswith("AW_") and first_id != second_id
        views = server.workers()
        assert [v.worker_id for v in views] == [first_id, second_id]
        assert (views[0].agent_name, views[0].version, views[0].connected) == ("bot", "9.9", True)

        await declining.send(ping=agent.WorkerPing(timestamp=123))
        pong = (await declining.recv()).pong
        assert pong.last_timestamp == 123 and pong.timestamp > 0

        async with api.LiveKitAPI(server.url, server.api_key, server.api_secret) as lk:
            dispatch = await lk.agent_dispatch.create_dispatch(
                agent_dispatch.CreateAgentDispatchRequest(agent_name="bot", room="r2", metadata="job-md")
            )
        # round robin starts with the first worker, which declines; the second is asked next
        offer = (await declining.recv()).availability
        assert (offer.job.dispatch_id, offer.job.room.name, offer.job.metadata) == (dispatch.id, "r2", "job-md")
        job_id = offer.job.id
        await declining.send(availability=agent.AvailabilityResponse(job_id=job_id, available=False))
        assert (await accepting.recv()).availability.job.id == job_id
        await accepting.send(
            availability=agent.AvailabilityResponse(
                job_id=job_id, available=True, participant_identity="agent-x", participant_attributes={"a": "1"}
            )
        )
        assignment = (await accepting.recv()).assignment
        assert assignment.job.id == job_id and assignment.url == ""
        claims = api.TokenVerifier(server.api_key, server.api_secret).verify(assignment.token)
        assert (claims.identity, claims.kind, claims.attributes) == ("agent-x", "agent", {"a": "1"})
        assert claims.video is not None and (claims.video.room, claims.video.room_join, claims.video.agent) == ("r2", True, True)
        assert server.availability(job_id).participant_identity == "agent-x"  # type: ignore[union-attr]

        await accepting.send(update_job=agent.UpdateJobStatus(job_id=job_id, status=agent.JS_RUNNING))
        await accepting.send(update_worker=agent.UpdateWorkerStatus(status=agent.WS_FULL, load=1.0, job_count=1))
        await accepting.send(migrate_job=agent.MigrateJobRequest(job_ids=[job_id]))
        await eventually(lambda: server.migrations() == [[job_id]])
        assert server.job_statuses(job_id) == [(agent.JS_RUNNING, "")]
        assert server.dispatch_jobs(dispatch.id)[0].state.worker_id == second_id
        assert [u.status for u in server.workers()[1].status_updates] == [agent.WS_FULL]

        await asyncio.to_thread(server.terminate, job_id)
        assert (await accepting.recv()).termination.job_id == job_id

        await declining.close()
        await eventually(lambda: not server.workers()[0].connected)
        await asyncio.to_thread(server.drop_workers)
        assert not server.workers()[1].connected
        closed = await asyncio.wait_for(accepting.ws.receive(), 5)
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == aiohttp.WSCloseCode.GOING_AWAY
        await accepting.close()

    run(main())


def test_agent_refusals_and_garbage(server: LocalLiveKitServer) -> None:
    async def main() -> None:
        room_only = api.AccessToken(server.api_key, server.api_secret).with_grants(api.VideoGrants(room_admin=True, room="r"))
        for token in (agent_token(server, secret="not-the-secret-not-the-secret-0000"), room_only.to_jwt()):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await RawWorker.connect(server, token)
            assert refused.value.status == 401
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/agent") as resp:  # no Authorization header at all
                assert resp.status == 401
                assert (await resp.json())["code"] == "unauthenticated"
        assert server.refused_registrations() == 3

        garbage = await RawWorker.connect(server)
        await garbage.ws.send_bytes(b"garbage \xff\xfe not protobuf")
        closed = await asyncio.wait_for(garbage.ws.receive(), 5)
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == aiohttp.WSCloseCode.UNSUPPORTED_DATA
        await garbage.close()
        assert "undecodable WorkerMessage" in server.protocol_errors()[0]

        early = await RawWorker.connect(server)
        await early.send(ping=agent.WorkerPing(timestamp=1))
        assert (await asyncio.wait_for(early.ws.receive(), 5)).type == aiohttp.WSMsgType.CLOSE
        await early.close()
        assert "ping before register" in server.protocol_errors()[1]

        healthy = await RawWorker.connect(server)  # the server still serves
        assert (await healthy.register("bot")).startswith("AW_")
        await healthy.close()

    run(main())


def test_stand_in_rooms(server: LocalLiveKitServer) -> None:
    async def main() -> None:
        alice, bob = StandInRoom(), StandInRoom()
        events: list[tuple[Any, ...]] = []
        texts: list[tuple[str, str, rtc.TextStreamInfo]] = []

        with pytest.raises(ValueError):
            alice.on("participant_connected", _async_callback)
        alice.on("participant_connected", lambda p: events.append(("connected", p.identity)))
        alice.on("participant_disconnected", lambda p: events.append(("left", p.identity, p.disconnect_reason)))
        alice.on("participant_attributes_changed", lambda changed, p: events.append(("attrs", p.identity, changed)))
        alice.on("participant_metadata_changed", lambda p, old, new: events.append(("md", p.identity, old, new)))
        alice.on("data_received", lambda pkt: events.append(("data", pkt.participant.identity, pkt.data, pkt.topic, pkt.kind)))

        async def on_text(reader: Any, identity: str) -> None:
            texts.append((identity, await reader.read_all(), reader.info))

        alice.register_text_stream_handler("chat", lambda reader, identity: on_text(reader, identity))
        states: list[int] = []
        alice.on("connection_state_changed", states.append)
        alice.on("disconnected", lambda reason: events.append(("disconnected", reason)))

        with pytest.raises(rtc.ConnectError):
            await bob.connect(server.ws_url, "not-a-token")

        await alice.connect(server.ws_url, room_token(server, "r3", "alice"))
        assert alice.isconnected() and alice.name == "r3" and (await alice.sid).startswith("RM_")
        assert states == [rtc.ConnectionState.CONN_CONNECTED]
        await bob.connect(server.url, room_token(server, "r3", "bob", kind="agent", attributes={"x": "1"}))
        assert list(bob.remote_participants) == ["alice"]
        await eventually(lambda: ("connected", "bob") in events)
        bob_seen = alice.remote_participants["bob"]
        assert (bob_seen.kind, bob_seen.attributes) == (rtc.ParticipantKind.PARTICIPANT_KIND_AGENT, {"x": "1"})

        await bob.local_participant.set_attributes({"x": "", "y": "2"})
        assert bob.local_participant.attributes == {"y": "2"}  # acked after the server's echo
        await bob.local_participant.set_metadata("bob-md")
        await bob.local_participant.publish_data(b"\x00bytes", topic="t")
        info = await bob.local_participant.send_text("hello", topic="chat", attributes={"k": "v"})
        await eventually(lambda: texts)
        assert texts == [("bob", "hello", info)]
        assert events[1:] == [
            ("attrs", "bob", {"x": "", "y": "2"}),
            ("md", "bob", "", "bob-md"),
            ("data", "bob", b"\x00bytes", "t", rtc.DataPacketKind.KIND_RELIABLE),
        ]
        assert alice.remote_participants["bob"] is bob_seen and bob_seen.attributes == {"y": "2"}
        assert {p.identity: dict(p.attributes) for p in server.participants("r3")} == {"alice": {}, "bob": {"y": "2"}}

        await asyncio.to_thread(server.add_participant, "r3", "carol")
        await eventually(lambda: ("connected", "carol") in events)
        await bob.disconnect()
        await eventually(lambda: ("left", "bob", rtc.DisconnectReason.CLIENT_INITIATED) in events)
        assert "bob" not in alice.remote_participants

        async with api.LiveKitAPI(server.url, server.api_key, server.api_secret) as lk:
            await lk.room.delete_room(room_pb.DeleteRoomRequest(room="r3"))
        await eventually(lambda: not alice.isconnected())
        assert events[-1] == ("disconnected", rtc.DisconnectReason.ROOM_DELETED)
        assert states[-1] == rtc.ConnectionState.CONN_DISCONNECTED
        assert server.protocol_errors() == []

    run(main())


def test_stand_in_duplicate_identity_and_server_stop() -> None:
    async def main(server: LocalLiveKitServer) -> None:
        first, second = StandInRoom(), StandInRoom()
        reasons: list[int] = []
        first.on("disconnected", reasons.append)
        await first.connect(server.ws_url, room_token(server, "r4", "same"))
        await second.connect(server.ws_url, room_token(server, "r4", "same"))
        await eventually(lambda: reasons == [rtc.DisconnectReason.DUPLICATE_IDENTITY])
        assert [p.identity for p in server.participants("r4")] == ["same"] and second.isconnected()

        dropped: list[int] = []
        second.on("disconnected", dropped.append)
        await asyncio.to_thread(server.stop)
        await eventually(lambda: dropped)
        assert dropped == [rtc.DisconnectReason.SERVER_SHUTDOWN]

    server = LocalLiveKitServer().start()
    try:
        run(main(server))
    finally:
        server.stop()


async def _async_callback(participant: Any) -> None:
    """rtc's EventEmitter refuses coroutine functions; so must the stand-in."""
