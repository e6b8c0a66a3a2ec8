"""Code written for LiveKit Agents finds its job inside rayvisor jobs.

``get_job_context()`` returns a real ``livekit.agents.JobContext`` and
``http_context.http_session()`` a per-job session, in the entrypoint, in shutdown
callbacks and in participant entrypoints (child actors and in-process tasks); the
shutdown protocol closes the session. The local room facade offers what RoomIO needs.

(No ``from __future__ import annotations``: these agent functions travel to job actors by
value and livekit-agents reads annotations at run time.)
"""

import asyncio
import json
from typing import Any

import pytest

lk_agents = pytest.importorskip("livekit.agents")

from livekit.agents import get_job_context  # noqa: E402
from livekit.agents.utils import http_context  # noqa: E402

from rayvisor import Cause, JobState, WorkerOptions, rtc  # noqa: E402
from rayvisor.actors.job_actor import JobRunner  # noqa: E402
from rayvisor.agents.job import JobContext as RayvisorJobContext, JobProcess  # noqa: E402
from rayvisor.agents.livekit_agents_context import AgentsJobContext  # noqa: E402
from rayvisor.agents.options import uses_livekit_agents  # noqa: E402
from rayvisor.errors import NotSupported  # noqa: E402
from rayvisor.messages import JobStart  # noqa: E402
from test_livekit_room import scripted as scripted_rooms  # noqa: E402  (rooms built by a scripted rtc.Room)

TIMEOUT = 60.0
"""Deadline for anything that involves starting a job actor (cold actors are slow on CI)."""
IN_PROCESS_TIMEOUT = 10.0
"""Deadline for a job runner driven in this process against a scripted room (no actors)."""


def observe(where: str) -> dict[str, Any]:
    """What LiveKit Agents code would see at ``where``: the job context and the HTTP session."""
    ctx = get_job_context()
    session = http_context.http_session()
    return {"where": where, "job_id": ctx.job.id, "lk_context": isinstance(ctx, lk_agents.JobContext),
            "rayvisor_context": isinstance(ctx, RayvisorJobContext), "session": id(session),
            "session_open": not session.closed}


async def report(ctx: Any, observation: dict[str, Any]) -> None:
    await ctx.room.local_participant.send_text(json.dumps(observation), topic="observations")


async def observing_participant_entrypoint(ctx: Any, participant: Any) -> None:
    def on_attributes(changed: dict[str, str], who: Any) -> None:  # a room callback, run by the event pump
        observation = observe("participant_room_callback")
        asyncio.get_running_loop().create_task(report(ctx, observation))

    ctx.room.on("participant_attributes_changed", on_attributes)
    await report(ctx, {**observe("participant"), "remote_is_rtc": isinstance(participant, rtc.RemoteParticipant)})


async def observing_entrypoint(ctx: Any) -> None:
    async def on_shutdown(reason: str) -> None:
        await report(ctx, {**observe("shutdown_callback"), "reason": reason})

    ctx.add_shutdown_callback(on_shutdown)
    ctx.add_participant_entrypoint(observing_participant_entrypoint)
    await ctx.connect()
    await report(ctx, {**observe("entrypoint"), "userdata": ctx.proc.userdata.get("warm"),
                       "log_fields": ctx.log_context_fields})

    def on_text(reader: Any, identity: str) -> None:
        async def read() -> None:
            if await reader.read_all() == "bye":
                ctx.shutdown("asked to leave")

        asyncio.create_task(read())

    ctx.room.register_text_stream_handler("control", on_text)


def prewarm(proc: Any) -> None:
    proc.userdata["warm"] = "from prewarm"


def observations(participant: Any, count: int) -> list[dict[str, Any]]:
    return [json.loads(text) for _, _, text in participant.wait_for_messages(count, topic="observations",
                                                                             timeout=TIMEOUT)]


@pytest.mark.parametrize("isolate_participants", [True, False], ids=["child-actor", "in-process"])
def test_job_context_and_http_session_hold_in_every_part_of_a_job(serve, rooms, isolate_participants: bool) -> None:
    client = serve(observing_entrypoint, prewarm_fnc=prewarm, isolate_participants=isolate_participants)
    alice = rooms.join("lk-ctx", "alice")
    job_id = client.submit(room="lk-ctx")
    seen = {o["where"]: o for o in observations(alice, 2)}
    alice.set_attributes({"mood": "curious"})
    seen.update({o["where"]: o for o in observations(alice, 3)})
    alice.send_text("bye", topic="control")
    seen.update({o["where"]: o for o in observations(alice, 4)})
    info = client.wait(job_id, timeout=TIMEOUT)

    assert set(seen) == {"entrypoint", "participant", "participant_room_callback", "shutdown_callback"}
    for observation in seen.values():
        assert (observation["job_id"], observation["lk_context"], observation["session_open"]) == (job_id, True, True)
        in_child = observation["where"].startswith("participant") and isolate_participants
        assert observation["rayvisor_context"] is not in_child  # a child's ctx is a ParticipantContext
    assert seen["entrypoint"]["session"] == seen["shutdown_callback"]["session"]  # one session for the job's life
    assert seen["participant"]["remote_is_rtc"] is True
    assert seen["entrypoint"]["userdata"] == "from prewarm"
    assert seen["shutdown_callback"]["reason"] == "asked to leave"
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN)


class _NoRoom:
    """A room backend that is never joined (the context is only built and released)."""

    async def disconnect(self) -> None:
        pass


def test_the_shutdown_protocol_closes_the_jobs_http_session_and_forgets_the_job() -> None:
    async def entrypoint(ctx: Any) -> None:
        pass

    start = JobStart(job_id="RJ_http", room="r", metadata="", agent_name="", dispatch_id="", worker_id="RW",
                     identity="agent-RJ_http")
    runner = JobRunner(WorkerOptions(entrypoint_fnc=entrypoint), start, JobProcess(), _NoRoom(), _Reports(),
                       namespace="t-http")

    async def main() -> tuple[Any, Any]:
        context = runner.ctx._task_context()
        session = await asyncio.get_running_loop().create_task(_open_session(), context=context)
        runner.request_shutdown(Cause.USER_SHUTDOWN, "done")
        await asyncio.wait_for(runner.wait_done(), IN_PROCESS_TIMEOUT)
        return session, context

    session, context = asyncio.run(main())
    assert isinstance(runner.ctx, AgentsJobContext)
    assert session.closed
    assert context.run(get_job_context) is runner.ctx
    with pytest.raises(RuntimeError, match="no job context"):
        get_job_context()  # outside the job's tasks there is none, as in LiveKit Agents


async def _open_session() -> Any:
    session = http_context.http_session()
    assert not session.closed
    return session


class _Reports:
    def shutdown_started(self, record: Any) -> None:
        pass

    def participants_changed(self, record: Any) -> None:
        pass


def test_livekit_agents_context_is_chosen_by_what_the_agents_module_uses() -> None:
    async def uses_lk(ctx: Any) -> None:
        get_job_context()

    plain = compile("async def entrypoint(ctx):\n    await ctx.connect()\n", "plain_agent.py", "exec")
    namespace: dict[str, Any] = {"__name__": "plain_agent"}
    exec(plain, namespace)

    assert uses_livekit_agents(uses_lk)
    assert not uses_livekit_agents(namespace["entrypoint"])
    assert WorkerOptions(entrypoint_fnc=uses_lk).livekit_agents_context is True
    assert WorkerOptions(entrypoint_fnc=namespace["entrypoint"]).livekit_agents_context is False
    assert WorkerOptions(entrypoint_fnc=namespace["entrypoint"], livekit_agents_context=True).livekit_agents_context


# --------------------------------------------------------------------------- the local room facade


async def facade_entrypoint(ctx: Any) -> None:
    await ctx.connect()
    room = ctx.room
    alice = await ctx.wait_for_participant()
    facts: dict[str, Any] = {
        "remote_is_rtc": isinstance(alice, rtc.RemoteParticipant),
        "remote_tracks": dict(alice.track_publications),
        "remote_state_active": alice.state == rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE,
        "local_tracks": dict(room.local_participant.track_publications),
    }
    try:
        await room.local_participant.publish_track(object())
    except NotSupported as err:
        facts["publish_track"] = str(err)

    def on_bytes(reader: Any, identity: str) -> None:
        async def echo() -> None:
            data = await reader.read_all()
            await room.local_participant.send_bytes(data[::-1], topic="echo", name=f"re-{reader.info.name}",
                                                    destination_identities=[identity])

        asyncio.create_task(echo())

    room.register_byte_stream_handler("files", on_bytes)
    writer = await room.local_participant.stream_text(topic="chunks", attributes={"lk.segment_id": "S1"})
    for chunk in ("one ", "two ", "three"):
        await writer.write(chunk)
    await writer.aclose()
    await room.local_participant.send_text(json.dumps(facts), topic="facts")


def test_the_local_room_offers_what_room_io_needs(serve, rooms) -> None:
    client = serve(facade_entrypoint)
    alice = rooms.join("lk-facade", "alice")
    job_id = client.submit(room="lk-facade")
    facts = json.loads(alice.wait_for_messages(1, topic="facts", timeout=TIMEOUT)[0][2])
    alice.send_bytes(b"abc", name="notes.txt", topic="files")
    echoed = alice.wait_for_messages(1, topic="echo", timeout=TIMEOUT)
    chunks = alice.wait_for_messages(1, topic="chunks", timeout=TIMEOUT)
    alice.leave()
    info = client.wait(job_id, timeout=TIMEOUT)

    assert facts["remote_is_rtc"] is True and facts["remote_state_active"] is True
    assert facts["remote_tracks"] == {} and facts["local_tracks"] == {}
    assert "needs a LiveKit server" in facts["publish_track"]
    assert [payload for _, _, payload in echoed] == [b"cba"]
    assert [payload for _, _, payload in chunks] == ["one two three"]  # a stream written in chunks arrives whole
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY)


# --------------------------------------------------------------------------- plugins


async def plugin_entrypoint(ctx: Any) -> None:
    import lk_plugin_fixture  # noqa: F401  (already imported where the job's code was unpickled)

    await ctx.connect()
    shouted = await get_job_context().inference_executor.do_inference("rayvisor_fixture_shout", b"turn over")
    await ctx.room.local_participant.send_text(f"{lk_plugin_fixture.greeting()} / {shouted.decode()}", topic="plugin")


def test_an_agent_using_a_plugin_runs_and_reaches_its_inference_runner(serve, rooms) -> None:
    """Plugins register themselves at import, which livekit-agents allows only on the main
    thread; Ray actors import the agent's code on another thread. The job runs anyway, and
    the plugin's inference runner answers through ``ctx.inference_executor``."""
    import lk_plugin_fixture  # the driver imports it as an agent file would

    assert lk_plugin_fixture.ShoutRunner.INFERENCE_METHOD == "rayvisor_fixture_shout"

    client = serve(plugin_entrypoint)
    alice = rooms.join("lk-plugin", "alice")
    job_id = client.submit(room="lk-plugin")
    said = alice.wait_for_messages(1, topic="plugin", timeout=TIMEOUT)
    alice.leave()
    info = client.wait(job_id, timeout=TIMEOUT)

    assert [text for _, _, text in said] == ["hello from a plugin / TURN OVER!"]
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY)


# --------------------------------------------------------------------------- the LiveKit backend


scripted = scripted_rooms  # the fixture, under the name the test asks for


def test_on_the_livekit_backend_ctx_room_is_the_jobs_rtc_room_from_the_start(scripted) -> None:
    """RoomIO and AgentSession get the ``rtc.Room`` itself: created when the job starts, so
    the job context, RoomIO and rayvisor's listeners are on one object before it connects."""
    from test_livekit_room import job_start
    from rayvisor.agents.job import LiveKitAccess
    from rayvisor.rooms.livekit import LiveKitRoomConnection

    seen: dict[str, Any] = {}

    async def entrypoint(ctx: Any) -> None:
        room = get_job_context().room
        seen["before_connect"] = (room is scripted.instances[-1], room.connected_with)
        alice = await ctx.wait_for_participant()  # connects first, as in livekit-agents
        seen["alice"] = alice is room.remote_participants["alice"]
        seen["agent"] = ctx.agent is room.local_participant
        seen["token"] = room.connected_with[1]

    start = job_start()
    connection = LiveKitRoomConnection(start.url, start.token, connect_timeout=IN_PROCESS_TIMEOUT, call_timeout=IN_PROCESS_TIMEOUT)
    runner = JobRunner(WorkerOptions(entrypoint_fnc=entrypoint, ws_url="", api_key="", api_secret=""), start,
                       JobProcess(), connection, _Reports(),
                       livekit=LiveKitAccess(url=start.url, api_token=start.api_token, room_token=start.token))

    async def main() -> Any:
        runner.start()
        await _eventually(lambda: "token" in seen)
        scripted.instances[-1].leave("alice")  # rayvisor's own listener sees it: the job ends room_empty
        return await asyncio.wait_for(runner.wait_done(), IN_PROCESS_TIMEOUT)

    outcome = asyncio.run(main())
    assert isinstance(runner.ctx, AgentsJobContext) and len(scripted.instances) == 1
    assert seen == {"before_connect": (True, None), "alice": True, "agent": True, "token": "room-token"}
    assert (outcome.state, outcome.cause) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY)


async def _eventually(predicate: Any, timeout: float = IN_PROCESS_TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"condition not met within {timeout}s"
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- installing beside it


def test_rayvisor_installs_beside_livekit_agents_and_accepts_its_pins() -> None:
    """``pip install 'rayvisor[agents]'`` resolved livekit-agents with every pin of its that
    rayvisor shares: each shared package's installed version satisfies both."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    def runtime_requirements(dist: str) -> dict[str, Requirement]:
        found = (Requirement(line) for line in requires(dist) or [])
        return {r.name.lower(): r for r in found if r.marker is None or r.marker.evaluate({"extra": ""})}

    ours, theirs = runtime_requirements("rayvisor"), runtime_requirements("livekit-agents")
    shared = sorted(set(ours) & set(theirs))
    assert {"livekit", "livekit-api", "aiohttp"} <= set(shared)
    for name in shared:
        installed = version(name)
        assert ours[name].specifier.contains(installed, prereleases=True), (name, str(ours[name]), installed)
        assert theirs[name].specifier.contains(installed, prereleases=True), (name, str(theirs[name]), installed)
    agents_extra = [Requirement(line) for line in requires("rayvisor") or [] if "extra ==" in line and "agents" in line]
    assert any(r.name == "livekit-agents" and r.specifier.contains(version("livekit-agents")) for r in agents_extra)


def test_concurrent_connects_join_once_and_unsupported_options_are_refused(scripted) -> None:
    """AgentSession.start connects in a task of its own while user code may connect too."""
    from test_livekit_room import job_start
    from rayvisor.agents.job import LiveKitAccess
    from rayvisor.rooms.livekit import LiveKitRoomConnection

    seen: dict[str, Any] = {}

    async def entrypoint(ctx: Any) -> None:
        await asyncio.gather(ctx.connect(), ctx.connect(), ctx.wait_for_participant())
        try:
            await ctx.connect(encryption=object())
        except NotSupported as err:
            seen["encryption"] = str(err)
        ctx.shutdown()

    start = job_start()
    connection = LiveKitRoomConnection(start.url, start.token, connect_timeout=IN_PROCESS_TIMEOUT, call_timeout=IN_PROCESS_TIMEOUT)
    joins: list[str] = []
    original = connection.connect

    async def counting_connect(*args: Any, **kwargs: Any) -> Any:
        joins.append(args[0])
        return await original(*args, **kwargs)

    connection.connect = counting_connect  # type: ignore[method-assign]
    runner = JobRunner(WorkerOptions(entrypoint_fnc=entrypoint, ws_url="", api_key="", api_secret=""), start,
                       JobProcess(), connection, _Reports(),
                       livekit=LiveKitAccess(url=start.url, api_token=start.api_token, room_token=start.token))

    async def main() -> Any:
        runner.start()
        return await asyncio.wait_for(runner.wait_done(), IN_PROCESS_TIMEOUT)

    outcome = asyncio.run(main())
    assert joins == ["support"]
    assert "encryption" in seen["encryption"]
    assert (outcome.state, outcome.cause, outcome.reason) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN, "user requested")


def test_a_participant_who_left_carries_its_disconnect_reason() -> None:
    """RoomIO closes its session when its participant leaves for good (CLIENT_INITIATED)."""
    from rayvisor.agents.room import Room
    from rayvisor.rooms.records import ParticipantInfo, RoomEvent, RoomEventType

    room = Room("r")
    left: list[Any] = []
    room.on("participant_disconnected", left.append)
    alice = ParticipantInfo(identity="alice")
    room._apply(RoomEvent(seq=1, type=RoomEventType.PARTICIPANT_CONNECTED, participant=alice))
    room._apply(RoomEvent(seq=2, type=RoomEventType.PARTICIPANT_DISCONNECTED, participant=alice,
                          reason=rtc.DisconnectReason.CLIENT_INITIATED))

    assert [p.identity for p in left] == ["alice"]
    assert left[0].disconnect_reason == rtc.DisconnectReason.CLIENT_INITIATED
    assert left[0].state == rtc.ParticipantState.PARTICIPANT_STATE_DISCONNECTED
