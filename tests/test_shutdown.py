"""The shutdown protocol: one budget, enforced from outside the job's process."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import process_alive, wait_until

from rayvisor import Cause, JobContext, JobState, rtc

BUDGET = 2.0
KILL_MARGIN = 0.25
"""The issue's bound: process gone within budget + 0.25 s of the shutdown request."""
OBSERVER = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT  # watches a room without keeping jobs alive


async def cooperative(ctx: JobContext) -> None:
    async def without_reason() -> None:
        await ctx.room.local_participant.send_text("without_reason", topic="callback")

    async def with_reason(reason: str) -> None:
        await ctx.room.local_participant.send_text(f"with_reason:{reason}", topic="callback")

    ctx.add_shutdown_callback(without_reason)
    ctx.add_shutdown_callback(with_reason)
    await ctx.connect()
    await ctx.room.local_participant.send_text("ready", topic="state")
    await asyncio.sleep(3600)


async def swallows_cancellation(ctx: JobContext) -> None:
    await ctx.connect()
    await ctx.room.local_participant.send_text("ready", topic="state")
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass


async def ignores_cancellation(ctx: JobContext) -> None:
    await ctx.connect()
    await ctx.room.local_participant.send_text("ready", topic="state")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(3600)  # "cleanup" that never ends
        raise


async def blocks_the_event_loop(ctx: JobContext) -> None:
    await ctx.connect()
    await ctx.room.local_participant.send_text("ready", topic="state")
    time.sleep(3600)


async def hangs_in_shutdown_callback(ctx: JobContext) -> None:
    async def hang() -> None:
        await asyncio.Event().wait()

    ctx.add_shutdown_callback(hang)
    await ctx.connect()
    await ctx.room.local_participant.send_text("ready", topic="state")


async def shuts_itself_down(ctx: JobContext) -> None:
    async def record(reason: str) -> None:
        await ctx.room.local_participant.send_text(f"callback:{reason}", topic="callback")

    ctx.add_shutdown_callback(record)
    await ctx.connect()
    ctx.shutdown(reason="Session ended")
    ctx.shutdown(reason="a second call changes nothing")
    await asyncio.sleep(3600)


def start_job(serve, rooms, entrypoint, room: str):
    client = serve(entrypoint, shutdown_process_timeout=BUDGET)
    observer = rooms.join(room, "observer", kind=OBSERVER)
    job_id = client.submit(room=room)
    observer.wait_for_messages(1, topic="state", timeout=15)
    info = client.status(job_id)
    assert info.state == JobState.RUNNING
    return client, observer, job_id, info.pid


def test_cooperative_job_succeeds_quickly_and_runs_each_callback_once_with_the_reason(serve, rooms):
    client, observer, job_id, pid = start_job(serve, rooms, cooperative, "coop")

    asked = time.monotonic()
    client.shutdown(job_id, reason="done for today")
    info = client.wait(job_id, timeout=10)
    elapsed = time.monotonic() - asked

    assert info.state == JobState.SUCCEEDED
    assert info.cause == Cause.USER_SHUTDOWN and info.reason == "done for today"
    assert elapsed < 0.5
    callbacks = sorted(text for _, topic, text in observer.messages() if topic == "callback")
    assert callbacks == ["with_reason:done for today", "without_reason"]
    wait_until(lambda: not process_alive(pid), timeout=2)


@pytest.mark.parametrize("entrypoint", [
    swallows_cancellation, ignores_cancellation, blocks_the_event_loop, hangs_in_shutdown_callback,
], ids=lambda f: f.__name__)
def test_job_is_killed_when_shutdown_budget_is_spent(serve, rooms, entrypoint):
    client, _observer, job_id, pid = start_job(serve, rooms, entrypoint, f"hostile-{entrypoint.__name__}")
    assert process_alive(pid)

    asked = time.monotonic()
    client.shutdown(job_id, reason="operator")
    wait_until(lambda: not process_alive(pid), timeout=BUDGET + 5, interval=0.002)
    gone_after = time.monotonic() - asked

    info = client.wait(job_id, timeout=5)
    assert info.state == JobState.KILLED
    assert info.cause == Cause.SHUTDOWN_TIMEOUT
    assert BUDGET - 0.05 <= gone_after <= BUDGET + KILL_MARGIN, gone_after


def test_ctx_shutdown_from_the_entrypoint_ends_the_job_once_with_its_reason(serve, rooms):
    client = serve(shuts_itself_down, shutdown_process_timeout=BUDGET)
    observer = rooms.join("self-ending", "observer", kind=OBSERVER)
    job_id = client.submit(room="self-ending")

    info = client.wait(job_id, timeout=15)

    assert info.state == JobState.SUCCEEDED
    assert info.cause == Cause.USER_SHUTDOWN and info.reason == "Session ended"
    assert [m[2] for m in observer.messages()] == ["callback:Session ended"]


def test_shutdown_of_a_finished_job_is_a_no_op(serve, rooms):
    client, _observer, job_id, _pid = start_job(serve, rooms, cooperative, "twice")
    client.shutdown(job_id, reason="first")
    first = client.wait(job_id, timeout=10)

    again = client.shutdown(job_id, reason="second")

    assert again.state == first.state == JobState.SUCCEEDED
    assert again.reason == "first"
