"""Supervision policies: restarts, health, memory, warm pool, admission, drain, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time

import pytest
import ray
from support import actor_pid, job_actor_names, only_pool_actors_left, process_alive, wait_until, worker_log_lines

from rayvisor import Cause, JobContext, JobSpec, JobState, rtc
from rayvisor.errors import AtCapacity, Draining, JobRejected
from rayvisor.supervisor.supervisor import SUPERVISOR_NAME

AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


async def answers_and_crashes(ctx: JobContext) -> None:
    """Greets with its pid; "crash" -> os._exit(1), "raise" -> entrypoint error, "bye" -> ctx.shutdown."""
    commands: asyncio.Queue[str] = asyncio.Queue()

    async def on_command(reader, sender: str) -> None:
        commands.put_nowait(await reader.read_all())

    ctx.room.register_text_stream_handler("cmd", on_command)
    await ctx.connect()
    await ctx.room.local_participant.send_text(str(os.getpid()), topic="hello")
    while True:
        command = await commands.get()
        if command == "crash":
            os._exit(1)
        if command == "raise":
            raise RuntimeError("boom")
        if command == "bye":
            ctx.shutdown(reason="asked to leave")


async def blocks_after_greeting(ctx: JobContext) -> None:
    await ctx.connect()
    await ctx.room.local_participant.send_text(str(os.getpid()), topic="hello")
    await asyncio.sleep(0.2)
    time.sleep(3600)


async def grows(ctx: JobContext) -> None:
    """Allocates 40 MiB every 50 ms while its loop keeps running."""
    await ctx.connect()
    await ctx.room.local_participant.send_text(str(os.getpid()), topic="hello")
    hoard = []
    while True:
        hoard.append(b"\x01" * (40 * 1024 * 1024))
        await asyncio.sleep(0.05)


async def grows_steadily(ctx: JobContext) -> None:
    """Allocates 1 MiB every 25 ms (up to 400 MiB) while its loop keeps running."""
    await ctx.connect()
    await ctx.room.local_participant.send_text(str(os.getpid()), topic="hello")
    hoard = []
    for _ in range(400):
        hoard.append(b"\x01" * (1024 * 1024))
        await asyncio.sleep(0.025)
    await asyncio.Event().wait()


async def grows_with_a_blocked_loop(ctx: JobContext) -> None:
    """Allocates without ever yielding: a shutdown request is never processed."""
    await ctx.connect()
    await ctx.room.local_participant.send_text(str(os.getpid()), topic="hello")
    await asyncio.sleep(0.1)
    hoard = []
    for _ in range(60):
        hoard.append(b"\x01" * (40 * 1024 * 1024))
        time.sleep(0.1)
    time.sleep(3600)


def remember_when_prewarmed(proc) -> None:
    proc.userdata["prewarmed_at"] = time.time()
    proc.userdata["prewarmed_in"] = os.getpid()


def broken_prewarm(proc) -> None:
    raise RuntimeError("no model today")


async def reports_prewarm(ctx: JobContext) -> None:
    await ctx.connect()
    data = ctx.proc.userdata
    await ctx.room.local_participant.send_text(f"{data['prewarmed_at']}|{data['prewarmed_in']}|{os.getpid()}",
                                               topic="hello")


async def accepts_vip_rooms(req) -> None:
    if req.room.name.startswith("vip"):
        await req.accept(identity=f"concierge-{req.id}", name="Concierge", attributes={"tier": "gold"})
    else:
        await req.reject()


async def finishes_when_told(ctx: JobContext) -> None:
    async def on_command(reader, sender: str) -> None:
        if await reader.read_all() == "finish":
            ctx.shutdown(reason="done early")

    ctx.room.register_text_stream_handler("cmd", on_command)
    await ctx.connect()
    await ctx.room.local_participant.send_text(str(os.getpid()), topic="hello")


def submit_and_greet(client, rooms, room: str, **spec):
    observer = rooms.join(room, "observer", kind=AGENT)
    user = rooms.join(room, "user")
    job_id = client.submit(JobSpec(room=room, **spec))
    pid = int(user.wait_for_messages(1, topic="hello", timeout=30)[0][2])
    return job_id, user, observer, pid


# -- restarts ---------------------------------------------------------------------------


def test_transient_job_restarts_after_a_crash_with_its_id_and_rejoins_its_room(serve, rooms):
    client = serve(answers_and_crashes, restart="transient", max_restarts=3)
    job_id, user, _observer, first_pid = submit_and_greet(client, rooms, "phoenix")

    user.send_text("crash", topic="cmd")
    second_pid = int(user.wait_for_messages(2, topic="hello", timeout=30)[1][2])

    info = client.status(job_id)
    assert second_pid != first_pid and info.pid == second_pid
    assert info.state == JobState.RUNNING and info.restarts == 1
    assert [(a.attempt, a.cause) for a in info.attempts] == [(1, Cause.ACTOR_CRASHED)]
    assert info.attempts[0].pid == first_pid
    assert f"agent-{job_id}" in [p.identity for p in rooms.participants("phoenix")]

    user.send_text("bye", topic="cmd")  # a clean end is not restarted
    final = client.wait(job_id, timeout=15)
    assert (final.state, final.cause, final.restarts) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN, 1)


def test_a_shutdown_that_crosses_a_crash_ends_the_job_without_a_restart(serve, rooms, namespace):
    """The user's shutdown wins over the restart policy: whichever the supervisor learns of
    first, the job ends and no attempt starts after the request."""
    client = serve(answers_and_crashes, restart="transient", max_restarts=3, end_when="never")
    job_id, _user, _observer, pid = submit_and_greet(client, rooms, "crossed")

    os.kill(pid, signal.SIGKILL)
    client.shutdown(job_id, reason="done anyway")

    final = client.wait(job_id, timeout=30)
    assert (final.state, final.cause, final.restarts) in {
        (JobState.FAILED, Cause.ACTOR_CRASHED, 0),  # the crash ended the attempt; the shutdown stopped the restart
        (JobState.SUCCEEDED, Cause.USER_SHUTDOWN, 1),  # restarted first; the shutdown stopped the new start
    }
    wait_until(lambda: only_pool_actors_left(client, namespace), timeout=10)  # an ended job starts nothing more
    assert client.status(job_id).restarts == final.restarts


def test_restart_intensity_exhausted_ends_the_job_with_restart_limit(serve, rooms):
    client = serve(answers_and_crashes, restart="transient", max_restarts=2, restart_window=60)
    job_id, user, _observer, _ = submit_and_greet(client, rooms, "fragile")

    for attempt in range(1, 4):
        user.send_text("raise" if attempt % 2 else "crash", topic="cmd")
        if attempt < 3:
            user.wait_for_messages(attempt + 1, topic="hello", timeout=30)

    info = client.wait(job_id, timeout=30)
    assert (info.state, info.cause, info.restarts) == (JobState.FAILED, Cause.RESTART_LIMIT, 2)
    assert [a.cause for a in info.attempts] == [Cause.ENTRYPOINT_ERROR, Cause.ACTOR_CRASHED, Cause.ENTRYPOINT_ERROR]
    assert "2 restarts within restart_window=60" in info.error


def test_temporary_jobs_are_not_restarted_and_spec_overrides_the_policy(serve, rooms):
    client = serve(answers_and_crashes)  # temporary by default
    job_id, user, _observer, _ = submit_and_greet(client, rooms, "once")
    user.send_text("crash", topic="cmd")
    assert client.wait(job_id, timeout=15).cause == Cause.ACTOR_CRASHED

    job_id, user, _observer, _ = submit_and_greet(client, rooms, "twice", restart="permanent")
    user.leave()  # room_empty is not an explicit end: a permanent job comes back
    wait_until(lambda: client.status(job_id).restarts == 1, timeout=30)
    client.shutdown(job_id, reason="enough")
    info = client.wait(job_id, timeout=15)
    assert (info.cause, info.restarts) == (Cause.USER_SHUTDOWN, 1)
    assert info.attempts[0].cause == Cause.ROOM_EMPTY


# -- health and memory ---------------------------------------------------------------


def test_a_blocked_entrypoint_is_killed_as_unresponsive(serve, rooms):
    interval, timeout = 0.3, 1.0
    client = serve(blocks_after_greeting, ping_interval=interval, ping_timeout=timeout)
    job_id, _user, _observer, pid = submit_and_greet(client, rooms, "frozen")
    blocked_at = time.monotonic()  # within 0.2 s of the greeting

    info = client.wait(job_id, timeout=15)
    detected = time.monotonic() - blocked_at

    assert (info.state, info.cause) == (JobState.KILLED, Cause.UNRESPONSIVE)
    assert detected <= timeout + interval * 1.1 + 0.2 + 0.5, detected
    wait_until(lambda: not process_alive(pid), timeout=5)


def test_a_job_that_outgrows_its_memory_limit_is_shut_down(serve, rooms):
    client = serve(grows, job_memory_limit_mb=400, job_memory_warn_mb=250, memory_check_interval=0.1)
    job_id, _user, _observer, _ = submit_and_greet(client, rooms, "hungry")

    info = client.wait(job_id, timeout=30)

    assert (info.state, info.cause) == (JobState.FAILED, Cause.MEMORY_LIMIT)
    assert "job_memory_limit_mb=400" in info.reason


def test_a_job_over_its_limit_that_keeps_growing_is_killed_at_once(serve, rooms):
    client = serve(grows_with_a_blocked_loop, job_memory_limit_mb=400, memory_check_interval=0.1,
                   shutdown_process_timeout=60)
    job_id, _user, _observer, _ = submit_and_greet(client, rooms, "runaway")

    info = client.wait(job_id, timeout=30)  # far less than the 60 s budget

    assert (info.state, info.cause) == (JobState.KILLED, Cause.MEMORY_LIMIT)
    assert "still growing" in info.error


def test_memory_warnings_carry_the_growth_and_come_at_most_once_per_interval(serve, rooms, namespace):
    """Reports every 50 ms, all above the warning line: the supervisor (whose log Ray keeps in
    the session's files) warns at most once per ``memory_warn_interval``."""
    interval = 1.0
    client = serve(grows_steadily, job_memory_warn_mb=1, memory_check_interval=0.05, memory_warn_interval=interval)
    supervisor_pid = actor_pid(ray.get_actor(SUPERVISOR_NAME, namespace=namespace))  # serve() got its answer
    job_id, _user, _observer, _ = submit_and_greet(client, rooms, "growing")

    def warnings() -> list[dict]:
        records = [json.loads(line) for line in worker_log_lines(supervisor_pid) if job_id in line]
        return [r for r in records if r["level"] == "WARNING" and "job_memory_warn_mb=1" in r["message"]]

    wait_until(lambda: len(warnings()) >= 4, timeout=30, interval=0.1)
    client.shutdown(job_id, reason="enough")
    client.wait(job_id, timeout=20)  # it reports (and may be warned about) until it ends
    warned = warnings()
    elapsed = time.time() - warned[0]["ts"]  # every warning came between the first and now

    assert 4 <= len(warned) <= elapsed / interval + 1, (len(warned), elapsed)
    gaps = [b["ts"] - a["ts"] for a, b in zip(warned, warned[1:])]
    assert min(gaps) >= interval * 0.95, gaps  # wall-clock stamps of a monotonic rate limit
    assert "first warning" in warned[0]["message"]
    growths = [re.search(r"([+-]\d+) MiB since the last warning", w["message"]) for w in warned[1:]]
    assert all(growths), [w["message"] for w in warned]
    assert all(int(g.group(1)) >= 5 for g in growths)  # ~40 MiB a second: growth since the last warning, not the last 50 ms report
    assert all((w["job_id"], w["room"]) == (job_id, "growing") and w["rss_mb"] > 1 for w in warned)


# -- warm pool ------------------------------------------------------------------------


def test_a_job_takes_a_prewarmed_actor_and_sees_its_userdata(serve, rooms):
    client = serve(reports_prewarm, prewarm_fnc=remember_when_prewarmed, num_idle_actors=1,
                   max_idle_actors=1)  # a pool of exactly one: the test counts its idle actors
    wait_until(lambda: client.metrics().gauges.get("rayvisor_idle_actors|agent=") == 1, timeout=30)
    user = rooms.join("warm", "user")

    submitted = time.time()
    client.submit(room="warm")
    prewarmed_at, prewarmed_in, job_pid = user.wait_for_messages(1, topic="hello", timeout=30)[0][2].split("|")

    assert float(prewarmed_at) < submitted  # prewarmed before the job existed
    assert prewarmed_in == job_pid
    wait_until(lambda: client.metrics().gauges.get("rayvisor_idle_actors|agent=") == 1, timeout=30)  # refilled


def test_a_failing_prewarm_is_retried_with_backoff_not_in_a_tight_loop(serve):
    client = serve(reports_prewarm, prewarm_fnc=broken_prewarm, num_idle_actors=1, max_idle_actors=1,  # one at a time
                   pool_backoff_initial=0.3, pool_backoff_max=5)
    failures = lambda: client.metrics().counters.get("rayvisor_pool_prewarm_failures|agent=", 0)  # noqa: E731
    wait_until(lambda: failures() >= 1, timeout=30)
    first_seen = time.monotonic()
    wait_until(lambda: time.monotonic() - first_seen > 2.0, timeout=5, interval=0.1)

    # backoff 0.3, 0.6, 1.2 s (+ ~0.4 s per cold actor): at most a handful in 2 s
    assert 1 <= failures() <= 4, failures()


# -- admission -------------------------------------------------------------------------


def test_submits_beyond_max_jobs_fail_fast_and_no_running_job_is_lost(serve, rooms):
    client = serve(answers_and_crashes, max_jobs=2)
    first, user1, _, _ = submit_and_greet(client, rooms, "cap-1")
    second, _user2, _, _ = submit_and_greet(client, rooms, "cap-2")

    asked = time.monotonic()
    with pytest.raises(AtCapacity, match="max_jobs=2"):
        client.submit(room="cap-3")
    assert time.monotonic() - asked < 1.0
    assert {client.status(j).state for j in (first, second)} == {JobState.RUNNING}
    assert len(client.list()) == 2

    user1.send_text("bye", topic="cmd")
    client.wait(first, timeout=15)
    client.submit(room="cap-3")  # capacity freed


def test_load_fnc_above_the_threshold_or_failing_means_at_capacity(serve):
    client = serve(answers_and_crashes, load_fnc=lambda info: 0.9, load_threshold=0.8)
    with pytest.raises(AtCapacity, match="load 0.90"):
        client.submit(room="busy")



def broken_load(info) -> float:
    raise RuntimeError("metrics backend down")


def test_a_failing_load_fnc_fails_closed(serve):
    client = serve(answers_and_crashes, load_fnc=broken_load)
    with pytest.raises(AtCapacity, match="metrics backend down"):
        client.submit(room="unknown-load")


def test_job_resources_that_are_not_free_are_at_capacity_at_once(serve):
    client = serve(answers_and_crashes, job_resources={"rayvisor_gpu_that_does_not_exist": 1})
    asked = time.monotonic()
    with pytest.raises(AtCapacity, match="not enough free Ray resources"):
        client.submit(room="nowhere")
    assert time.monotonic() - asked < 1.0
    assert client.list() == []


def test_request_fnc_accepts_or_rejects_each_job(serve, rooms):
    client = serve(answers_and_crashes, request_fnc=accepts_vip_rooms)

    with pytest.raises(JobRejected, match="rejected by request_fnc"):
        client.submit(room="plain-room")
    rejected = client.list()[0]
    assert (rejected.state, rejected.cause) == (JobState.REJECTED, Cause.REJECTED)

    job_id, _user, _observer, _ = submit_and_greet(client, rooms, "vip-lounge")
    agent = next(p for p in rooms.participants("vip-lounge") if p.identity.startswith("concierge-"))
    assert agent.identity == f"concierge-{job_id}" and agent.name == "Concierge"
    assert agent.attributes == {"tier": "gold"}


async def decides_slowly(req) -> None:
    await asyncio.sleep(1.0)
    await req.reject()


def test_stopping_while_request_fnc_decides_ends_the_job_cleanly(serve):
    from rayvisor.errors import JobRejected as Rejected

    client = serve(answers_and_crashes, request_fnc=decides_slowly)
    outcome: list = []

    def submit() -> None:
        try:
            client.submit(room="undecided")
        except Rejected as err:
            outcome.append(err)

    submitter = threading.Thread(target=submit)
    submitter.start()
    wait_until(lambda: client.list(), timeout=5)
    job_id = client.list()[0].id
    client.shutdown(job_id, reason="never mind")
    submitter.join(timeout=10)

    info = client.wait(job_id, timeout=10)
    assert outcome and info.state == JobState.REJECTED
    assert client.list()[0].state.is_terminal


# -- drain -----------------------------------------------------------------------------


def test_drain_lets_short_jobs_finish_and_shuts_long_ones_down_at_the_deadline(serve, rooms):
    client = serve(finishes_when_told)
    short, short_user, _, _ = submit_and_greet(client, rooms, "short")
    long, _, _, _ = submit_and_greet(client, rooms, "long")

    result: list = []
    drainer = threading.Thread(target=lambda: result.append(client.drain(timeout=1.5)))
    drainer.start()
    wait_until(lambda: _refuses(client), timeout=5)
    short_user.send_text("finish", topic="cmd")  # ends on its own during the drain
    drainer.join(timeout=30)

    assert result and (result[0].ended_on_their_own, result[0].shut_down) == (1, 1)
    assert client.status(short).cause == Cause.USER_SHUTDOWN
    assert (client.status(long).state, client.status(long).cause) == (JobState.SUCCEEDED, Cause.DRAINED)


def _refuses(client) -> bool:
    """Probe without risk of admitting a job: an unknown agent is refused either way, but a
    draining supervisor says Draining first."""
    from rayvisor.errors import UnknownAgent

    try:
        client.submit(room="too-late", agent_name="no-such-agent")
    except Draining:
        return True
    except UnknownAgent:
        return False
    raise AssertionError("the probe was admitted")


# -- metrics ---------------------------------------------------------------------------


def test_metrics_count_admissions_ends_kills_and_latencies(serve, rooms):
    client = serve(answers_and_crashes, max_jobs=1, shutdown_process_timeout=5)
    job_id, user, _, _ = submit_and_greet(client, rooms, "counted")
    with pytest.raises(AtCapacity):
        client.submit(room="not-counted")
    user.send_text("bye", topic="cmd")
    client.wait(job_id, timeout=15)

    crashing, crasher, _, _ = submit_and_greet(client, rooms, "counted-2", restart="transient")
    crasher.send_text("crash", topic="cmd")
    crasher.wait_for_messages(2, topic="hello", timeout=30)
    client.shutdown(crashing)
    client.wait(crashing, timeout=15)

    snapshot = client.metrics()
    assert snapshot.counters["rayvisor_job_restarts|cause=actor_crashed"] == 1
    assert snapshot.counters["rayvisor_jobs_admitted|agent="] == 2
    assert snapshot.counters["rayvisor_jobs_rejected|reason=at_capacity"] == 1
    assert snapshot.counters["rayvisor_jobs_ended|cause=user_shutdown|state=SUCCEEDED"] == 2
    assert snapshot.gauges["rayvisor_active_jobs"] == 0
    assert snapshot.histograms["rayvisor_job_start_seconds"].count == 3  # two jobs, one restart
    assert snapshot.histograms["rayvisor_job_shutdown_seconds"].count == 2


def test_unresponsive_kills_are_counted(serve, rooms):
    client = serve(blocks_after_greeting, ping_interval=0.3, ping_timeout=1.0)
    job_id, _user, _observer, _ = submit_and_greet(client, rooms, "counted-kill")
    client.wait(job_id, timeout=15)
    assert client.metrics().counters["rayvisor_job_kills|cause=unresponsive"] == 1


def test_closing_the_warm_pool_leaves_no_idle_actor(serve, namespace):
    import ray

    client = serve(reports_prewarm, prewarm_fnc=remember_when_prewarmed, num_idle_actors=2,
                   max_idle_actors=2)  # exactly two idle actors to see closed
    wait_until(lambda: client.metrics().gauges.get("rayvisor_idle_actors|agent=") == 2, timeout=30)

    client.drain(timeout=1)

    def idle_actors() -> list[str]:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == namespace and a["name"].startswith("rayvisor-job-idle-")]

    wait_until(lambda: not idle_actors(), timeout=10)


def slow_prewarm(proc) -> None:
    time.sleep(0.4)  # e.g. loading a model


async def waits(ctx: JobContext) -> None:
    await asyncio.Event().wait()


def cold_start_seconds(serve) -> float:
    """How long one cold start (actor, agent import, ``slow_prewarm``) takes on this machine."""
    client = serve(waits, agent_name="calibration", prewarm_fnc=slow_prewarm, max_concurrent_starts=1,
                   initialize_process_timeout=60, end_when="never")
    job_id = client.submit(JobSpec(room="calibration", agent_name="calibration"))
    info = client.wait_for_state(job_id, JobState.RUNNING, timeout=60)
    client.shutdown(job_id)
    client.wait(job_id, timeout=30)
    return info.entered(JobState.RUNNING) - info.entered(JobState.PENDING)


def test_a_burst_starts_a_few_actors_at_a_time_and_none_times_out_waiting(serve):
    """Cold starts wait for a start slot; each gets its whole initialize_process_timeout."""
    timeout = 2 * cold_start_seconds(serve) + 0.5  # ample for one start, too short for the burst's wait
    client = serve(waits, agent_name="burst", prewarm_fnc=slow_prewarm, max_concurrent_starts=1,
                   initialize_process_timeout=timeout, end_when="never")
    job_ids = [client.submit(JobSpec(room=f"burst-{i}", agent_name="burst")) for i in range(4)]
    infos = [client.wait_for_state(j, JobState.RUNNING, JobState.FAILED, timeout=120) for j in job_ids]
    assert [i.state for i in infos] == [JobState.RUNNING] * 4, [i.error for i in infos]
    running_at = sorted(i.entered(JobState.RUNNING) for i in infos)
    assert running_at[-1] - infos[0].entered(JobState.PENDING) > timeout  # longer than the timeout, yet none failed
    assert all(b - a >= 0.35 for a, b in zip(running_at, running_at[1:]))  # one at a time


def slower_prewarm(proc) -> None:
    time.sleep(3.0)


def test_a_job_shut_down_while_waiting_for_a_start_slot_ends_at_once_without_an_actor(serve, namespace):
    client = serve(waits, prewarm_fnc=slower_prewarm, max_concurrent_starts=1, initialize_process_timeout=20,
                   end_when="never")
    first = client.submit(room="holds-the-slot")
    client.wait_for_state(first, JobState.STARTING, timeout=10)
    queued = client.submit(room="waits-its-turn")  # STARTING, behind the first job's slot
    client.wait_for_state(queued, JobState.STARTING, timeout=10)
    asked = time.monotonic()
    client.shutdown(queued, reason="not needed after all")
    info = client.wait(queued, timeout=10)
    assert time.monotonic() - asked < 1.0  # not after the first job's 3 s start
    assert (info.state, info.cause, info.pid) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN, None)
    assert client.wait_for_state(first, JobState.RUNNING, timeout=30).state == JobState.RUNNING


def test_a_job_shut_down_while_its_actor_starts_ends_at_once_and_its_actor_is_gone(serve, namespace):
    """Until its actor has started no entrypoint ran: nothing graceful to wait for."""
    client = serve(waits, prewarm_fnc=slower_prewarm, initialize_process_timeout=20, shutdown_process_timeout=10,
                   end_when="never", num_idle_actors=0, max_idle_actors=0)  # a cold start: the job's own actor
    job_id = client.submit(room="still-starting")
    wait_until(lambda: job_actor_names(namespace), timeout=10)  # its actor exists and runs prewarm_fnc
    asked = time.monotonic()
    client.shutdown(job_id, reason="not needed after all")

    info = client.wait(job_id, timeout=10)

    assert time.monotonic() - asked < 1.0  # neither the 3 s prewarm nor the 10 s budget
    assert (info.state, info.cause, info.pid) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN, None)
    wait_until(lambda: not job_actor_names(namespace), timeout=10)
