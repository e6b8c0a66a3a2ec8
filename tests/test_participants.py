"""Participant entrypoints run in child actors, one per participant, isolated from each other."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time

import pytest
from support import alive_actors, process_alive, wait_until

from rayvisor import Cause, JobContext, JobState, rtc
from rayvisor.errors import DuplicateEntrypoint
from rayvisor.messages import ParticipantActorState, ParticipantCause

AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
SIP = rtc.ParticipantKind.PARTICIPANT_KIND_SIP


async def serve_participant(ctx, participant) -> None:
    """Greets its participant with its pid, follows its attributes, obeys its commands."""
    me = participant.identity
    commands: asyncio.Queue[str] = asyncio.Queue()

    def tell(text: str, topic: str) -> None:
        asyncio.create_task(ctx.room.local_participant.send_text(text, topic=topic, destination_identities=[me]))

    async def on_command(reader, sender: str) -> None:
        commands.put_nowait(await reader.read_all())

    @ctx.room.on("participant_attributes_changed")
    def on_attributes(changed, p) -> None:
        tell(f"{p.identity}:{p.attributes.get('user.language')}:same={p is participant}", "attributes")

    async def goodbye(reason: str) -> None:
        await ctx.room.local_participant.send_text(f"bye {me} ({reason})", topic="bye",
                                                   destination_identities=["observer"])

    ctx.add_shutdown_callback(goodbye)
    ctx.room.register_text_stream_handler("cmd", on_command)
    await ctx.room.local_participant.send_text(f"{os.getpid()}", topic="child", destination_identities=[me])
    while True:
        command = await commands.get()
        if command == "exit":
            os._exit(1)
        if command == "raise":
            raise RuntimeError(f"handler for {me} failed")
        if command == "end-job":
            ctx.shutdown(reason=f"{me} asked")
        if command == "broadcast":
            await ctx.room.local_participant.send_text(f"news from {me}'s actor", topic="all")
        tell(f"{me} got {command}", "reply")


async def with_participant_actors(ctx: JobContext) -> None:
    ctx.add_participant_entrypoint(serve_participant)
    await ctx.connect()
    await ctx.room.local_participant.send_text(f"{os.getpid()}", topic="job")


async def hangs_on_shutdown_with_children(ctx: JobContext) -> None:
    async def hang() -> None:
        await asyncio.Event().wait()

    ctx.add_shutdown_callback(hang)
    await with_participant_actors(ctx)


async def checks_kind(ctx: JobContext) -> None:
    from rayvisor.errors import InvalidAgent

    await ctx.connect()
    await ctx.room.local_participant.send_text(f"{os.getpid()}", topic="job")
    try:
        ctx.add_participant_entrypoint(serve_participant, kind="sip")
    except InvalidAgent as err:
        await ctx.room.local_participant.send_text(type(err).__name__, topic="job")


async def registers_late(ctx: JobContext) -> None:
    await ctx.connect()
    ready = asyncio.Event()

    async def on_control(reader, sender: str) -> None:
        await reader.read_all()
        ready.set()

    ctx.room.register_text_stream_handler("register", on_control)
    await ctx.room.local_participant.send_text(f"{os.getpid()}", topic="job")
    await ready.wait()
    ctx.add_participant_entrypoint(serve_participant)
    try:
        ctx.add_participant_entrypoint(serve_participant)
    except DuplicateEntrypoint as err:
        await ctx.room.local_participant.send_text(type(err).__name__, topic="duplicate")


def announce_then_load(path: str) -> None:
    """Runs in a participant child while it unpickles its entrypoint: writes the child's pid to
    ``path``, then takes a minute (as importing a large model library would)."""
    with open(path, "w") as out:
        out.write(str(os.getpid()))
    time.sleep(60)


class SlowToLoad:
    """Shipped with a participant entrypoint: unpickling it runs ``announce_then_load``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return announce_then_load, (self.path,)


async def greets_once_loaded(ctx, participant, *, loaded=None) -> None:
    await ctx.room.local_participant.send_text("entrypoint ran", topic="child",
                                               destination_identities=[participant.identity])


async def with_slow_to_start_children(ctx: JobContext) -> None:
    """Its children take a minute to start; the job's metadata is where they say who they are."""
    ctx.add_participant_entrypoint(functools.partial(greets_once_loaded, loaded=SlowToLoad(ctx.job.metadata)))
    await ctx.connect()
    await ctx.room.local_participant.send_text(f"{os.getpid()}", topic="job")


async def hangs_when_stopped(ctx, participant) -> None:
    """A child whose shutdown callback tells the observer it started, then never returns."""
    async def hang(reason: str) -> None:
        await ctx.room.local_participant.send_text(f"stopping {participant.identity} ({reason})", topic="bye",
                                                   destination_identities=["observer"])
        await asyncio.Event().wait()

    ctx.add_shutdown_callback(hang)
    await ctx.room.local_participant.send_text(f"{os.getpid()}", topic="child",
                                               destination_identities=[participant.identity])


async def with_hanging_children(ctx: JobContext) -> None:
    async def last_word(reason: str) -> None:
        await ctx.room.local_participant.send_text(f"job callback ({reason})", topic="last-word")

    ctx.add_shutdown_callback(last_word)
    ctx.add_participant_entrypoint(hangs_when_stopped)
    await ctx.connect()
    await ctx.room.local_participant.send_text(f"{os.getpid()}", topic="job")


def join_and_greet(rooms, room: str, identity: str, kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD):
    participant = rooms.join(room, identity, kind=kind)
    pid = int(participant.wait_for_messages(1, topic="child", timeout=30)[0][2])
    return participant, pid


def start(serve, rooms, room: str, entrypoint=with_participant_actors, **options):
    client = serve(entrypoint, **options)
    observer = rooms.join(room, "observer", kind=AGENT)
    job_id = client.submit(room=room)
    job_pid = int(observer.wait_for_messages(1, topic="job", timeout=30)[0][2])
    return client, observer, job_id, job_pid


def actors_of(client, job_id):
    return {a.identity: a for a in client.status(job_id).participant_actors}


def test_each_participant_gets_its_own_child_actor(serve, rooms):
    client, _observer, job_id, job_pid = start(serve, rooms, "pids")
    (_, alice_pid), (_, bob_pid) = join_and_greet(rooms, "pids", "alice"), join_and_greet(rooms, "pids", "bob", SIP)

    assert len({job_pid, alice_pid, bob_pid}) == 3
    actors = wait_until(lambda: (a := actors_of(client, job_id)) and all(
        x.state == ParticipantActorState.RUNNING for x in a.values()) and len(a) == 2 and a, timeout=10)
    assert {i: a.pid for i, a in actors.items()} == {"alice": alice_pid, "bob": bob_pid}
    assert all(a.node_id and a.entrypoint.endswith("serve_participant") for a in actors.values())
    assert "observer" not in actors  # AGENT participants are not among the default kinds


def test_a_childs_messages_reach_the_room_once_through_the_jobs_connection(serve, rooms):
    client, observer, job_id, _ = start(serve, rooms, "relay")
    alice, _ = join_and_greet(rooms, "relay", "alice")

    alice.send_text("ping", topic="cmd")

    assert alice.wait_for_messages(1, topic="reply", timeout=10)[0][2] == "alice got ping"
    agent_identity = f"agent-{job_id}"
    assert [m[0] for m in alice.messages()] == [agent_identity, agent_identity]  # greeting + reply, once each
    identities = sorted(p.identity for p in rooms.participants("relay"))
    assert identities == sorted(["observer", "alice", agent_identity])  # no extra participant per child


def test_attribute_changes_reach_the_right_child(serve, rooms):
    client, _observer, _job, _ = start(serve, rooms, "attrs")
    alice, _ = join_and_greet(rooms, "attrs", "alice")
    bob, _ = join_and_greet(rooms, "attrs", "bob")

    bob.set_attributes({"user.language": "fr"})
    alice.set_attributes({"user.language": "es"})

    assert [m[2] for m in alice.wait_for_messages(1, topic="attributes", timeout=10)] == ["alice:es:same=True"]
    assert [m[2] for m in bob.wait_for_messages(1, topic="attributes", timeout=10)] == ["bob:fr:same=True"]


@pytest.mark.parametrize("command,cause", [
    ("exit", ParticipantCause.ACTOR_CRASHED),
    ("raise", ParticipantCause.ENTRYPOINT_ERROR),
])
def test_a_child_that_crashes_or_raises_leaves_the_job_and_the_other_children_running(serve, rooms, command, cause):
    client, observer, job_id, _ = start(serve, rooms, f"crash-{command}")
    alice, alice_pid = join_and_greet(rooms, f"crash-{command}", "alice")
    bob, _ = join_and_greet(rooms, f"crash-{command}", "bob")

    alice.send_text(command, topic="cmd")

    crashed = wait_until(lambda: (a := actors_of(client, job_id).get("alice")) and a.state == ParticipantActorState.FAILED and a, timeout=10)
    assert crashed.cause == cause and crashed.error
    if command == "raise":
        assert "handler for alice failed" in crashed.error
        assert ("agent-" + job_id, "bye", "bye alice (participant entrypoint raised)") in observer.messages()
    wait_until(lambda: not process_alive(alice_pid), timeout=5)
    assert client.status(job_id).state == JobState.RUNNING
    bob.send_text("still there?", topic="cmd")
    assert bob.wait_for_messages(1, topic="reply", timeout=10)[0][2] == "bob got still there?"


def test_a_participant_leaving_stops_its_child_and_runs_its_callbacks(serve, rooms):
    client, observer, job_id, _ = start(serve, rooms, "leave")
    alice, alice_pid = join_and_greet(rooms, "leave", "alice")
    bob, _ = join_and_greet(rooms, "leave", "bob")

    alice.leave()

    assert observer.wait_for_messages(1, topic="bye", timeout=10)[0][2] == "bye alice (participant left)"
    wait_until(lambda: not process_alive(alice_pid), timeout=5)
    stopped = wait_until(lambda: (a := actors_of(client, job_id)["alice"]).state == ParticipantActorState.STOPPED and a, timeout=5)
    assert stopped.cause == ParticipantCause.PARTICIPANT_LEFT
    assert client.status(job_id).state == JobState.RUNNING


def test_participants_already_in_the_room_get_a_child_when_the_entrypoint_is_added_late(serve, rooms):
    client, observer, job_id, _ = start(serve, rooms, "late", entrypoint=registers_late)
    alice = rooms.join("late", "alice")
    wait_until(lambda: client.status(job_id).participants == ["alice", "observer"], timeout=10)

    observer.send_text("now", topic="register")

    assert alice.wait_for_messages(1, topic="child", timeout=30)
    assert observer.wait_for_messages(1, topic="duplicate", timeout=10)[0][2] == "DuplicateEntrypoint"
    join_and_greet(rooms, "late", "bob")  # and later joiners too


def test_job_shutdown_stops_every_child_first(serve, rooms):
    client, observer, job_id, _ = start(serve, rooms, "cascade")
    join_and_greet(rooms, "cascade", "alice")
    join_and_greet(rooms, "cascade", "bob")

    client.shutdown(job_id, reason="closing")
    info = client.wait(job_id, timeout=20)

    assert info.state == JobState.SUCCEEDED
    byes = sorted(m[2] for m in observer.messages() if m[1] == "bye")
    assert byes == ["bye alice (job ended)", "bye bob (job ended)"]
    wait_until(lambda: not alive_actors("ParticipantActor"), timeout=5)


def test_a_child_can_end_the_whole_job(serve, rooms):
    client, _observer, job_id, _ = start(serve, rooms, "ender")
    alice, _ = join_and_greet(rooms, "ender", "alice")

    alice.send_text("end-job", topic="cmd")

    info = client.wait(job_id, timeout=20)
    assert (info.cause, info.reason) == (Cause.USER_SHUTDOWN, "alice asked")


def test_killing_the_job_actor_takes_every_child_with_it(serve, rooms):
    client, _observer, job_id, job_pid = start(serve, rooms, "fate")
    _, alice_pid = join_and_greet(rooms, "fate", "alice")
    _, bob_pid = join_and_greet(rooms, "fate", "bob")
    wait_until(lambda: len(alive_actors("ParticipantActor")) == 2, timeout=10)

    os.kill(job_pid, signal.SIGKILL)

    assert client.wait(job_id, timeout=10).cause == Cause.ACTOR_CRASHED
    wait_until(lambda: not alive_actors("ParticipantActor"), timeout=10)
    wait_until(lambda: not process_alive(alice_pid) and not process_alive(bob_pid), timeout=10)


def test_transient_children_restart_until_the_intensity_is_spent(serve, rooms):
    client, _observer, job_id, _ = start(serve, rooms, "restarts", participant_restart="transient",
                                         max_restarts=2, restart_window=60)
    alice, first_pid = join_and_greet(rooms, "restarts", "alice")

    pids = [first_pid]
    for attempt in (1, 2):
        alice.send_text("exit", topic="cmd")
        pids.append(int(alice.wait_for_messages(attempt + 1, topic="child", timeout=30)[attempt][2]))
        # The supervisor learns of the restart from the job's report, a moment after the greeting.
        wait_until(lambda: actors_of(client, job_id)["alice"].restarts == attempt, timeout=10)
    alice.send_text("exit", topic="cmd")

    # FAILED is reported as the attempt ends; the refusal to restart follows in the next report.
    final = wait_until(lambda: (a := actors_of(client, job_id)["alice"]).state == ParticipantActorState.FAILED
                       and "not restarted" in (a.error or "") and a, timeout=10)
    assert final.restarts == 2 and "not restarted: 2 restarts within 60" in final.error
    assert len(set(pids)) == 3
    assert client.status(job_id).state == JobState.RUNNING


def test_without_isolation_participant_entrypoints_run_as_tasks_in_the_job(serve, rooms):
    client, _observer, job_id, job_pid = start(serve, rooms, "tasks", isolate_participants=False)
    alice, alice_pid = join_and_greet(rooms, "tasks", "alice")

    assert alice_pid == job_pid
    alice.send_text("raise", topic="cmd")
    failed = wait_until(lambda: (a := actors_of(client, job_id)["alice"]).state == ParticipantActorState.FAILED and a, timeout=10)
    assert failed.cause == ParticipantCause.ENTRYPOINT_ERROR
    assert client.status(job_id).state == JobState.RUNNING


def test_participants_in_the_room_before_the_job_connects_get_their_child(serve, rooms):
    alice = rooms.join("early", "alice")
    client, _observer, job_id, _ = start(serve, rooms, "early")

    assert alice.wait_for_messages(1, topic="child", timeout=30)


def test_a_childs_broadcast_is_seen_once_by_every_other_participant(serve, rooms):
    client, observer, _job, _ = start(serve, rooms, "news")
    alice, _ = join_and_greet(rooms, "news", "alice")
    bob, _ = join_and_greet(rooms, "news", "bob")

    alice.send_text("broadcast", topic="cmd")

    assert [m[2] for m in bob.wait_for_messages(1, topic="all", timeout=10)] == ["news from alice's actor"]
    observer.wait_for_messages(1, topic="all", timeout=10)
    alice.send_text("sync", topic="cmd")  # the broadcast happened before this reply
    alice.wait_for_messages(1, topic="reply", timeout=10)
    assert [m for m in bob.messages() if m[1] == "all"] == [(f"agent-{_job}", "all", "news from alice's actor")]
    assert [m for m in alice.messages() if m[1] == "all"] == [(f"agent-{_job}", "all", "news from alice's actor")]


def test_a_participant_who_leaves_and_comes_back_gets_a_fresh_child(serve, rooms):
    client, observer, job_id, _ = start(serve, rooms, "rejoin")
    join_and_greet(rooms, "rejoin", "bob")  # keeps the room from being empty
    alice, first_pid = join_and_greet(rooms, "rejoin", "alice")

    alice.leave()
    again, second_pid = join_and_greet(rooms, "rejoin", "alice")

    assert second_pid != first_pid
    again.send_text("hello again", topic="cmd")
    assert again.wait_for_messages(1, topic="reply", timeout=10)[0][2] == "alice got hello again"
    wait_until(lambda: not process_alive(first_pid), timeout=10)


def test_a_participant_who_joins_and_leaves_at_once_leaves_no_child_behind(serve, rooms):
    client, observer, job_id, _ = start(serve, rooms, "blink")
    join_and_greet(rooms, "blink", "bob")  # keeps the room from being empty
    rooms.join("blink", "carol").leave()
    join_and_greet(rooms, "blink", "dave")  # the job has processed carol's visit by now

    carol = wait_until(lambda: (a := actors_of(client, job_id).get("carol")) and a.state in (
        ParticipantActorState.STOPPED, ParticipantActorState.KILLED) and a, timeout=15)
    assert carol.cause == ParticipantCause.PARTICIPANT_LEFT
    wait_until(lambda: len(alive_actors("ParticipantActor")) == 2, timeout=15)  # bob's and dave's only


def test_children_are_stopped_within_their_share_and_die_with_a_job_killed_at_its_deadline(serve, rooms):
    client, _observer, job_id, _ = start(serve, rooms, "deadline", entrypoint=hangs_on_shutdown_with_children,
                                         shutdown_process_timeout=2)
    _, alice_pid = join_and_greet(rooms, "deadline", "alice")

    asked = time.monotonic()
    client.shutdown(job_id, reason="closing")
    info = client.wait(job_id, timeout=10)

    assert (info.state, info.cause) == (JobState.KILLED, Cause.SHUTDOWN_TIMEOUT)
    assert time.monotonic() - asked < 2 + 0.5
    wait_until(lambda: not alive_actors("ParticipantActor"), timeout=5)
    wait_until(lambda: not process_alive(alice_pid), timeout=5)


def test_an_unknown_participant_kind_is_a_typed_error(serve, rooms):
    _client, observer, _job, _ = start(serve, rooms, "kinds", entrypoint=checks_kind)
    # start() already read the pid message on topic "job"; the error name follows it
    assert observer.wait_for_messages(2, topic="job", timeout=10)[1][2] == "InvalidAgent"


def test_a_child_shut_down_before_its_entrypoint_runs_is_killed_at_once(serve, rooms, tmp_path):
    """No user code of the child has run yet: nothing graceful to wait for."""
    announced = tmp_path / "child-pid"
    client = serve(with_slow_to_start_children, end_when="never", participant_shutdown_timeout=10,
                   initialize_process_timeout=60)
    observer = rooms.join("slow-start", "observer", kind=AGENT)
    job_id = client.submit(room="slow-start", metadata=str(announced))
    observer.wait_for_messages(1, topic="job", timeout=30)
    alice = rooms.join("slow-start", "alice")
    child_pid = int(wait_until(lambda: announced.exists() and announced.read_text(), timeout=30))  # loading

    left = time.monotonic()
    alice.leave()
    wait_until(lambda: not process_alive(child_pid), timeout=15)
    gone_in = time.monotonic() - left

    assert gone_in < 2.0, gone_in  # neither participant_shutdown_timeout (10 s) nor the start's 60 s
    ended = (ParticipantActorState.STOPPED, ParticipantActorState.FAILED, ParticipantActorState.KILLED)
    child = wait_until(lambda: (a := actors_of(client, job_id).get("alice")) and a.state in ended and a, timeout=10)
    assert (child.state, child.cause, child.pid) == (
        ParticipantActorState.STOPPED, ParticipantCause.PARTICIPANT_LEFT, None)  # no pid: it never ran
    assert client.status(job_id).state == JobState.RUNNING


def test_a_leaving_participants_child_whose_callback_hangs_is_killed_at_participant_shutdown_timeout(serve, rooms):
    timeout = 2.0
    client, observer, job_id, _ = start(serve, rooms, "hang-on-leave", entrypoint=with_hanging_children,
                                        participant_shutdown_timeout=timeout, end_when="never")
    alice, alice_pid = join_and_greet(rooms, "hang-on-leave", "alice")

    left = time.monotonic()
    alice.leave()
    assert observer.wait_for_messages(1, topic="bye", timeout=10)[0][2] == "stopping alice (participant left)"
    wait_until(lambda: not process_alive(alice_pid), timeout=timeout + 10)
    gone_in = time.monotonic() - left

    assert timeout <= gone_in < timeout + 1.5, gone_in
    killed = wait_until(lambda: (a := actors_of(client, job_id)["alice"]).state == ParticipantActorState.KILLED and a,
                        timeout=5)
    assert (killed.cause, killed.error) == (ParticipantCause.SHUTDOWN_TIMEOUT, "did not stop within 2s")
    assert client.status(job_id).state == JobState.RUNNING


def test_during_a_job_shutdown_a_hanging_child_gets_half_the_budget_and_the_jobs_callbacks_still_run(serve, rooms):
    """Children get at most ``participant_shutdown_timeout`` (here 30 s) and half the job's
    budget (here 6 s): a child that hangs is killed at 3 s, and the job ends on its own."""
    budget = 6.0
    client, observer, job_id, _ = start(serve, rooms, "share", entrypoint=with_hanging_children,
                                        shutdown_process_timeout=budget, participant_shutdown_timeout=30)
    _, alice_pid = join_and_greet(rooms, "share", "alice")

    asked = time.monotonic()
    client.shutdown(job_id, reason="closing")
    wait_until(lambda: not process_alive(alice_pid), timeout=budget + 10)
    gone_in = time.monotonic() - asked
    info = client.wait(job_id, timeout=budget + 10)

    assert budget / 2 <= gone_in < budget / 2 + 1.5, gone_in
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN)  # not KILLED at its deadline
    assert info.timestamps["SUCCEEDED"] - info.timestamps["SHUTTING_DOWN"] < budget
    assert [m[2] for m in observer.messages() if m[1] in ("bye", "last-word")] == [
        "stopping alice (job ended)", "job callback (closing)"]
    (alice,) = info.participant_actors
    assert (alice.state, alice.cause, alice.error) == (
        ParticipantActorState.KILLED, ParticipantCause.SHUTDOWN_TIMEOUT, "did not stop within 3s")
