"""A job pings its participant actors: a child whose event loop is blocked is noticed, killed
and handled as a crashed one, while its job and the other children go on."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from support import process_alive, wait_until

from rayvisor import JobContext, JobState, WorkerOptions, rtc
from rayvisor.errors import InvalidAgent
from rayvisor.messages import ParticipantActorState, ParticipantCause

AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

PING_INTERVAL = 0.5
PING_TIMEOUT = 2.0
NOTICE_SLACK = 5.0
"""Beyond a ping interval (with its 10 % jitter) and the ping timeout: for the kill to reach
the process on a busy test machine."""
NOTICE_DEADLINE = PING_INTERVAL * 1.1 + PING_TIMEOUT + NOTICE_SLACK
BLOCK_SECONDS = 60.0
"""How long a blocked child sleeps: far beyond ``NOTICE_DEADLINE``, so only the ping's kill
ends it in time."""
START_DEADLINE = 30.0
"""For a job or a child actor to start and greet (a cold Ray worker on a busy machine)."""
REPLY_DEADLINE = 10.0
REPORT_DEADLINE = 10.0
"""For the supervisor to learn of a child's new state from its job's report."""


async def blocks_on_command(ctx, participant) -> None:
    """Greets its participant with its pid; ``block`` blocks its event loop, anything else is echoed."""
    me = participant.identity
    commands: asyncio.Queue[str] = asyncio.Queue()

    async def on_command(reader, sender: str) -> None:
        commands.put_nowait(await reader.read_all())

    ctx.room.register_text_stream_handler("cmd", on_command)
    await ctx.room.local_participant.send_text(f"{os.getpid()}", topic="child", destination_identities=[me])
    while True:
        command = await commands.get()
        if command == "block":
            time.sleep(BLOCK_SECONDS)  # the mistake under test: a blocking call in async code
        await ctx.room.local_participant.send_text(f"{me} got {command}", topic="reply", destination_identities=[me])


async def with_blockable_children(ctx: JobContext) -> None:
    ctx.add_participant_entrypoint(blocks_on_command)
    await ctx.connect()
    await ctx.room.local_participant.send_text(f"{os.getpid()}", topic="job")


def start(serve, rooms, room: str, **options):
    client = serve(with_blockable_children, participant_ping_interval=PING_INTERVAL,
                   participant_ping_timeout=PING_TIMEOUT, **options)
    observer = rooms.join(room, "observer", kind=AGENT)
    job_id = client.submit(room=room)
    observer.wait_for_messages(1, topic="job", timeout=START_DEADLINE)
    return client, job_id


def join_and_greet(rooms, room: str, identity: str):
    participant = rooms.join(room, identity)
    pid = int(participant.wait_for_messages(1, topic="child", timeout=START_DEADLINE)[0][2])
    return participant, pid


def actors_of(client, job_id):
    return {a.identity: a for a in client.status(job_id).participant_actors}


def test_a_child_whose_event_loop_is_blocked_is_killed_and_its_job_and_siblings_keep_running(serve, rooms):
    client, job_id = start(serve, rooms, "blocked")
    alice, alice_pid = join_and_greet(rooms, "blocked", "alice")
    bob, bob_pid = join_and_greet(rooms, "blocked", "bob")

    alice.send_text("block", topic="cmd")

    wait_until(lambda: not process_alive(alice_pid), timeout=NOTICE_DEADLINE)
    crashed = wait_until(lambda: (a := actors_of(client, job_id)["alice"]).state == ParticipantActorState.FAILED
                         and a, timeout=REPORT_DEADLINE)
    assert crashed.cause == ParticipantCause.UNRESPONSIVE
    assert f"no answer to a liveness ping within participant_ping_timeout={PING_TIMEOUT:g}s" in crashed.error
    assert f"pid {alice_pid}" in crashed.error
    assert client.status(job_id).state == JobState.RUNNING
    bob.send_text("still there?", topic="cmd")
    assert bob.wait_for_messages(1, topic="reply", timeout=REPLY_DEADLINE)[0][2] == "bob got still there?"
    sibling = actors_of(client, job_id)["bob"]  # answered every ping meanwhile: untouched
    assert (sibling.state, sibling.pid, sibling.restarts) == (ParticipantActorState.RUNNING, bob_pid, 0)


def test_a_blocked_child_is_restarted_under_transient_like_a_crashed_one(serve, rooms):
    client, job_id = start(serve, rooms, "blocked-restart", participant_restart="transient")
    alice, first_pid = join_and_greet(rooms, "blocked-restart", "alice")

    alice.send_text("block", topic="cmd")

    greetings = alice.wait_for_messages(2, topic="child", timeout=NOTICE_DEADLINE + START_DEADLINE)
    second_pid = int(greetings[1][2])
    assert second_pid != first_pid
    wait_until(lambda: not process_alive(first_pid), timeout=NOTICE_DEADLINE)
    restarted = wait_until(lambda: (a := actors_of(client, job_id)["alice"]).restarts == 1
                           and a.state == ParticipantActorState.RUNNING and a, timeout=REPORT_DEADLINE)
    assert restarted.pid == second_pid
    alice.send_text("hello again", topic="cmd")
    assert alice.wait_for_messages(1, topic="reply", timeout=REPLY_DEADLINE)[0][2] == "alice got hello again"
    assert client.status(job_id).state == JobState.RUNNING


@pytest.mark.parametrize("name", ["participant_ping_interval", "participant_ping_timeout"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "5"])
def test_participant_ping_settings_must_be_positive_numbers_of_seconds(name, value):
    with pytest.raises(InvalidAgent, match=f"{name} must be a positive number of seconds"):
        WorkerOptions(entrypoint_fnc=with_blockable_children, **{name: value})
