"""rayvisor against a LiveKit server: worker registration, dispatch, status, termination.

The server is ``livekit_server.LocalLiveKitServer`` on 127.0.0.1: LiveKit's agent worker
protocol (binary protobuf on ``/agent``) and Twirp, with bearer JWTs checked by
``livekit.api.TokenVerifier``. Dispatches are created with the real ``livekit-api``
client. Job rooms join through ``rtc_stand_in.StandInRoom`` (there is no media server
here), which the server admits only with a valid room token for that room.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from livekit import api
from livekit.protocol import agent as agent_proto
from livekit.protocol import models as models_proto
from ray import cloudpickle

import rtc_stand_in
import rayvisor
from livekit_server import LocalLiveKitServer
from rayvisor import Cause, JobSpec, JobState
from rayvisor.errors import DuplicateJob, InvalidJobSpec, LiveKitNotConfigured
from rayvisor.messages import BridgeState
from rayvisor.supervisor.credentials import LiveKitCredentials
from rayvisor.supervisor.supervisor import SUPERVISOR_NAME
from support import wait_until

cloudpickle.register_pickle_by_value(rtc_stand_in)  # job actors build their rooms from it

TIMEOUT = 60.0
"""Deadline for anything that starts a job actor (cold Ray actors are slow on CI)."""
JS = agent_proto.JobStatus
FAST = dict(worker_status_interval=0.2, reconnect_initial_delay=0.1, reconnect_max_delay=1.0)
"""Bridge timings shortened so the tests see several status updates and reconnects quickly."""


@pytest.fixture(scope="module")
def server() -> Iterator[LocalLiveKitServer]:
    with LocalLiveKitServer() as running:
        yield running


def use_stand_in_rooms(proc: Any) -> None:
    """prewarm_fnc: this job process joins rooms through the stand-in (no media server here)."""
    from rayvisor.rooms import livekit as livekit_backend

    livekit_backend.use_room_factory(rtc_stand_in.StandInRoom)


@pytest.fixture
def agent_name() -> str:
    import uuid

    return "agent-" + uuid.uuid4().hex[:6]


@pytest.fixture
def worker(serve: Callable[..., rayvisor.Client], server: LocalLiveKitServer,
           agent_name: str) -> Callable[..., rayvisor.Client]:
    """``worker(entrypoint, **options)``: serve the agent against the local server and register it."""

    def start(entrypoint: Any, *, register: bool = True, **options: Any) -> rayvisor.Client:
        settings = dict(ws_url=server.ws_url, api_key=server.api_key, api_secret=server.api_secret,
                        agent_name=agent_name, prewarm_fnc=use_stand_in_rooms, **FAST)
        settings.update(options)
        client = serve(entrypoint, **settings)
        if register:
            client.start_worker()
            wait_until(lambda: client.worker_status().state == BridgeState.REGISTERED, timeout=TIMEOUT)
        return client

    return start


def dispatch(server: LocalLiveKitServer, agent_name: str, room: str, metadata: str = "") -> agent_proto.Job:
    """Create a dispatch with the real livekit-api client; the job the server made for it."""

    async def create() -> str:
        async with api.LiveKitAPI(server.url, server.api_key, server.api_secret) as lkapi:
            created = await lkapi.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=agent_name, room=room, metadata=metadata))
            return created.id

    dispatch_id = asyncio.run(create())
    return server.wait_for(lambda: next(iter(server.dispatch_jobs(dispatch_id)), None), timeout=TIMEOUT)


def statuses(server: LocalLiveKitServer, job_id: str) -> list[int]:
    return [status for status, _error in server.job_statuses(job_id)]


def agent_in_room(server: LocalLiveKitServer, room: str) -> models_proto.ParticipantInfo | None:
    return next((p for p in server.participants(room) if p.kind == models_proto.ParticipantInfo.Kind.AGENT), None)


async def report_and_stay(ctx: Any) -> None:
    """Join, publish what the job was given as attributes, stay until the room empties."""
    await ctx.connect()
    await ctx.room.local_participant.set_attributes(
        {"job_id": ctx.job.id, "room": ctx.job.room.name, "metadata": ctx.job.metadata,
         "dispatch_id": ctx.job.dispatch_id})


# --------------------------------------------------------------------------- registration


def test_the_worker_registers_once_for_the_cluster_with_its_agent_and_permissions(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    client = worker(report_and_stay)
    status = client.worker_status()
    registered = [w for w in server.workers() if w.agent_name == agent_name]
    assert len(registered) == 1 and registered[0].connected
    assert registered[0].worker_id == status.worker_id and status.registrations == 1
    assert registered[0].job_type == agent_proto.JobType.JT_ROOM
    assert registered[0].permissions.can_publish and registered[0].permissions.agent
    server.wait_for(lambda: len([w for w in server.workers() if w.agent_name == agent_name][0].status_updates) >= 2)
    latest = [w for w in server.workers() if w.agent_name == agent_name][0].status_updates[-1]
    assert (latest.status, latest.job_count, latest.draining) == (agent_proto.WorkerStatus.WS_AVAILABLE, 0, False)


def test_a_bad_secret_is_refused_clearly_retried_with_backoff_and_breaks_nothing(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    refused_before = server.refused_registrations()
    client = worker(report_and_stay, register=False, api_secret="not-the-secret-not-the-secret-0000")
    client.start_worker()
    wait_until(lambda: client.worker_status().failures >= 3, timeout=TIMEOUT)
    status = client.worker_status()
    assert status.state == BridgeState.REFUSED
    assert "HTTP 401" in status.last_error and "api_secret" in status.last_error
    assert "not-the-secret" not in status.model_dump_json()  # named, never shown
    assert server.refused_registrations() - refused_before >= 3
    assert not [w for w in server.workers() if w.agent_name == agent_name]
    # Backoff, not a crash loop: 0.1 s doubling to 1 s allows only a handful of tries in 2 s.
    before = client.worker_status().failures
    time.sleep(2.0)
    assert client.worker_status().failures - before <= 4
    assert client.list() == []  # the supervisor is unharmed


def test_job_statuses_from_an_outage_reach_the_server_after_it_returns(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    client = worker(report_and_stay)
    server.add_participant("outage-room", "alice")
    job = dispatch(server, agent_name, "outage-room")
    server.wait_for(lambda: statuses(server, job.id) == [JS.JS_RUNNING], timeout=TIMEOUT)
    # In the room and has seen alice (else her leaving would not empty the room for it).
    server.wait_for(lambda: (p := agent_in_room(server, "outage-room")) and "job_id" in p.attributes, timeout=TIMEOUT)
    server.accept_workers(False)
    try:
        server.drop_workers()
        server.remove_participant("outage-room", "alice")  # the job ends while no server hears of it
        assert client.wait(job.id, timeout=TIMEOUT).cause == Cause.ROOM_EMPTY
        wait_until(lambda: client.worker_status().state == BridgeState.DISCONNECTED, timeout=TIMEOUT)
        assert statuses(server, job.id) == [JS.JS_RUNNING]
    finally:
        server.accept_workers(True)
    server.wait_for(lambda: statuses(server, job.id) == [JS.JS_RUNNING, JS.JS_SUCCESS], timeout=TIMEOUT)
    assert client.worker_status().registrations == 2


def test_an_offer_still_deciding_is_withdrawn_by_a_drain_and_nothing_hangs(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    async def slow_request(req: Any) -> None:
        await asyncio.sleep(30)
        await req.accept()

    client = worker(report_and_stay, request_fnc=slow_request, request_timeout=60)
    job = dispatch(server, agent_name, "undecided-room")
    client.wait_for_state(job.id, JobState.PENDING, timeout=TIMEOUT)
    result = client.drain(timeout=0.2)
    info = client.status(job.id)
    assert (info.state, info.cause, result.shut_down) == (JobState.REJECTED, Cause.DRAINED, 1)
    assert client.worker_status().draining


def test_an_agent_without_livekit_settings_cannot_register(serve: Callable[..., rayvisor.Client]) -> None:
    client = serve(report_and_stay)
    with pytest.raises(LiveKitNotConfigured):
        client.start_worker()


# --------------------------------------------------------------------------- dispatch


def test_a_dispatch_runs_the_entrypoint_with_its_job_and_reports_running_then_success(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    client = worker(report_and_stay)
    server.add_participant("support-1", "alice")
    job = dispatch(server, agent_name, "support-1", metadata='{"user": 7}')
    agent = server.wait_for(lambda: (p := agent_in_room(server, "support-1")) and "job_id" in p.attributes and p,
                            timeout=TIMEOUT)
    # Joined with the assignment's own token, under the identity answered at availability.
    assert server.joined_with("support-1", agent.identity) == server.assignment_token(job.id)
    assert agent.identity == f"agent-{job.id}"
    assert server.availability(job.id).participant_identity == agent.identity
    assert dict(agent.attributes) == {"lk.agent.name": agent_name, "job_id": job.id, "room": "support-1",
                                      "metadata": '{"user": 7}', "dispatch_id": job.dispatch_id}
    info = client.status(job.id)
    assert (info.state, info.room, info.metadata) == (JobState.RUNNING, "support-1", '{"user": 7}')
    server.wait_for(lambda: statuses(server, job.id) == [JS.JS_RUNNING])
    server.remove_participant("support-1", "alice")
    assert client.wait(job.id, timeout=TIMEOUT).cause == Cause.ROOM_EMPTY
    server.wait_for(lambda: statuses(server, job.id) == [JS.JS_RUNNING, JS.JS_SUCCESS], timeout=TIMEOUT)


def test_an_entrypoint_error_is_reported_as_js_failed_with_its_message(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    async def broken(ctx: Any) -> None:
        await ctx.connect()
        raise RuntimeError("the model endpoint is down (xyz-42)")

    client = worker(broken)
    job = dispatch(server, agent_name, "broken-room")
    assert client.wait(job.id, timeout=TIMEOUT).state == JobState.FAILED
    server.wait_for(lambda: statuses(server, job.id)[-1:] == [JS.JS_FAILED], timeout=TIMEOUT)
    assert "xyz-42" in server.job_statuses(job.id)[-1][1]


def test_job_termination_runs_the_shutdown_protocol_and_its_callbacks(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str, tmp_path: Path) -> None:
    marker = tmp_path / "callback.txt"

    async def entrypoint(ctx: Any) -> None:
        async def goodbye(reason: str) -> None:
            marker.write_text(reason)

        ctx.add_shutdown_callback(goodbye)
        await ctx.connect()

    client = worker(entrypoint)
    server.add_participant("terminated-room", "alice")
    job = dispatch(server, agent_name, "terminated-room")
    server.wait_for(lambda: statuses(server, job.id) == [JS.JS_RUNNING], timeout=TIMEOUT)
    server.terminate(job.id)
    info = client.wait(job.id, timeout=TIMEOUT)
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.TERMINATED)
    assert marker.read_text() == "terminated by the LiveKit server"
    server.wait_for(lambda: statuses(server, job.id) == [JS.JS_RUNNING, JS.JS_SUCCESS], timeout=TIMEOUT)
    assert agent_in_room(server, "terminated-room") is None


def test_ctx_delete_room_reaches_the_server_and_ends_the_job(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    async def entrypoint(ctx: Any) -> None:
        await ctx.connect()
        await ctx.wait_for_participant(identity="alice")
        await ctx.delete_room()

    client = worker(entrypoint)
    server.add_participant("doomed-room", "alice")
    job = dispatch(server, agent_name, "doomed-room")
    info = client.wait(job.id, timeout=TIMEOUT)
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.ROOM_DELETED)
    assert "doomed-room" in server.deleted_rooms()


def test_at_capacity_the_worker_reports_full_and_declines_availability(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    client = worker(report_and_stay, max_jobs=1)
    server.add_participant("busy-room", "alice")
    first = dispatch(server, agent_name, "busy-room")
    client.wait_for_state(first.id, JobState.RUNNING, timeout=TIMEOUT)

    def latest_status() -> agent_proto.UpdateWorkerStatus | None:
        updates = [w for w in server.workers() if w.agent_name == agent_name][0].status_updates
        return updates[-1] if updates else None

    full = server.wait_for(lambda: (s := latest_status()) and s.status == agent_proto.WorkerStatus.WS_FULL and s)
    assert (full.job_count, full.load) == (1, 1.0)
    second = dispatch(server, agent_name, "other-room")
    answer = server.wait_for(lambda: server.availability(second.id))
    assert not answer.available
    assert [info.id for info in client.list()] == [first.id]


def test_a_dropped_connection_reconnects_and_migrates_running_jobs(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    client = worker(report_and_stay)
    server.add_participant("steady-room", "alice")
    job = dispatch(server, agent_name, "steady-room")
    client.wait_for_state(job.id, JobState.RUNNING, timeout=TIMEOUT)
    server.drop_workers()
    wait_until(lambda: client.worker_status().registrations == 2, timeout=TIMEOUT)
    server.wait_for(lambda: [job.id] in server.migrations(), timeout=TIMEOUT)
    assert client.status(job.id).state == JobState.RUNNING
    assert len([w for w in server.workers() if w.agent_name == agent_name and w.connected]) == 1


def test_garbage_from_the_server_is_skipped_and_the_worker_keeps_serving(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    client = worker(report_and_stay)
    assert server.send_raw(agent_name, b"\xff\x00garbage\x93") == 1
    assert server.send_raw(agent_name, "a text frame") == 1
    server.add_participant("after-garbage", "alice")
    job = dispatch(server, agent_name, "after-garbage")
    client.wait_for_state(job.id, JobState.RUNNING, timeout=TIMEOUT)
    assert client.worker_status().registrations == 1  # the same connection throughout


def test_draining_is_reported_to_the_server(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    client = worker(report_and_stay)
    client.drain(timeout=1.0)
    updates = server.wait_for(lambda: [u for w in server.workers() if w.agent_name == agent_name
                                       for u in w.status_updates if u.draining])
    assert updates[-1].status == agent_proto.WorkerStatus.WS_FULL


# --------------------------------------------------------------------------- jobs from Python


def test_a_job_submitted_from_python_joins_with_a_minted_token_and_no_secret(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer) -> None:
    async def entrypoint(ctx: Any) -> None:
        from rayvisor.agents.options import WorkerOptions

        secrets = [o.api_secret for o in gc.get_objects() if isinstance(o, WorkerOptions) and o.api_secret]
        if os.environ.get("LIVEKIT_API_SECRET"):
            secrets.append("environment")
        await ctx.connect()
        await ctx.room.local_participant.set_attributes({"secrets_seen": str(len(secrets))})
        participants = await ctx.api.room.list_participants(api.ListParticipantsRequest(room=ctx.job.room.name))
        await ctx.room.local_participant.set_attributes({"listed": ",".join(sorted(p.identity for p in participants.participants))})

    client = worker(entrypoint, register=False)
    server.add_participant("python-room", "alice")
    job_id = client.submit(JobSpec(room="python-room"))
    agent = server.wait_for(lambda: (p := agent_in_room(server, "python-room")) and "listed" in p.attributes and p,
                            timeout=TIMEOUT)
    assert agent.identity == f"agent-{job_id}"
    assert agent.attributes["secrets_seen"] == "0"
    assert agent.attributes["listed"] == f"agent-{job_id},alice"


def test_the_api_secret_reaches_no_log_line_status_answer_or_job_process(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str, namespace: str) -> None:
    """Every path that handles it runs (registration, minting, dispatch, a failing job, the
    CLI); then every log file of the Ray session, every answer, and the job's process are
    searched for the secret."""
    from click.testing import CliRunner

    from rayvisor.cli import build_cli

    async def talkative(ctx: Any) -> None:
        import logging

        logging.getLogger("rayvisor.job").warning("job sees %r and %r", ctx.job, ctx.room.name)
        await ctx.connect()
        await ctx.room.local_participant.set_attributes({"pid": str(os.getpid())})
        if ctx.job.metadata == "fail":
            raise RuntimeError(f"failing on purpose with {ctx.job!r}")

    secret = server.api_secret
    client = worker(talkative)
    server.add_participant("secret-room", "alice")
    dispatched = dispatch(server, agent_name, "secret-room")
    submitted = client.submit(JobSpec(room="secret-room-2", metadata="fail"))
    agent = server.wait_for(lambda: (p := agent_in_room(server, "secret-room")) and "pid" in p.attributes and p,
                            timeout=TIMEOUT)
    assert client.wait(submitted, timeout=TIMEOUT).state == JobState.FAILED

    job_process = Path(f"/proc/{agent.attributes['pid']}")
    assert secret.encode() not in (job_process / "environ").read_bytes()
    assert secret.encode() not in (job_process / "cmdline").read_bytes()
    answers = [client.status(dispatched.id).model_dump_json(), client.status(submitted).model_dump_json(),
               *(i.model_dump_json() for i in client.list()), client.worker_status().model_dump_json(),
               client.metrics().model_dump_json(), *(e.model_dump_json() for e in client.events())]
    runner = CliRunner()
    for command in (["status", dispatched.id], ["jobs", "--json"], ["worker-status"], ["metrics"]):
        result = runner.invoke(build_cli(), [*command, "--namespace", namespace], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        answers.append(result.output)
    assert not [a for a in answers if secret in a]
    server.remove_participant("secret-room", "alice")
    client.wait(dispatched.id, timeout=TIMEOUT)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    searched = [f for f in logs.rglob("*") if f.is_file()]
    assert len(searched) > 10 and any(b"job sees" in f.read_bytes() for f in searched)  # the job's lines are there
    assert [f.name for f in searched if secret.encode() in f.read_bytes()] == []


def test_minted_tokens_are_scoped_to_the_jobs_room() -> None:
    credentials = LiveKitCredentials(url="ws://lk", api_key="key", api_secret="secret-secret-secret-secret-0000")
    verifier = api.TokenVerifier("key", "secret-secret-secret-secret-0000")
    room = verifier.verify(credentials.room_token(
        room="r1", identity="agent-RJ_1", name="n", attributes={"a": "b"}, metadata="m",
        permissions=rayvisor.WorkerPermissions(can_publish=False), ttl=60))
    assert (room.identity, room.kind, room.video.room, room.video.room_join) == ("agent-RJ_1", "agent", "r1", True)
    assert not room.video.room_admin and not room.video.room_create and room.video.can_publish is False
    admin = verifier.verify(credentials.api_token(room="r1", ttl=60))
    assert (admin.video.room, admin.video.room_admin, admin.video.room_join) == ("r1", True, None)
    assert admin.video.room_create  # LiveKit's DeleteRoom needs it, and it is not room-scoped (see README)
    assert not admin.video.room_list and not admin.video.agent


# --------------------------------------------------------------------------- job ids


def test_a_job_id_makes_submit_idempotent_and_cannot_be_reused_for_another_room(
        serve: Callable[..., rayvisor.Client]) -> None:
    client = serve(report_and_stay)
    first = client.submit(JobSpec(room="room-a", job_id="AJ_fixed_1"))
    assert first == "AJ_fixed_1"
    assert client.submit(JobSpec(room="room-a", job_id="AJ_fixed_1")) == first
    assert len(client.list()) == 1
    with pytest.raises(DuplicateJob):
        client.submit(JobSpec(room="room-b", job_id="AJ_fixed_1"))
    with pytest.raises(InvalidJobSpec):
        client.submit(JobSpec(room="room-a", token="a-token"))  # LiveKit-only fields on a local agent
    with pytest.raises(InvalidJobSpec):
        JobSpec(room="room-a", job_id="no spaces allowed")
    with pytest.raises(InvalidJobSpec):
        client.submit(JobSpec(room="room-a", origin="livekit"))  # only the worker bridge speaks for LiveKit


def test_the_api_secret_is_hidden_from_processes_a_driver_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from rayvisor.agents.options import secret_hidden_from_children

    monkeypatch.setenv("LIVEKIT_API_SECRET", "s3cret")
    with secret_hidden_from_children():
        child_env = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('LIVEKIT_API_SECRET'))"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    assert child_env == "None" and os.environ["LIVEKIT_API_SECRET"] == "s3cret"


# --------------------------------------------------------------------------- the same runtime on LiveKit


def test_participant_entrypoints_run_in_child_actors_on_livekit_rooms(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str) -> None:
    async def greet(ctx: Any, participant: Any) -> None:
        listed = await ctx.api.room.list_participants(api.ListParticipantsRequest(room=ctx.job.room.name))
        assert participant.identity in {p.identity for p in listed.participants}  # ctx.api works in a child too
        await ctx.room.local_participant.set_attributes({f"greeted-{participant.identity}": str(os.getpid())})

    async def entrypoint(ctx: Any) -> None:
        ctx.add_participant_entrypoint(greet)
        await ctx.connect()

    client = worker(entrypoint)
    server.add_participant("lobby", "alice")
    job = dispatch(server, agent_name, "lobby")
    server.add_participant("lobby", "bob", kind=models_proto.ParticipantInfo.Kind.SIP)
    agent = server.wait_for(lambda: (p := agent_in_room(server, "lobby"))
                            and {"greeted-alice", "greeted-bob"} <= set(p.attributes) and p, timeout=TIMEOUT)
    child_pids = {agent.attributes["greeted-alice"], agent.attributes["greeted-bob"]}
    assert len(child_pids) == 2 and str(client.status(job.id).pid) not in child_pids  # one process per participant


def test_a_room_token_the_server_refuses_fails_the_job_with_connect_failed(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer) -> None:
    client = worker(report_and_stay, register=False, room_connect_timeout=5.0)
    job_id = client.submit(JobSpec(room="locked-room", token="not-a-jwt"))
    info = client.wait(job_id, timeout=TIMEOUT)
    assert (info.state, info.cause) == (JobState.FAILED, Cause.CONNECT_FAILED)
    assert "locked-room" in info.error


def test_after_a_supervisor_crash_the_new_one_registers_again_and_migrates_its_jobs(
        worker: Callable[..., rayvisor.Client], server: LocalLiveKitServer, agent_name: str, namespace: str) -> None:
    import ray._private.state as ray_state

    client = worker(report_and_stay)
    server.add_participant("durable-room", "alice")
    job = dispatch(server, agent_name, "durable-room")
    server.wait_for(lambda: (p := agent_in_room(server, "durable-room")) and "job_id" in p.attributes, timeout=TIMEOUT)
    handle = ray.get_actor(SUPERVISOR_NAME, namespace=namespace)
    os.kill(ray_state.actors()[handle._actor_id.hex()]["Pid"], signal.SIGKILL)

    server.wait_for(lambda: [job.id] in server.migrations(), timeout=TIMEOUT)
    client = rayvisor.connect(namespace=namespace)
    assert client.status(job.id).state == JobState.RUNNING
    server.remove_participant("durable-room", "alice")  # the job goes on; its end still reaches the server
    assert client.wait(job.id, timeout=TIMEOUT).cause == Cause.ROOM_EMPTY
    server.wait_for(lambda: statuses(server, job.id)[-1:] == [JS.JS_SUCCESS], timeout=TIMEOUT)


def test_rayvisor_start_registers_an_agent_file_with_the_server_from_the_environment(
        server: LocalLiveKitServer, namespace: str, agent_name: str, tmp_path: Path) -> None:
    agent = tmp_path / "lk_agent.py"
    agent.write_text(textwrap.dedent(f'''
        from rayvisor import JobContext, WorkerOptions

        async def entrypoint(ctx: JobContext):
            await ctx.connect()

        opts = WorkerOptions(entrypoint_fnc=entrypoint, agent_name={agent_name!r})
    '''))
    env = {**os.environ, "LIVEKIT_URL": server.ws_url, "LIVEKIT_API_KEY": server.api_key,
           "LIVEKIT_API_SECRET": server.api_secret}
    proc = subprocess.Popen(  # a free health port: 8081 may be taken on a test machine
        [sys.executable, "-m", "rayvisor.cli", "start", str(agent), "--address",
         ray.get_runtime_context().gcs_address, "--namespace", namespace, "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        registered = server.wait_for(lambda: [w for w in server.workers() if w.agent_name == agent_name and w.connected],
                                     timeout=TIMEOUT)
        assert len(registered) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert f"registering with LiveKit at {server.ws_url}" in stderr
    server.wait_for(lambda: not [w for w in server.workers() if w.agent_name == agent_name and w.connected])
