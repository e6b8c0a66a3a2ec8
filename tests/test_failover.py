"""A supervisor crash loses no job: the restarted supervisor takes every job back."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray
from support import process_alive, wait_until

import rayvisor
from rayvisor import Cause, JobContext, JobState, rtc
from rayvisor.supervisor.store import AttemptEndRecord, SupervisorStore
from rayvisor.supervisor.supervisor import SUPERVISOR_NAME

AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


async def echo_or_hang(ctx: JobContext) -> None:
    """Echoes chat; with metadata "hang" its shutdown callback never returns."""

    async def on_chat(reader, sender: str) -> None:
        await ctx.room.local_participant.send_text(f"echo {await reader.read_all()}", topic="echo")

    async def cleanup() -> None:
        if ctx.job.metadata == "hang":
            await asyncio.Event().wait()
        if ctx.job.metadata == "brief":
            await asyncio.sleep(0.1)

    ctx.add_shutdown_callback(cleanup)
    ctx.room.register_text_stream_handler("chat", on_chat)
    await ctx.connect()
    await ctx.room.local_participant.send_text(str(os.getpid()), topic="hello")


def supervisor_pid(namespace: str) -> int:
    import ray._private.state as ray_state

    actor_id = ray.get_actor(SUPERVISOR_NAME, namespace=namespace)._actor_id.hex()
    return ray_state.actors()[actor_id]["Pid"]


def start_job(client, rooms, room: str, metadata: str = ""):
    user = rooms.join(room, "user")
    job_id = client.submit(room=room, metadata=metadata)
    pid = int(user.wait_for_messages(1, topic="hello", timeout=30)[0][2])
    return job_id, user, pid


def test_killing_the_supervisor_leaves_jobs_running_and_the_new_one_reports_them_all(serve, rooms, namespace):
    client = serve(echo_or_hang, shutdown_process_timeout=4)
    running, user, running_pid = start_job(client, rooms, "running")
    finished, finished_user, _ = start_job(client, rooms, "finished")
    finished_user.leave()
    client.wait(finished, timeout=15)
    stuck, _stuck_user, stuck_pid = start_job(client, rooms, "stuck", metadata="hang")
    asked = time.monotonic()
    client.shutdown(stuck, reason="closing")  # its callback hangs: the deadline must still hold
    old_pid = supervisor_pid(namespace)

    os.kill(old_pid, signal.SIGKILL)

    user.send_text("are you there?", topic="chat")  # jobs do not need the supervisor to run
    assert user.wait_for_messages(1, topic="echo", timeout=10)[0][2] == "echo are you there?"
    client = rayvisor.connect(namespace=namespace)
    wait_until(lambda: supervisor_pid(namespace) != old_pid, timeout=30, interval=0.1)
    infos = {i.id: i for i in client.list()}
    assert set(infos) == {running, finished, stuck}
    assert (infos[running].state, client.status(running).pid) == (JobState.RUNNING, running_pid)
    assert client.status(finished).cause == Cause.ROOM_EMPTY

    killed = client.wait(stuck, timeout=15)
    assert (killed.state, killed.cause) == (JobState.KILLED, Cause.SHUTDOWN_TIMEOUT)
    wait_until(lambda: not process_alive(stuck_pid), timeout=5)
    assert time.monotonic() - asked < 4 + 3.0  # the old deadline, give or take the restart

    user.leave()  # reports reach the new supervisor
    info = client.wait(running, timeout=15)
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY)


def test_a_job_whose_actor_died_while_the_supervisor_was_down_is_recorded(serve, rooms, namespace):
    client = serve(echo_or_hang)
    job_id, _user, job_pid = start_job(client, rooms, "orphan")
    old_pid = supervisor_pid(namespace)

    os.kill(old_pid, signal.SIGKILL)
    os.kill(job_pid, signal.SIGKILL)

    client = rayvisor.connect(namespace=namespace)
    info = client.wait(job_id, timeout=30)
    assert (info.state, info.cause) == (JobState.FAILED, Cause.ACTOR_CRASHED)


def test_a_new_supervisor_does_not_take_over_what_a_removed_one_left_behind(serve, rooms, namespace):
    client = serve(echo_or_hang)
    job_id, _user, job_pid = start_job(client, rooms, "left-behind")

    ray.kill(ray.get_actor(SUPERVISOR_NAME, namespace=namespace), no_restart=True)  # removed, not stopped
    fresh = serve(echo_or_hang)

    assert fresh.list() == []
    wait_until(lambda: not process_alive(job_pid), timeout=10)  # its orphaned job actor is reaped


def test_a_shutdown_that_finished_while_the_supervisor_was_down_is_not_recorded_as_a_kill(serve, rooms, namespace):
    """The deadline passes while no supervisor watches, but the job finished in time."""
    client = serve(echo_or_hang, shutdown_process_timeout=0.5)  # shorter than a supervisor restart
    job_id, _user, job_pid = start_job(client, rooms, "finishes-alone", metadata="brief")
    old_pid = supervisor_pid(namespace)
    client.shutdown(job_id, reason="closing")  # SHUTTING_DOWN is recorded; the outcome is not collected yet

    os.kill(old_pid, signal.SIGKILL)

    client = rayvisor.connect(namespace=namespace)
    info = client.wait(job_id, timeout=30)
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN), info.error
    wait_until(lambda: not process_alive(job_pid), timeout=10)


@pytest.mark.parametrize("state,cause,error", [
    (JobState.KILLED, Cause.SHUTDOWN_TIMEOUT, "budget spent"),  # it killed the job at its deadline
    (JobState.SUCCEEDED, Cause.USER_SHUTDOWN, None),  # it collected the outcome, then removed the actor
], ids=["deadline-kill", "outcome-collected"])
def test_an_end_the_previous_supervisor_decided_is_recorded_as_that_end_not_as_a_crash(
        serve, rooms, namespace, state, cause, error):
    """The supervisor writes an attempt's end before it kills the actor. If it dies between
    the kill and the transition, its successor finds the actor gone and must report that
    end (found by the chaos suite: such jobs were reported ``actor_crashed``)."""
    client = serve(echo_or_hang, shutdown_process_timeout=30)
    job_id, _user, job_pid = start_job(client, rooms, "ended-then-orphaned", metadata="hang")
    client.shutdown(job_id, reason="closing")  # its callback hangs: SHUTTING_DOWN for 30 s
    store = SupervisorStore(namespace)
    snapshot = next(s for s in store.jobs() if s.info.id == job_id)

    # What the old supervisor leaves when it dies right after that kill:
    os.kill(supervisor_pid(namespace), signal.SIGKILL)
    end = AttemptEndRecord(state=state, cause=cause, reason="closing", error=error)
    store.put_job(snapshot.model_copy(update={"attempt_end": end}))
    os.kill(job_pid, signal.SIGKILL)

    info = rayvisor.connect(namespace=namespace).wait(job_id, timeout=30)
    assert (info.state, info.cause, info.error) == (state, cause, error)
