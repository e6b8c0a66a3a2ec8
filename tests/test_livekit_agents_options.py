"""Agents written for LiveKit Agents are served as they are: livekit-agents' own
``WorkerOptions``/``ServerOptions`` and ``AgentServer`` map onto rayvisor's ``WorkerOptions``
(``rayvisor.agents.livekit_agents_options``), through ``rayvisor.serve``, ``cli.run_app``/
``build_cli`` and ``rayvisor dev|start FILE``.

The mapping tests need no Ray; one test serves an ``AgentServer`` on the local room backend
and one runs ``rayvisor dev`` on a LiveKit Agents file.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

lk = pytest.importorskip("livekit.agents")

from click.testing import CliRunner  # noqa: E402
from livekit.agents import AgentServer, JobExecutorType  # noqa: E402
from livekit.agents import WorkerOptions as LivekitWorkerOptions  # noqa: E402
from livekit.agents import WorkerPermissions as LivekitPermissions  # noqa: E402
from livekit.agents.worker import ServerEnvOption, ServerType  # noqa: E402
from livekit.protocol import agent as agent_proto  # noqa: E402
from livekit.protocol import models  # noqa: E402
from test_cli import serve_in_subprocess  # noqa: E402

import rayvisor  # noqa: E402
from rayvisor import Cause, JobState, LoadInfo  # noqa: E402
from rayvisor.agent_loader import load_agent  # noqa: E402
from rayvisor.agents.livekit_agents_options import (  # noqa: E402
    IGNORED, LivekitLoadFnc, as_rayvisor_options, convert, is_livekit_agents_server)
from rayvisor.agents.request import Answer, JobRequest  # noqa: E402
from rayvisor.cli import build_cli  # noqa: E402
from rayvisor.errors import InvalidAgent  # noqa: E402

TIMEOUT = 60.0
"""Deadline for anything that involves starting a job actor (cold Ray actors are slow on CI)."""


# --------------------------------------------------------------------------- agent code (module level: shipped by value)


async def entrypoint(ctx) -> None:
    await ctx.connect()
    await ctx.room.local_participant.send_text(ctx.proc.userdata.get("greeting", "no prewarm"), topic="hello")


def prewarm(proc) -> None:
    proc.userdata["greeting"] = "prewarmed by setup_fnc"


async def request_fnc(req) -> None:
    await req.accept(name="Helper", identity="helper-" + req.id, metadata="m", attributes={"role": "helper"})


async def rejecting_request_fnc(req) -> None:
    await req.reject(terminate=False)


def jobs_load(worker) -> float:
    return len(worker.active_jobs) / 4


def constant_load() -> float:
    return 0.5


def load_info(active_jobs: int) -> LoadInfo:
    return LoadInfo(active_jobs=active_jobs, max_jobs=None, idle_actors=0)


def ours(caplog) -> list[logging.LogRecord]:
    """The records rayvisor's livekit-agents mapping logged."""
    return [r for r in caplog.records if r.name == "rayvisor.livekit_agents"]


@pytest.fixture(autouse=True)
def no_agent_name_from_the_environment(monkeypatch):
    for name in ("LIVEKIT_AGENT_NAME", "LIVEKIT_AGENT_NAME_OVERRIDE"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- the mapping (no Ray)


def test_every_option_with_a_counterpart_is_carried_over_from_worker_options():
    opts = as_rayvisor_options(LivekitWorkerOptions(
        entrypoint_fnc=entrypoint, prewarm_fnc=prewarm, request_fnc=request_fnc, load_fnc=jobs_load,
        load_threshold=0.5, agent_name="desk", shutdown_process_timeout=7.0, initialize_process_timeout=3.0,
        num_idle_processes=6, job_memory_warn_mb=300, job_memory_limit_mb=900, drain_timeout=120,
        ws_url="wss://lk.example", api_key="key", api_secret="secret",
        permissions=LivekitPermissions(can_publish=False, can_update_metadata=False, hidden=True,
                                       can_publish_sources=[models.TrackSource.MICROPHONE])))

    assert isinstance(opts, rayvisor.WorkerOptions)
    assert (opts.entrypoint_fnc, opts.prewarm_fnc, opts.request_fnc) == (entrypoint, prewarm, request_fnc)
    assert (opts.agent_name, opts.shutdown_process_timeout, opts.initialize_process_timeout) == ("desk", 7.0, 3.0)
    assert (opts.job_memory_warn_mb, opts.job_memory_limit_mb, opts.drain_timeout) == (300, 900, 120)
    assert (opts.num_idle_actors, opts.max_idle_actors) == (6, 6)
    assert (opts.ws_url, opts.api_key, opts.api_secret) == ("wss://lk.example", "key", "secret")
    assert opts.permissions == rayvisor.WorkerPermissions(
        can_publish=False, can_subscribe=True, can_publish_data=True, can_update_metadata=False,
        can_publish_sources=["microphone"], hidden=True)
    assert opts.load_threshold == 0.5
    assert opts.load_fnc(load_info(active_jobs=2)) == 0.5


def test_livekit_defaults_keep_livekits_timeouts_and_leave_rayvisors_pool_and_admission():
    conversion = convert(LivekitWorkerOptions(entrypoint_fnc=entrypoint))
    opts = conversion.options
    assert conversion.warnings == ()
    # livekit's own defaults for options with the same meaning: the job behaves as under LiveKit Agents
    assert (opts.shutdown_process_timeout, opts.initialize_process_timeout, opts.drain_timeout) == (10.0, 10.0, 3600)
    assert (opts.job_memory_warn_mb, opts.job_memory_limit_mb) == (1000, 0)
    # livekit's default prewarm/request/load functions are not user code: rayvisor's defaults apply
    assert (opts.prewarm_fnc, opts.request_fnc, opts.load_fnc) == (None, None, None)
    default = rayvisor.WorkerOptions(entrypoint_fnc=entrypoint)
    assert (opts.num_idle_actors, opts.max_idle_actors) == (default.num_idle_actors, default.max_idle_actors)
    assert (opts.agent_name, opts.ws_url, opts.permissions) == ("", "", rayvisor.WorkerPermissions())


def test_an_agent_server_maps_its_rtc_session_and_its_constructor_options():
    server = AgentServer(setup_fnc=prewarm, load_fnc=constant_load, load_threshold=0.4, shutdown_process_timeout=4.0,
                         num_idle_processes=2, drain_timeout=30)

    @server.rtc_session(agent_name="survey", on_request=request_fnc)
    async def survey(ctx) -> None:
        await ctx.connect()

    opts = as_rayvisor_options(server)
    assert (opts.entrypoint_fnc, opts.prewarm_fnc, opts.request_fnc) == (survey, prewarm, request_fnc)
    assert (opts.agent_name, opts.shutdown_process_timeout, opts.drain_timeout) == ("survey", 4.0, 30)
    assert (opts.num_idle_actors, opts.max_idle_actors) == (2, rayvisor.WorkerOptions.max_idle_actors)
    assert (opts.load_fnc(load_info(active_jobs=9)), opts.load_threshold) == (0.5, 0.4)


def test_agent_name_follows_livekits_environment_precedence(monkeypatch):
    monkeypatch.setenv("LIVEKIT_AGENT_NAME", "from-env")
    assert as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint)).agent_name == "from-env"
    assert as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, agent_name="given")).agent_name == "given"
    monkeypatch.setenv("LIVEKIT_AGENT_NAME_OVERRIDE", "forced")
    assert as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, agent_name="given")).agent_name == "forced"


def test_rayvisor_options_pass_unchanged_and_anything_else_is_a_typed_error():
    opts = rayvisor.WorkerOptions(entrypoint_fnc=entrypoint)
    assert as_rayvisor_options(opts) is opts
    assert not is_livekit_agents_server(opts) and not is_livekit_agents_server(JobExecutorType.THREAD)
    with pytest.raises(InvalidAgent, match="livekit-agents WorkerOptions/ServerOptions/AgentServer"):
        as_rayvisor_options(entrypoint)


def test_a_subclass_of_agent_server_is_recognised():
    class MyServer(AgentServer):
        pass

    server = MyServer(drain_timeout=5)
    server.rtc_session(entrypoint, agent_name="sub")
    assert is_livekit_agents_server(server)
    assert (as_rayvisor_options(server).agent_name, as_rayvisor_options(server).drain_timeout) == ("sub", 5)


def test_an_agent_server_without_an_rtc_session_is_refused():
    with pytest.raises(InvalidAgent, match=r"@server.rtc_session\(\)"):
        as_rayvisor_options(AgentServer())


def test_a_publisher_agent_is_refused_rather_than_run_as_a_room_agent():
    with pytest.raises(InvalidAgent, match="worker_type"):
        as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, worker_type=ServerType.PUBLISHER))
    server = AgentServer()
    server.rtc_session(entrypoint, type=ServerType.PUBLISHER)
    with pytest.raises(InvalidAgent, match="JT_PUBLISHER"):
        as_rayvisor_options(server)


def test_rayvisors_own_validation_errors_name_the_livekit_object():
    with pytest.raises(InvalidAgent, match="livekit-agents ServerOptions: shutdown_process_timeout"):
        as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, shutdown_process_timeout=-1))
    with pytest.raises(InvalidAgent, match="num_idle_processes"):
        as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, num_idle_processes=-2))


IGNORED_SETTINGS = {
    "job_executor_type": JobExecutorType.THREAD,
    "session_end_timeout": 30.0,
    "max_retry": 3,
    "log_level": "WARN",
    "http_proxy": "http://proxy.example:3128",
    "multiprocessing_context": "spawn",
    "preload_modules": ["numpy"],
    "prometheus_port": 9100,
    "prometheus_multiproc_dir": "/tmp/prom",
}


@pytest.mark.parametrize("name,value", sorted(IGNORED_SETTINGS.items()))
def test_an_option_without_counterpart_set_to_a_non_default_value_is_logged_by_name(name, value, caplog):
    assert name in IGNORED
    with caplog.at_level(logging.WARNING, logger="rayvisor.livekit_agents"):
        opts = as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, **{name: value}))
    assert opts.entrypoint_fnc is entrypoint
    (record,) = ours(caplog)
    assert f"option {name}=" in record.getMessage() and IGNORED[name] in record.getMessage()


def test_agent_server_callbacks_without_counterpart_are_logged_by_name(caplog):
    server = AgentServer(max_retry=2)

    async def on_end(ctx) -> None: ...

    server.rtc_session(entrypoint, on_session_end=on_end)
    with caplog.at_level(logging.WARNING, logger="rayvisor.livekit_agents"):
        as_rayvisor_options(server)
    messages = " ".join(r.getMessage() for r in ours(caplog))
    assert "option on_session_end=" in messages and "ctx.add_shutdown_callback" in messages
    assert "option max_retry=2" in messages


def test_options_left_at_livekits_defaults_log_nothing(caplog):
    server = AgentServer()
    server.rtc_session(entrypoint)
    with caplog.at_level(logging.WARNING, logger="rayvisor.livekit_agents"):
        as_rayvisor_options(server)
        as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint), devmode=True)
    assert ours(caplog) == []


def test_a_load_threshold_without_a_load_fnc_is_logged_not_applied(caplog):
    with caplog.at_level(logging.WARNING, logger="rayvisor.livekit_agents"):
        opts = as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, load_threshold=0.3))
    assert opts.load_fnc is None
    (record,) = ours(caplog)
    assert "option load_threshold=0.3 is ignored" in record.getMessage()


def test_load_fnc_is_given_a_view_of_the_worker_or_nothing_as_its_signature_asks():
    by_jobs = as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, load_fnc=jobs_load)).load_fnc
    assert isinstance(by_jobs, LivekitLoadFnc) and by_jobs.takes_worker
    assert by_jobs(load_info(active_jobs=3)) == 0.75
    constant = as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, load_fnc=constant_load)).load_fnc
    assert constant(load_info(active_jobs=3)) == 0.5


def test_load_fnc_touching_what_rayvisor_cannot_offer_fails_with_a_clear_message():
    def by_rooms(worker) -> float:
        return len({job.job.room.name for job in worker.active_jobs}) / 10

    def by_id(worker) -> float:
        return 0.0 if worker.id else 1.0

    for load in (by_rooms, by_id):
        fnc = as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, load_fnc=load)).load_fnc
        with pytest.raises((TypeError, AttributeError), match="under rayvisor, load_fnc's worker"):
            fnc(load_info(active_jobs=1))


@pytest.mark.parametrize("devmode,threshold,loads_refused", [
    (False, 0.7, True),  # livekit's production default threshold
    (True, math.inf, False),  # livekit's dev default: load never refuses a job
])
def test_livekits_default_load_threshold_follows_the_mode(devmode, threshold, loads_refused):
    opts = as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, load_fnc=jobs_load), devmode=devmode)
    assert opts.load_threshold == min(threshold, 1.0)
    assert (opts.load_fnc(load_info(active_jobs=4)) >= opts.load_threshold) is loads_refused


def test_a_load_threshold_above_one_refuses_the_same_loads_as_under_livekit():
    opts = as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, load_fnc=jobs_load, load_threshold=2.0))
    assert opts.load_threshold == 1.0
    assert opts.load_fnc(load_info(active_jobs=7)) < opts.load_threshold  # load 1.75 < 2
    assert opts.load_fnc(load_info(active_jobs=8)) >= opts.load_threshold  # load 2.0 >= 2


@pytest.mark.parametrize("devmode,expected", [(False, (3, 4)), (True, (0, 0))])
def test_num_idle_processes_sizes_the_warm_pool_for_the_mode(devmode, expected):
    opts = as_rayvisor_options(LivekitWorkerOptions(
        entrypoint_fnc=entrypoint, num_idle_processes=ServerEnvOption(dev_default=0, prod_default=3)), devmode=devmode)
    assert (opts.num_idle_actors, opts.max_idle_actors) == expected


@pytest.mark.parametrize("devmode,port,expected", [
    (False, None, 8081),  # livekit's defaults: 8081 in production ...
    (True, None, 0),  # ... a free port in dev
    (False, 9000, 9000),
    (True, ServerEnvOption(dev_default=9001, prod_default=9002), 9001),
])
def test_host_and_port_serve_rayvisors_health_endpoint_with_livekits_defaults(devmode, port, expected, caplog):
    given = {} if port is None else {"port": port}
    with caplog.at_level(logging.WARNING, logger="rayvisor.livekit_agents"):
        opts = as_rayvisor_options(LivekitWorkerOptions(entrypoint_fnc=entrypoint, host="127.0.0.1", **given),
                                   devmode=devmode)
        server = AgentServer(host="127.0.0.1", **given)
        server.rtc_session(entrypoint)
        from_server = as_rayvisor_options(server, devmode=devmode)
    assert ours(caplog) == []
    for converted in (opts, from_server):
        assert (converted.host, converted.http_port(devmode=devmode)) == ("127.0.0.1", expected)


def test_a_livekit_request_fnc_works_with_rayvisors_job_request():
    job = agent_proto.Job(id="AJ_1", room=models.Room(name="desk"))
    accepted, rejected = JobRequest(job), JobRequest(job)
    asyncio.run(request_fnc(accepted))
    asyncio.run(rejecting_request_fnc(rejected))
    assert accepted.answer is Answer.ACCEPTED
    assert (accepted.acceptance.name, accepted.acceptance.identity) == ("Helper", "helper-AJ_1")
    assert (accepted.acceptance.metadata, accepted.acceptance.attributes) == ("m", {"role": "helper"})
    assert rejected.answer is Answer.REJECTED


# --------------------------------------------------------------------------- loading LiveKit Agents files (no Ray)


AGENT_SERVER_FILE = '''
    from livekit.agents import AgentServer, JobContext, JobProcess, cli

    def prewarm(proc: JobProcess):
        proc.userdata["greeting"] = "hi from an AgentServer"

    server = AgentServer(setup_fnc=prewarm, shutdown_process_timeout=5.0, max_retry=3)

    @server.rtc_session(agent_name="lk-file-agent")
    async def entrypoint(ctx: JobContext):
        await ctx.connect()
        await ctx.room.local_participant.send_text(ctx.proc.userdata["greeting"], topic="hello")

    if __name__ == "__main__":
        cli.run_app(server)
'''


def write_agent(tmp_path: Path, source: str) -> Path:
    path = tmp_path / f"lk_agent_{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_an_agent_server_file_loads_without_running_its_livekit_cli(tmp_path):
    opts = load_agent(str(write_agent(tmp_path, AGENT_SERVER_FILE)))  # its cli.run_app would exit the test
    assert (opts.agent_name, opts.shutdown_process_timeout) == ("lk-file-agent", 5.0)
    assert opts.entrypoint_fnc.__name__ == "entrypoint" and opts.prewarm_fnc.__name__ == "prewarm"


def test_a_worker_options_file_and_an_entrypoint_only_file_load(tmp_path):
    options_file = write_agent(tmp_path, '''
        from livekit.agents import JobContext, WorkerOptions, cli

        async def entrypoint(ctx: JobContext):
            await ctx.connect()

        opts = WorkerOptions(entrypoint_fnc=entrypoint, agent_name="lk-options", drain_timeout=60)

        if __name__ == "__main__":
            cli.run_app(opts)
    ''')
    assert (load_agent(str(options_file)).agent_name, load_agent(str(options_file)).drain_timeout) == ("lk-options", 60)

    functions_file = write_agent(tmp_path, '''
        from livekit.agents import JobContext, JobProcess, WorkerOptions, cli

        def prewarm(proc: JobProcess):
            proc.userdata["ready"] = True

        async def entrypoint(ctx: JobContext):
            await ctx.connect()

        if __name__ == "__main__":
            cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, prewarm_fnc=prewarm))
    ''')
    opts = load_agent(str(functions_file), agent_name="renamed")
    assert (opts.entrypoint_fnc.__name__, opts.prewarm_fnc.__name__, opts.agent_name) == ("entrypoint", "prewarm", "renamed")


def test_rayvisor_without_livekit_agents_still_loads_and_serves_its_own_options(tmp_path):
    agent = write_agent(tmp_path, '''
        from rayvisor import JobContext, WorkerOptions

        async def entrypoint(ctx: JobContext):
            await ctx.connect()

        opts = WorkerOptions(entrypoint_fnc=entrypoint, agent_name="plain")
    ''')
    script = textwrap.dedent(f'''
        import sys
        sys.modules["livekit.agents"] = None  # as if livekit-agents were not installed
        from rayvisor.agent_loader import load_agent
        from rayvisor.agents.livekit_agents_options import as_rayvisor_options
        import rayvisor.cli
        opts = load_agent({str(agent)!r})
        assert as_rayvisor_options(opts) is opts and opts.agent_name == "plain"
        print("ok")
    ''')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# --------------------------------------------------------------------------- served on Ray


@pytest.fixture
def room() -> str:
    return "lk-" + uuid.uuid4().hex[:8]


def test_serve_runs_an_agent_server_and_its_cli_submits_to_its_agent_name(namespace, rooms, room):
    """``rayvisor.serve`` of a livekit-agents object used to fail (``'ServerOptions' object has
    no attribute 'finished_job_history'``); now an ``AgentServer``'s job runs with the prewarm
    (setup_fnc) and agent name it was given, and ``build_cli(server)`` (``cli.run_app``) submits to it."""
    server = AgentServer(setup_fnc=prewarm, shutdown_process_timeout=5.0)
    server.rtc_session(entrypoint, agent_name="lk-served")
    client = rayvisor.serve(server, namespace=namespace)
    try:
        user = rooms.join(room, "user")
        result = CliRunner().invoke(build_cli(server), ["submit", "--room", room, "--namespace", namespace])
        assert result.exit_code == 0, result.output
        job_id = result.output.strip()

        assert user.wait_for_messages(1, topic="hello", timeout=TIMEOUT)[0][2] == "prewarmed by setup_fnc"
        assert client.status(job_id).agent_name == "lk-served"
        user.leave()
        info = client.wait(job_id, timeout=TIMEOUT)
        assert (info.state, info.cause, info.error) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY, None)
    finally:
        client.stop(timeout=30)


def test_rayvisor_dev_serves_a_livekit_agents_file_and_logs_what_it_ignores(tmp_path, namespace, rooms, room):
    agent = write_agent(tmp_path, AGENT_SERVER_FILE)
    proc, client = serve_in_subprocess("dev", agent, namespace)
    try:
        user = rooms.join(room, "user")
        job_id = client.submit(room=room, agent_name="lk-file-agent")
        assert user.wait_for_messages(1, topic="hello", timeout=TIMEOUT)[0][2] == "hi from an AgentServer"
        user.leave()
        assert client.wait(job_id, timeout=TIMEOUT).state == JobState.SUCCEEDED
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "agent lk-file-agent serving" in stderr
    assert "option max_retry=3 is ignored" in stderr
    lines = [line for line in stdout.splitlines() if job_id in line]
    assert [line.split()[3] for line in lines] == ["PENDING", "STARTING", "RUNNING", "SHUTTING_DOWN", "SUCCEEDED"]
