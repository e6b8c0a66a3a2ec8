"""The ``rayvisor`` command: every subcommand, bad arguments, and ``dev`` end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import ray
from click.testing import CliRunner
from support import actor_pid, wait_until, worker_log_lines

import rayvisor
from rayvisor import JobContext, JobState, WorkerOptions
from rayvisor.cli import build_cli
from rayvisor.errors import SupervisorNotFound
from rayvisor.supervisor.supervisor import SUPERVISOR_NAME


async def chatty(ctx: JobContext) -> None:
    async def on_chat(reader, sender: str) -> None:
        await ctx.room.local_participant.send_text(f"got {await reader.read_all()}", topic="echo")

    ctx.room.register_text_stream_handler("chat", on_chat)
    await ctx.connect()
    await ctx.room.local_participant.send_text(f"hello {ctx.job.metadata}", topic="hello")


@pytest.fixture
def cli(serve, namespace):
    """Run ``rayvisor ...`` in-process against the test session's Ray and a fresh supervisor."""
    serve(chatty)
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(build_cli(), [*args, "--namespace", namespace], catch_exceptions=False)
        assert (result.exit_code == 0) == ok, result.output
        return result

    return run


def test_submit_status_jobs_and_shutdown_from_the_command_line(cli, rooms):
    cli("room", "join", "desk", "alice", "--attribute", "user.language=en")
    job_id = cli("submit", "--room", "desk", "--metadata", '{"user_id": 7}').output.strip()
    alice = rooms.participant("desk", "alice")
    assert alice.wait_for_messages(1, topic="hello", timeout=20)[0][2] == 'hello {"user_id": 7}'

    status = json.loads(cli("status", job_id).output)
    assert status["id"] == job_id and status["state"] == "RUNNING" and status["room"] == "desk"
    assert job_id in cli("jobs").output
    assert json.loads(cli("jobs", "--json").output)[0]["id"] == job_id

    output = cli("shutdown", job_id, "--reason", "closing time", "--wait", "10").output
    assert "SUCCEEDED" in output and "user_shutdown" in output


def test_room_commands_drive_simulated_participants(cli, rooms):
    cli("room", "join", "desk", "bob", "--kind", "sip")
    cli("submit", "--room", "desk", "--raw-metadata", "plain text")
    bob = rooms.participant("desk", "bob")
    bob.wait_for_messages(1, topic="hello", timeout=20)

    cli("room", "send", "desk", "bob", "need help", "--topic", "chat")
    bob.wait_for_messages(1, topic="echo", timeout=10)
    assert "agent-RJ_" in cli("room", "messages", "desk", "bob").output
    cli("room", "set-attributes", "desk", "bob", "user.language=fr")
    assert rooms.participants("desk")[0].attributes == {"user.language": "fr"}
    listing = cli("room", "participants", "desk").output
    assert "bob  kind=sip" in listing and "kind=agent" in listing

    cli("room", "leave", "desk", "bob")
    job = rayvisor.connect(namespace=rooms.namespace).list()[0]
    assert rayvisor.connect(namespace=rooms.namespace).wait(job.id, timeout=10).cause == rayvisor.Cause.ROOM_EMPTY
    assert "RoomNotFound" in cli("room", "participants", "desk", ok=False).output  # empty rooms close
    cli("room", "join", "desk", "carol")
    cli("room", "delete", "desk")
    assert "RoomNotFound" in cli("room", "participants", "desk", ok=False).output


@pytest.mark.parametrize("args,message", [
    (["submit", "--room", "r", "--metadata", "{not json"], "InvalidMetadata"),
    (["submit", "--room", ""], "InvalidJobSpec"),
    (["submit", "--room", "r", "--agent-name", "ghost"], "UnknownAgent"),
    (["status", "RJ_missing"], "JobNotFound"),
    (["room", "leave", "nowhere", "nobody"], "RoomNotFound"),
    (["room", "set-attributes", "r", "alice", "no-equals-sign"], "KEY=VALUE"),
])
def test_bad_arguments_print_a_clear_message_and_exit_non_zero(cli, args, message):
    result = cli(*args, ok=False)
    assert message in result.output
    assert "Traceback" not in result.output


def test_run_app_gives_an_agent_file_the_cli(serve, namespace, rooms):
    serve(chatty)  # the supervisor `python agent.py submit` talks to
    opts = WorkerOptions(entrypoint_fnc=chatty)
    user = rooms.join("app-room", "user")
    result = CliRunner().invoke(build_cli(opts), ["submit", "--room", "app-room", "--namespace", namespace])
    assert result.exit_code == 0, result.output
    user.wait_for_messages(1, topic="hello", timeout=20)
    assert "dev" in CliRunner().invoke(build_cli(opts), ["--help"]).output


def serve_in_subprocess(mode: str, agent, namespace: str):
    """``rayvisor dev|start AGENT`` in its own process, attached to the test session's Ray;
    returns the process and a client once its supervisor answers."""
    proc = subprocess.Popen(  # a free health port: `start`'s 8081 may be taken on a test machine
        [sys.executable, "-m", "rayvisor.cli", mode, str(agent), "--address",
         ray.get_runtime_context().gcs_address, "--namespace", namespace, "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def supervisor_up():
        try:
            return rayvisor.connect(namespace=namespace)
        except SupervisorNotFound:
            return None

    return proc, wait_until(supervisor_up, timeout=60, interval=0.1)


def test_dev_serves_an_agent_file_prints_the_lifecycle_and_stops_cleanly_on_ctrl_c(tmp_path, namespace, rooms):
    agent = tmp_path / "my_agent.py"
    agent.write_text(textwrap.dedent('''
        from rayvisor import JobContext, cli, WorkerOptions

        async def entrypoint(ctx: JobContext):
            await ctx.connect()
            await ctx.room.local_participant.send_text("hi from dev", topic="hello")

        if __name__ == "__main__":
            cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
    '''))
    proc, client = serve_in_subprocess("dev", agent, namespace)
    try:
        user = rooms.join("dev-room", "user")
        job_id = client.submit(room="dev-room")
        assert user.wait_for_messages(1, topic="hello", timeout=20)[0][2] == "hi from dev"
        user.leave()
        assert client.wait(job_id, timeout=10).state == JobState.SUCCEEDED
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    lines = [line for line in stdout.splitlines() if job_id in line]
    assert [line.split()[3] for line in lines] == ["PENDING", "STARTING", "RUNNING", "SHUTTING_DOWN", "SUCCEEDED"]
    with pytest.raises(SupervisorNotFound):
        rayvisor.connect(namespace=namespace)


def json_object(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def test_start_logs_one_json_object_per_line_and_one_record_per_transition(tmp_path, namespace, rooms):
    """Under ``start`` the supervisor and the job's process log JSON (to their stderr, which
    Ray keeps in the session's log files and forwards to the driver)."""
    agent = tmp_path / "logged_agent.py"
    agent.write_text(textwrap.dedent('''
        import logging
        from rayvisor import JobContext, WorkerOptions

        async def entrypoint(ctx: JobContext):
            ctx.log_context_fields = {"user_id": "7"}
            logging.getLogger("logged-agent").info("greeting the user")
            await ctx.connect()
            await ctx.room.local_participant.send_text("up", topic="hello")

        opts = WorkerOptions(entrypoint_fnc=entrypoint)
    '''))
    proc, client = serve_in_subprocess("start", agent, namespace)
    try:
        user = rooms.join("logged-room", "user")
        job_id = client.submit(room="logged-room")
        supervisor_pid = actor_pid(ray.get_actor(SUPERVISOR_NAME, namespace=namespace))  # it answered: alive
        user.wait_for_messages(1, topic="hello", timeout=20)
        user.leave()
        info = client.wait(job_id, timeout=10)
    finally:
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr

    lines = worker_log_lines(supervisor_pid) + worker_log_lines(info.pid)
    assert [line for line in lines if json_object(line) is None] == []
    records = [json_object(line) for line in lines]
    transitions = [r for r in records if r.get("job_id") == job_id and "state" in r]
    assert [r["state"] for r in transitions] == ["PENDING", "STARTING", "RUNNING", "SHUTTING_DOWN", "SUCCEEDED"]
    assert all(r["room"] == "logged-room" and r["logger"] == "rayvisor.supervisor" for r in transitions)
    assert transitions[-1]["cause"] == "room_empty"
    (greeting,) = [r for r in records if r.get("message") == "greeting the user"]
    assert (greeting["job_id"], greeting["room"], greeting["user_id"]) == (job_id, "logged-room", "7")


def test_metrics_and_drain_from_the_command_line(cli, rooms):
    cli("room", "join", "desk", "alice")
    job_id = cli("submit", "--room", "desk", "--restart", "transient").output.strip()
    rooms.participant("desk", "alice").wait_for_messages(1, topic="hello", timeout=20)

    counters = json.loads(cli("metrics").output)["counters"]
    assert counters["rayvisor_jobs_admitted|agent="] == 1

    assert "0 ended on their own, 1 shut down" in cli("drain", "--timeout", "0.2").output
    assert "Draining" in cli("submit", "--room", "late", ok=False).output
    assert json.loads(cli("status", job_id).output)["cause"] == "drained"


def test_sigterm_drains_a_served_agent_and_a_second_one_is_not_needed(tmp_path, namespace, rooms):
    agent = tmp_path / "drained_agent.py"
    agent.write_text(textwrap.dedent('''
        from rayvisor import JobContext, WorkerOptions

        async def entrypoint(ctx: JobContext):
            await ctx.connect()
            await ctx.room.local_participant.send_text("up", topic="hello")

        opts = WorkerOptions(entrypoint_fnc=entrypoint, drain_timeout=0.5)
    '''))
    proc, client = serve_in_subprocess("start", agent, namespace)
    try:
        user = rooms.join("drained-room", "user")
        client.submit(room="drained-room")
        user.wait_for_messages(1, topic="hello", timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "draining" in stderr and "1 were shut down" in stderr
    with pytest.raises(SupervisorNotFound):
        rayvisor.connect(namespace=namespace)


STOP_AT_ONCE = 10.0
"""Bound on ``start`` exiting after a second SIGTERM: an event poll (1 s), shutting a
cooperative job down and removing the supervisor, with room for a loaded machine; a drain
would take ``drain_timeout`` (600 s in the test below)."""


def test_a_second_sigterm_during_a_drain_stops_at_once(tmp_path, namespace, rooms):
    """The first SIGTERM drains for ``drain_timeout`` (here 10 minutes); the second stops
    now: every job through the protocol, cause ``supervisor_stopped``."""
    reasons = tmp_path / "shutdown-reasons"
    agent = tmp_path / "long_call_agent.py"
    agent.write_text(textwrap.dedent(f'''
        from rayvisor import JobContext, WorkerOptions

        async def entrypoint(ctx: JobContext):
            async def record(reason: str):
                with open({str(reasons)!r}, "a") as out:
                    out.write(reason + "\\n")

            ctx.add_shutdown_callback(record)
            await ctx.connect()
            await ctx.room.local_participant.send_text("up", topic="hello")

        opts = WorkerOptions(entrypoint_fnc=entrypoint, drain_timeout=600)
    '''))
    proc, client = serve_in_subprocess("start", agent, namespace)
    stderr: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            stderr.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        user = rooms.join("long-call", "user")
        job_id = client.submit(room="long-call")
        supervisor_pid = actor_pid(ray.get_actor(SUPERVISOR_NAME, namespace=namespace))  # it answered: alive
        user.wait_for_messages(1, topic="hello", timeout=20)

        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: any("draining for up to 600" in line for line in stderr), timeout=10)
        assert client.status(job_id).state == JobState.RUNNING  # the drain lets it run on
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_AT_ONCE)  # TimeoutExpired if it drains on
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            rayvisor.connect(namespace=namespace).stop(timeout=30)
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(stderr)

    assert reasons.read_text() == "supervisor stopping\n"  # its callback ran once, for the stop, not a drain
    logged = [json.loads(line) for line in worker_log_lines(supervisor_pid) if job_id in line]
    assert [(r["state"], r["cause"]) for r in logged if "state" in r][-2:] == [
        ("SHUTTING_DOWN", "supervisor_stopped"), ("SUCCEEDED", "supervisor_stopped")]
    with pytest.raises(SupervisorNotFound):
        rayvisor.connect(namespace=namespace)
