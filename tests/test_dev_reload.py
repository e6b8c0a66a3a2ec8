"""Hot reload in ``rayvisor dev``: an edit reaches the next job, running jobs finish on the
old code, a broken file keeps the previous version serving, helpers reload too, and Ctrl-C
still stops ``dev`` cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from support import job_actor_names, process_alive, wait_until

import rayvisor
from rayvisor import JobState
from rayvisor.dev_reload import AgentSource, format_load_error, watch_root
from rayvisor.errors import AgentLoadError, SupervisorNotFound
from rayvisor.rooms.local import LocalRooms

DEV_STARTED = 60.0
"""Bound on a ``dev`` subprocess serving its agent (Ray attach, supervisor, pool) on a loaded machine."""
RELOAD_SEEN = 30.0
"""Bound on ``dev`` reporting a reload (or a failed one) after a file is written."""
JOB_ANSWERED = 30.0
"""Bound on a submitted job's first message reaching its participant (a cold actor included)."""
DEV_STOPPED = 60.0
"""Bound on ``dev`` exiting after Ctrl-C (every job through the protocol, supervisor removed)."""

AGENT = '''
import os
from rayvisor import JobContext, WorkerOptions
from phrases import GREETING

VERSION = "{version}"


def prewarm(proc):
    proc.userdata["prewarmed"] = VERSION


async def entrypoint(ctx: JobContext):
    async def on_ping(reader, sender):
        await reader.read_all()
        await ctx.room.local_participant.send_text(f"{{VERSION}} pong", topic="pong")

    ctx.room.register_text_stream_handler("ping", on_ping)
    await ctx.connect()
    await ctx.room.local_participant.send_text(
        f"{{VERSION}} {{GREETING}} prewarmed={{ctx.proc.userdata.get('prewarmed')}}", topic="version")


opts = WorkerOptions(entrypoint_fnc=entrypoint, prewarm_fnc=prewarm)
'''


def write_agent(directory: Path, version: str, greeting: str | None = None) -> Path:
    """``my_agent.py`` at ``version`` (and its sibling ``phrases.py`` when ``greeting`` is given)."""
    if greeting is not None:
        (directory / "phrases.py").write_text(f"GREETING = {greeting!r}\n")
    agent = directory / "my_agent.py"
    agent.write_text(AGENT.format(version=version))
    return agent


class Dev:
    """A ``dev`` subprocess attached to the test session's Ray; its output read as it comes."""

    def __init__(self, argv: list[str], namespace: str) -> None:
        self.proc = subprocess.Popen([*argv, "--address", ray.get_runtime_context().gcs_address,
                                      "--namespace", namespace],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for reader in self._readers:
            reader.start()
        self.client: rayvisor.Client | None = None

    def wait_served(self, namespace: str) -> None:
        """Wait until its supervisor answers (``self.client``)."""
        def supervisor_up() -> rayvisor.Client | None:
            try:
                return rayvisor.connect(namespace=namespace)
            except SupervisorNotFound:
                assert self.proc.poll() is None, "dev exited:\n" + "".join(self.stderr)
                return None

        self.client = wait_until(supervisor_up, timeout=DEV_STARTED, interval=0.1)

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for(self, text: str, *, after: int = 0, timeout: float = RELOAD_SEEN) -> int:
        """The index of the first stderr line from ``after`` on that contains ``text``."""
        def found() -> int | None:
            hits = [i for i, line in enumerate(self.stderr[after:], start=after) if text in line]
            return hits[0] + 1 if hits else None  # +1: a found index 0 must be truthy
        return wait_until(found, timeout=timeout, interval=0.05) - 1

    def stop(self) -> int:
        """Ctrl-C, then the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=DEV_STOPPED)
        for reader in self._readers:
            reader.join(timeout=10)
        return code


@pytest.fixture
def dev(namespace: str) -> Iterator:
    started: list[Dev] = []

    def start(*argv: str | Path) -> Dev:
        process = Dev([str(a) for a in argv], namespace)
        started.append(process)  # first: torn down even if it never serves
        process.wait_served(namespace)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
            try:
                rayvisor.connect(namespace=namespace).stop(timeout=30)
            except SupervisorNotFound:
                pass  # it never served


def rayvisor_dev(agent: Path, *flags: str) -> list[str | Path]:
    return [sys.executable, "-m", "rayvisor.cli", "dev", agent, *flags]


def greeting_of_a_new_job(client: rayvisor.Client, rooms: LocalRooms, room: str) -> tuple[str, str]:
    """Submit a job to a fresh room; its greeting and its id (the job keeps running)."""
    user = rooms.join(room, "user")
    job_id = client.submit(room=room)
    return user.wait_for_messages(1, topic="version", timeout=JOB_ANSWERED)[0][2], job_id


def pool_actor_pids(client: rayvisor.Client, namespace: str, *, besides: set[int]) -> set[int]:
    """The processes of the warm pool's actors once it holds an idle one (job actors ``besides``)."""
    import ray._private.state as ray_state

    def idle() -> bool:
        return any(v >= 1 for k, v in client.metrics().gauges.items() if k.startswith("rayvisor_idle_actors|"))

    wait_until(idle, timeout=JOB_ANSWERED, interval=0.1)
    names = set(job_actor_names(namespace))
    pids = {a["Pid"] for a in ray_state.actors().values() if a["State"] == "ALIVE" and a["Name"] in names}
    return pids - besides - {0}


def test_an_edit_reaches_the_next_job_and_a_running_job_finishes_on_the_old_code(tmp_path, namespace, rooms, dev):
    agent = write_agent(tmp_path, "v1", greeting="hello")
    served = dev(*rayvisor_dev(agent))
    client = served.client
    watching = served.wait_for("watching")
    greeting, old_job = greeting_of_a_new_job(client, rooms, "before")
    assert greeting == "v1 hello prewarmed=v1"
    old_pid = client.status(old_job).pid
    old_pool = pool_actor_pids(client, namespace, besides={old_pid})

    write_agent(tmp_path, "v2")
    reloaded = served.stderr[served.wait_for("reloaded my_agent.py", after=watching)]
    assert "new jobs run the new code (1 running job finishes on the old code)" in reloaded

    # The idle actors prewarmed with v1 are replaced; the next job runs v2, prewarmed with v2.
    wait_until(lambda: not any(process_alive(pid) for pid in old_pool), timeout=RELOAD_SEEN, interval=0.1)
    greeting, new_job = greeting_of_a_new_job(client, rooms, "after")
    assert greeting == "v2 hello prewarmed=v2"
    assert client.status(new_job).pid not in old_pool | {old_pid}

    # The job that was running goes on, in the same process, on v1.
    info = client.status(old_job)
    assert (info.state, info.pid) == (JobState.RUNNING, old_pid)
    alice = rooms.participant("before", "user")
    alice.send_text("ping", topic="ping")
    assert alice.wait_for_messages(1, topic="pong", timeout=JOB_ANSWERED)[0][2] == "v1 pong"
    assert served.stop() == 0, "".join(served.stderr)


def test_a_syntax_error_is_reported_and_the_previous_version_keeps_serving_until_the_file_is_fixed(
        tmp_path, namespace, rooms, dev):
    agent = write_agent(tmp_path, "v1", greeting="hello")
    served = dev(*rayvisor_dev(agent))
    watching = served.wait_for("watching")

    broken = AGENT.format(version="v2").replace("async def entrypoint(ctx: JobContext):",
                                                 "async def entrypoint(ctx: JobContext:")
    agent.write_text(broken)
    failed = served.wait_for("reloading my_agent.py failed; the previous version keeps serving", after=watching)
    bad_line = broken.splitlines().index("async def entrypoint(ctx: JobContext:") + 1
    block = "".join(served.stderr[failed:failed + 5])
    assert f'File "{agent}", line {bad_line}' in block and "SyntaxError" in block
    assert served.wait_for("(fix it and save", after=failed) > failed
    assert greeting_of_a_new_job(served.client, rooms, "while-broken")[0] == "v1 hello prewarmed=v1"

    write_agent(tmp_path, "v3")
    served.wait_for("reloaded my_agent.py", after=failed)
    assert greeting_of_a_new_job(served.client, rooms, "fixed")[0] == "v3 hello prewarmed=v3"
    assert served.stop() == 0, "".join(served.stderr)


def test_an_edit_to_a_helper_module_the_agent_imports_reaches_the_next_job(tmp_path, namespace, rooms, dev):
    agent = write_agent(tmp_path, "v1", greeting="hello")
    served = dev(*rayvisor_dev(agent))
    watching = served.wait_for("watching")
    assert greeting_of_a_new_job(served.client, rooms, "first")[0] == "v1 hello prewarmed=v1"

    (tmp_path / "phrases.py").write_text("GREETING = 'bonjour'\n")
    assert "(phrases.py changed)" in served.stderr[served.wait_for("reloaded my_agent.py", after=watching)]
    assert greeting_of_a_new_job(served.client, rooms, "second")[0] == "v1 bonjour prewarmed=v1"
    assert served.stop() == 0, "".join(served.stderr)


RUN_APP_AGENT = '''
from rayvisor import JobContext, WorkerOptions, cli

VERSION = "{version}"


async def entrypoint(ctx: JobContext):
    await ctx.connect()
    await ctx.room.local_participant.send_text(VERSION, topic="version")


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, agent_name="app-agent"))
'''


def test_python_agent_py_dev_reloads_the_script_keeping_the_options_given_to_run_app(
        tmp_path, namespace, rooms, dev):
    agent = tmp_path / "app_agent.py"
    agent.write_text(RUN_APP_AGENT.format(version="v1"))
    served = dev(sys.executable, agent, "dev")
    watching = served.wait_for("watching")
    assert greeting_of_a_new_job(served.client, rooms, "app-1")[0] == "v1"

    agent.write_text(RUN_APP_AGENT.format(version="v2"))
    served.wait_for("reloaded app_agent.py", after=watching)
    text, job_id = greeting_of_a_new_job(served.client, rooms, "app-2")
    assert text == "v2"
    assert served.client.status(job_id).agent_name == "app-agent"
    assert served.stop() == 0, "".join(served.stderr)


def test_ctrl_c_stops_dev_cleanly_with_the_watcher_running(tmp_path, namespace, dev):
    served = dev(*rayvisor_dev(write_agent(tmp_path, "v1", greeting="hello")))
    served.wait_for("watching")
    assert served.stop() == 0
    stderr = "".join(served.stderr)
    assert "stopping" in stderr and "Traceback" not in stderr and "watcher" not in stderr
    with pytest.raises(SupervisorNotFound):
        rayvisor.connect(namespace=namespace)


def test_no_reload_serves_without_watching(tmp_path, namespace, dev):
    served = dev(*rayvisor_dev(write_agent(tmp_path, "v1", greeting="hello"), "--no-reload"))
    served.wait_for("serving namespace")
    assert served.stop() == 0
    assert not any("watching" in line for line in served.stderr)


def test_the_watched_directory_is_the_agents_top_package(tmp_path):
    inner = tmp_path / "app" / "agents"
    inner.mkdir(parents=True)
    for package in (tmp_path / "app", inner):
        (package / "__init__.py").write_text("")
    assert watch_root(inner / "support.py") == tmp_path / "app"
    assert watch_root(tmp_path / "single.py") == tmp_path


def test_a_load_error_names_the_file_the_line_and_the_error(tmp_path):
    agent = tmp_path / "agent.py"
    agent.write_text("x = 1\nraise RuntimeError('no config')\n")
    source = AgentSource(file=agent, root=tmp_path, load=lambda: None)
    try:
        exec(compile(agent.read_text(), str(agent), "exec"), {})
    except RuntimeError as err:
        error = AgentLoadError("agent.py raised while loading")
        error.__cause__ = err
    block = format_load_error(error, source)
    assert f'File "{agent}", line 2' in block
    assert "raise RuntimeError('no config')" in block and "RuntimeError: no config" in block


def test_an_invalid_agent_is_reported_against_the_agent_file_not_generated_code(tmp_path, monkeypatch):
    from rayvisor import WorkerOptions

    monkeypatch.chdir(tmp_path)  # as `rayvisor dev agent.py` run in the agent's directory

    def entrypoint(ctx):  # not async: WorkerOptions refuses it in its generated __init__
        pass

    source = AgentSource(file=tmp_path / "agent.py", root=tmp_path, load=lambda: None)
    try:
        WorkerOptions(entrypoint_fnc=entrypoint)
    except Exception as err:
        block = format_load_error(err, source)
    assert f'File "{tmp_path / "agent.py"}"\n' in block and "<string>" not in block
    assert "InvalidAgent: entrypoint_fnc must be an `async def`" in block


SCRIPT = '''
from rayvisor import JobContext

VERSION = "{version}"


async def entrypoint(ctx: JobContext):
    return VERSION


def prewarm(proc):
    return VERSION
'''


@pytest.fixture
def script_as_main(tmp_path, monkeypatch):
    """``python app.py`` as seen from inside it: ``__main__`` is the script at v1 (its body
    ran, its ``__main__`` block did not), and the file can be edited afterwards."""
    import types

    script = tmp_path / "app.py"
    script.write_text(SCRIPT.format(version="v1"))
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    exec(compile(script.read_text(), str(script), "exec"), vars(main))
    monkeypatch.setitem(sys.modules, "__main__", main)
    return script, main


def version_of(opts) -> str:
    import asyncio

    return asyncio.run(opts.entrypoint_fnc(None))


def test_run_app_options_built_in_the_main_block_keep_their_settings_and_take_the_edited_functions(script_as_main):
    from rayvisor import WorkerOptions
    from rayvisor.dev_reload import source_for_app

    script, main = script_as_main
    app = WorkerOptions(entrypoint_fnc=main.entrypoint, prewarm_fnc=main.prewarm, agent_name="inline",
                        num_idle_actors=0)  # as in `cli.run_app(WorkerOptions(...))`
    source = source_for_app(app)
    script.write_text(SCRIPT.format(version="v2"))
    reloaded = source.load()
    assert (version_of(reloaded), reloaded.prewarm_fnc(None)) == ("v2", "v2")
    assert (reloaded.agent_name, reloaded.num_idle_actors) == ("inline", 0)
    assert reloaded.entrypoint_fnc.__module__ == "rayvisor_agent_app"  # a module of its own, never __main__


def test_run_app_given_a_module_level_agent_server_reads_it_again(script_as_main):
    agents = pytest.importorskip("livekit.agents")
    from rayvisor.dev_reload import source_for_app

    script, main = script_as_main
    script.write_text(SCRIPT.format(version="v2") + '''
from livekit.agents import AgentServer

server = AgentServer()
server.rtc_session(entrypoint, agent_name="served")
''')
    main.server = agents.AgentServer()  # v1's server, bound at module level as in the script
    main.server.rtc_session(main.entrypoint, agent_name="served")
    reloaded = source_for_app(main.server).load()
    assert (version_of(reloaded), reloaded.agent_name) == ("v2", "served")


def test_run_app_given_options_it_cannot_find_again_says_why(script_as_main):
    from rayvisor import WorkerOptions
    from rayvisor.dev_reload import source_for_app

    _script, _main = script_as_main

    async def nested(ctx):  # defined inside a function: no module-level name to take again
        pass

    with pytest.raises(AgentLoadError, match="no function defined at the script's module level"):
        source_for_app(WorkerOptions(entrypoint_fnc=nested))


async def says_v1(ctx) -> None:
    await ctx.connect()
    await ctx.room.local_participant.set_attributes({"version": "v1"})


async def says_v2(ctx) -> None:
    await ctx.connect()
    await ctx.room.local_participant.set_attributes({"version": "v2"})


def test_a_livekit_dispatch_after_a_reload_runs_the_new_code(serve, namespace):
    """The LiveKit worker registration stays connected across a reload (what ``dev`` does:
    ``Client.register_agent``); the server's next dispatch runs the new code."""
    import test_livekit_worker as lk  # its local LiveKit server helpers (and stand-in rooms)
    from livekit_server import LocalLiveKitServer

    from rayvisor.messages import BridgeState

    with LocalLiveKitServer() as server:
        settings = dict(ws_url=server.ws_url, api_key=server.api_key, api_secret=server.api_secret,
                        agent_name="reloaded-" + namespace, prewarm_fnc=lk.use_stand_in_rooms, **lk.FAST,
                        num_idle_actors=0)  # a cold actor, made from the options the offer was admitted with
        client = serve(says_v1, **settings)
        client.start_worker()
        wait_until(lambda: client.worker_status().state == BridgeState.REGISTERED, timeout=lk.TIMEOUT)
        client.register_agent(rayvisor.WorkerOptions(entrypoint_fnc=says_v2, **settings))

        lk.dispatch(server, settings["agent_name"], "reloaded-room")
        agent = server.wait_for(lambda: (p := lk.agent_in_room(server, "reloaded-room")) and p.attributes.get("version"),
                                timeout=lk.TIMEOUT)
        assert agent == "v2"
        assert client.worker_status().registrations == 1  # the same registration throughout
