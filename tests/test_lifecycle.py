"""Jobs run one per actor, follow the state machine, and end on the documented conditions."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
import ray
from support import wait_until

from rayvisor import Cause, EndWhen, JobContext, JobState, rtc
from rayvisor.errors import WaitTimeout

AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
SIP = rtc.ParticipantKind.PARTICIPANT_KIND_SIP


async def greeter(ctx: JobContext) -> None:
    """Connects, says hello with its pid, and answers every chat text."""

    async def answer(reader, sender: str) -> None:
        text = await reader.read_all()
        await ctx.room.local_participant.send_text(f"{sender}:{text}", topic="echo")

    ctx.room.register_text_stream_handler("chat", answer)
    await ctx.connect()
    await ctx.room.local_participant.send_text(str(os.getpid()), topic="hello")


async def reports_room_events(ctx: JobContext) -> None:
    """Forwards what the room facade sees to an observer, as text on topic "seen"."""
    first: dict[str, object] = {}
    outbox: asyncio.Queue[str] = asyncio.Queue()

    async def send_in_order() -> None:  # one sender: concurrent sends could reach the room out of order
        while True:
            await ctx.room.local_participant.send_text(await outbox.get(), topic="seen")
            outbox.task_done()

    async def flush_then_stop_sending() -> None:  # what was seen before shutdown still reaches the observer
        await asyncio.wait_for(outbox.join(), timeout=2)
        sender.cancel()

    def tell(text: str) -> None:
        outbox.put_nowait(text)

    @ctx.room.on("participant_connected")
    def on_connected(p) -> None:
        first.setdefault(p.identity, p)
        tell(f"connected:{p.identity}:{p.kind}")

    @ctx.room.on("participant_attributes_changed")
    def on_attributes(changed, p) -> None:
        tell(f"attributes:{p.identity}:{sorted(changed.items())}:same_object={p is first.get(p.identity)}"
             f":in_room={p is ctx.room.remote_participants.get(p.identity)}")

    @ctx.room.on("data_received")
    def on_data(packet) -> None:
        tell(f"data:{packet.participant.identity}:{packet.topic}:{packet.data.decode()}")

    @ctx.room.on("room_metadata_changed")
    def on_metadata(old, new) -> None:
        tell(f"room_metadata:{old}->{new}")

    @ctx.room.on("participant_disconnected")
    def on_disconnected(p) -> None:
        tell(f"disconnected:{p.identity}")

    await ctx.connect()
    sender = asyncio.create_task(send_in_order())
    ctx.add_shutdown_callback(flush_then_stop_sending)
    await ctx.room.local_participant.set_attributes({"agent.state": "listening"})
    tell("ready")


async def raises_after_connecting(ctx: JobContext) -> None:
    async def cleanup(reason: str) -> None:
        await ctx.room.local_participant.send_text(f"cleanup:{reason}", topic="callback")

    ctx.add_shutdown_callback(cleanup)
    await ctx.connect()
    raise RuntimeError("the model server is unreachable")


async def logs_with_context_fields(ctx: JobContext) -> None:
    captured: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    logger = logging.getLogger("my-agent")
    logger.addHandler(Capture())
    ctx.log_context_fields = {"worker_id": ctx.worker_id, "room_name": ctx.room.name}
    logger.warning("hello from the agent")
    record = captured[0]
    await ctx.connect()
    await ctx.room.local_participant.send_text(
        f"{record.job_id}|{record.room_name}|{record.worker_id}", topic="log")


async def waits_for_a_sip_caller(ctx: JobContext) -> None:
    await ctx.connect()
    participant = await ctx.wait_for_participant(kind=rtc.ParticipantKind.PARTICIPANT_KIND_SIP)
    await ctx.room.local_participant.send_text(participant.identity, topic="found")


def test_each_job_runs_in_its_own_actor_process(serve, rooms):
    client = serve(greeter)
    supervisor_pid_free = {os.getpid()}
    users = [rooms.join(f"room-{i}", "user") for i in range(3)]
    job_ids = [client.submit(room=f"room-{i}") for i in range(3)]

    pids = [int(u.wait_for_messages(1, topic="hello", timeout=20)[0][2]) for u in users]

    assert len(set(pids)) == 3 and not set(pids) & supervisor_pid_free
    infos = [client.status(j) for j in job_ids]
    assert [i.pid for i in infos] == pids
    assert all(i.state == JobState.RUNNING for i in infos)
    assert {i.node_id for i in infos} == {ray.get_runtime_context().get_node_id()}
    for info in infos:
        order = [info.entered(s) for s in (JobState.PENDING, JobState.STARTING, JobState.RUNNING)]
        assert order == sorted(order) and None not in order
        assert info.participants == ["user"]


def test_job_ends_with_room_empty_when_every_standard_and_sip_participant_left(serve, rooms):
    client = serve(greeter)
    alice = rooms.join("call", "alice")
    caller = rooms.join("call", "+15550100", kind=SIP)
    rooms.join("call", "bot", kind=AGENT)  # an agent participant does not keep the job
    job_id = client.submit(room="call")
    alice.wait_for_messages(1, topic="hello", timeout=20)

    alice.leave()
    caller.send_text("still here", topic="chat")
    assert caller.wait_for_messages(1, topic="echo", timeout=10)[0][2] == "+15550100:still here"
    assert client.status(job_id).state == JobState.RUNNING
    caller.leave()  # only the AGENT participant "bot" remains

    info = client.wait(job_id, timeout=10)
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY)
    assert [p.identity for p in rooms.participants("call")] == ["bot"]


def test_job_in_a_room_nobody_joined_waits_and_agents_leaving_do_not_end_it(serve, rooms):
    client = serve(greeter)
    bot = rooms.join("lobby", "bot", kind=AGENT)
    job_id = client.submit(room="lobby")
    bot.wait_for_messages(1, topic="hello", timeout=20)
    other_bot = rooms.join("lobby", "other-bot", kind=AGENT)
    other_bot.leave()
    bot.send_text("ping", topic="chat")  # the job has seen the leave before it answers this
    bot.wait_for_messages(1, topic="echo", timeout=10)
    assert client.status(job_id).state == JobState.RUNNING

    user = rooms.join("lobby", "user")
    user.send_text("hi", topic="chat")
    user.wait_for_messages(1, topic="echo", timeout=10)
    user.leave()

    assert client.wait(job_id, timeout=10).cause == Cause.ROOM_EMPTY


def test_end_when_never_keeps_the_job_until_an_explicit_shutdown(serve, rooms):
    client = serve(greeter, end_when=EndWhen.NEVER)
    user = rooms.join("kept", "user")
    bot = rooms.join("kept", "bot", kind=AGENT)
    job_id = client.submit(room="kept")
    user.wait_for_messages(1, topic="hello", timeout=20)
    user.leave()
    bot.send_text("ping", topic="chat")
    bot.wait_for_messages(1, topic="echo", timeout=10)
    assert client.status(job_id).state == JobState.RUNNING

    client.shutdown(job_id, reason="done")
    assert client.wait(job_id, timeout=10).cause == Cause.USER_SHUTDOWN


def test_deleting_the_room_ends_the_job_with_room_deleted(serve, rooms):
    client = serve(greeter)
    user = rooms.join("doomed", "user")
    job_id = client.submit(room="doomed")
    user.wait_for_messages(1, topic="hello", timeout=20)

    rooms.delete_room("doomed")

    info = client.wait(job_id, timeout=10)
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.ROOM_DELETED)


def test_entrypoint_error_fails_the_job_and_still_runs_shutdown_callbacks(serve, rooms):
    client = serve(raises_after_connecting)
    observer = rooms.join("fragile", "observer", kind=AGENT)
    job_id = client.submit(room="fragile")

    info = client.wait(job_id, timeout=20)

    assert (info.state, info.cause) == (JobState.FAILED, Cause.ENTRYPOINT_ERROR)
    assert "RuntimeError: the model server is unreachable" in info.error
    texts = [t for _, topic, t in observer.messages() if topic == "callback"]
    assert len(texts) == 1 and texts[0].startswith("cleanup:")


def test_room_facade_delivers_livekit_events_and_keeps_one_object_per_identity(serve, rooms):
    client = serve(reports_room_events)
    observer = rooms.join("events", "observer", kind=AGENT)
    job_id = client.submit(room="events")
    observer.wait_for_messages(1, topic="seen", timeout=20)

    alice = rooms.join("events", "alice", attributes={"user.language": "en"})
    alice.set_attributes({"user.language": "es"})
    alice.publish_data(b"payload", topic="bin")
    rooms.set_room_metadata("events", "vip")
    alice.leave()

    messages = observer.wait_for_messages(7, topic="seen", timeout=10)
    seen = [t for _, _, t in messages if t != "ready" and "agent-RJ_" not in t]
    assert seen == [
        f"connected:alice:{rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD}",
        "attributes:alice:[('user.language', 'es')]:same_object=True:in_room=True",
        "data:alice:bin:payload",
        "room_metadata:->vip",
        "disconnected:alice",
    ]
    own = [t for _, _, t in messages if "agent-RJ_" in t]  # LiveKit reports the agent's own changes too
    assert own == [f"attributes:agent-{job_id}:[('agent.state', 'listening')]:same_object=False:in_room=False"]


def test_log_context_fields_appear_on_every_record_the_job_logs(serve, rooms):
    client = serve(logs_with_context_fields)
    observer = rooms.join("logged", "observer", kind=AGENT)
    job_id = client.submit(room="logged")

    job_field, room_field, worker_field = observer.wait_for_messages(1, topic="log", timeout=20)[0][2].split("|")

    assert (job_field, room_field) == (job_id, "logged")
    assert worker_field.startswith("RW_")


def test_wait_for_participant_filters_by_kind(serve, rooms):
    client = serve(waits_for_a_sip_caller)
    rooms.join("phone", "web-user")
    client.submit(room="phone")
    caller = rooms.join("phone", "+15550199", kind=SIP)

    assert caller.wait_for_messages(1, topic="found", timeout=20)[0][2] == "+15550199"


def test_lifecycle_events_stream_every_transition_in_order(serve, rooms):
    client = serve(greeter)
    user = rooms.join("stream", "user")
    job_id = client.submit(room="stream")
    user.wait_for_messages(1, topic="hello", timeout=20)
    client.shutdown(job_id, reason="bye")
    client.wait(job_id, timeout=10)

    states = [e.state for e in client.events() if e.job_id == job_id]

    assert states == [JobState.PENDING, JobState.STARTING, JobState.RUNNING,
                      JobState.SHUTTING_DOWN, JobState.SUCCEEDED]


def test_wait_gives_up_with_a_typed_error_and_leaves_the_job_running(serve, rooms):
    client = serve(greeter)
    user = rooms.join("patient", "user")
    job_id = client.submit(room="patient")
    user.wait_for_messages(1, topic="hello", timeout=20)

    with pytest.raises(WaitTimeout):
        client.wait(job_id, timeout=0.2)
    assert client.status(job_id).state == JobState.RUNNING
    wait_until(lambda: client.status(job_id).participants == ["user"], timeout=5)


def load_model(proc) -> None:
    proc.userdata["model"] = f"loaded-in-{os.getpid()}"


def failing_prewarm(proc) -> None:
    raise OSError("model file missing")


def slow_prewarm(proc) -> None:
    import time

    time.sleep(30)


async def reports_userdata(ctx: JobContext) -> None:
    await ctx.connect()
    await ctx.room.local_participant.send_text(f"{ctx.proc.userdata.get('model')}|{os.getpid()}", topic="model")


def test_prewarm_runs_in_the_jobs_process_and_fills_proc_userdata(serve, rooms):
    client = serve(reports_userdata, prewarm_fnc=load_model)
    user = rooms.join("warm", "user")
    client.submit(room="warm")

    model, pid = user.wait_for_messages(1, topic="model", timeout=20)[0][2].split("|")

    assert model == f"loaded-in-{pid}"


@pytest.mark.parametrize("prewarm,timeout,error", [
    (failing_prewarm, 20, "model file missing"),  # ample: a busy machine must not turn this into a timeout
    (slow_prewarm, 1, "initialize_process_timeout=1"),
], ids=["raises", "too_slow"])
def test_job_whose_process_cannot_be_prepared_fails_with_start_failed(serve, rooms, prewarm, timeout, error):
    client = serve(reports_userdata, prewarm_fnc=prewarm, initialize_process_timeout=timeout)
    job_id = client.submit(room="cold")

    info = client.wait(job_id, timeout=40)

    assert (info.state, info.cause) == (JobState.FAILED, Cause.START_FAILED)
    assert error in info.error


def test_job_asking_for_resources_the_cluster_lacks_is_refused_at_once(serve):
    from rayvisor.errors import AtCapacity

    client = serve(reports_userdata, job_resources={"GPU": 1})
    with pytest.raises(AtCapacity, match="GPU"):
        client.submit(room="no-gpu-here")


def test_a_finished_job_answers_wait_at_once(serve):
    client = serve(reports_userdata, prewarm_fnc=failing_prewarm)
    job_id = client.submit(room="cold")
    info = client.wait(job_id, timeout=20)
    assert client.wait(job_id, timeout=0) == info


def test_a_stopping_supervisor_refuses_new_jobs_while_it_shuts_the_others_down(serve, rooms):
    import threading

    from rayvisor.errors import Draining

    client = serve(slow_to_stop, shutdown_process_timeout=2)
    user = rooms.join("closing", "user")
    job_id = client.submit(room="closing")
    user.wait_for_messages(1, topic="hello", timeout=20)
    stopper = threading.Thread(target=client.stop, kwargs={"timeout": 20})
    stopper.start()
    wait_until(lambda: client.status(job_id).state == JobState.SHUTTING_DOWN, timeout=5)

    with pytest.raises(Draining):
        client.submit(room="late")
    stopper.join(timeout=20)
    assert not stopper.is_alive()


async def slow_to_stop(ctx: JobContext) -> None:
    async def linger() -> None:
        await asyncio.sleep(1.5)

    ctx.add_shutdown_callback(linger)
    await ctx.connect()
    await ctx.room.local_participant.send_text("up", topic="hello")
