"""A job actor that dies takes only its own job with it."""

from __future__ import annotations

import ctypes
import os
import signal
import time

import pytest
from support import wait_until

from rayvisor import Cause, JobContext, JobState

DETECTION_BOUND = 1.0
"""The issue's bound: a dead job actor is recorded FAILED/actor_crashed within 1 s."""


async def crashes_on_request(ctx: JobContext) -> None:
    """Answers chat; "exit" -> os._exit(1), "segfault" -> a real segmentation fault."""

    async def on_chat(reader, sender: str) -> None:
        text = await reader.read_all()
        if text == "exit":
            os._exit(1)
        if text == "segfault":
            ctypes.string_at(0)
        await ctx.room.local_participant.send_text(f"echo:{text}", topic="echo")

    ctx.room.register_text_stream_handler("chat", on_chat)
    await ctx.connect()
    await ctx.room.local_participant.send_text(str(os.getpid()), topic="hello")


def running_pair(serve, rooms):
    client = serve(crashes_on_request)
    victim, bystander = rooms.join("victim", "user"), rooms.join("bystander", "user")
    victim_job, bystander_job = client.submit(room="victim"), client.submit(room="bystander")
    victim_pid = int(victim.wait_for_messages(1, topic="hello", timeout=20)[0][2])
    bystander.wait_for_messages(1, topic="hello", timeout=20)
    return client, victim, bystander, victim_job, bystander_job, victim_pid


def assert_crash_recorded_and_bystander_untouched(client, bystander, victim_job, bystander_job, crashed_at):
    info = wait_until(lambda: (i := client.status(victim_job)).state.is_terminal and i, timeout=5, interval=0.002)
    detected_after = time.monotonic() - crashed_at
    assert (info.state, info.cause) == (JobState.FAILED, Cause.ACTOR_CRASHED)
    assert info.error
    assert detected_after < DETECTION_BOUND, detected_after
    assert client.status(bystander_job).state == JobState.RUNNING
    bystander.send_text("still there?", topic="chat")
    assert bystander.wait_for_messages(1, topic="echo", timeout=10)[0][2] == "echo:still there?"


@pytest.mark.parametrize("how", ["exit", "segfault"])
def test_job_that_crashes_itself_fails_alone(serve, rooms, how):
    client, victim, bystander, victim_job, bystander_job, _ = running_pair(serve, rooms)

    crashed_at = time.monotonic()
    victim.send_text(how, topic="chat")

    assert_crash_recorded_and_bystander_untouched(client, bystander, victim_job, bystander_job, crashed_at)


def test_job_whose_process_is_sigkilled_fails_alone(serve, rooms):
    client, _victim, bystander, victim_job, bystander_job, victim_pid = running_pair(serve, rooms)

    crashed_at = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)

    assert_crash_recorded_and_bystander_untouched(client, bystander, victim_job, bystander_job, crashed_at)


def test_a_crashed_jobs_participant_is_taken_out_of_its_room(serve, rooms):
    client, victim, _bystander, victim_job, _bystander_job, victim_pid = running_pair(serve, rooms)
    assert f"agent-{victim_job}" in [p.identity for p in rooms.participants("victim")]

    os.kill(victim_pid, signal.SIGKILL)
    client.wait(victim_job, timeout=5)

    wait_until(lambda: [p.identity for p in rooms.participants("victim")] == ["user"], timeout=5)


def test_losing_the_room_server_ends_jobs_with_room_disconnected(serve, rooms, namespace):
    import ray

    from rayvisor.rooms.local import ROOM_SERVER_NAME

    client, _victim, _bystander, victim_job, bystander_job, _ = running_pair(serve, rooms)

    ray.kill(ray.get_actor(ROOM_SERVER_NAME, namespace=namespace), no_restart=False)  # restarts empty

    for job_id in (victim_job, bystander_job):
        info = client.wait(job_id, timeout=30)
        assert info.cause == Cause.ROOM_DISCONNECTED and info.state == JobState.SUCCEEDED
