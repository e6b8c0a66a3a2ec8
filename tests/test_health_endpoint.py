"""The HTTP health endpoint of ``rayvisor dev``/``start`` (``rayvisor.health``).

What a Kubernetes probe or ``curl`` sees (urllib here): ``GET /`` is 200 ``OK`` while the
supervisor answers and the LiveKit registration (if any) is up, else 503 with the reason;
``GET /worker`` is LiveKit Agents' worker JSON. The verdict and the server are specified
first with a fake supervisor, then end to end: a ``rayvisor start`` subprocess on the
session's Ray whose supervisor is killed, a supervisor registering with the local LiveKit
server, and a taken port.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import ray
from click.testing import CliRunner

import rayvisor
from livekit_server import LocalLiveKitServer
from rayvisor import WorkerOptions
from rayvisor.agents.options import DEV_HTTP_PORT, START_HTTP_PORT
from rayvisor.cli import build_cli, with_http
from rayvisor.errors import HealthServerError, InvalidAgent, SupervisorNotFound, SupervisorUnavailable
from rayvisor.health import HealthServer, health_verdict, worker_info
from rayvisor.messages import BridgeState, SupervisorHealth
from rayvisor.supervisor.supervisor import SUPERVISOR_NAME
from support import wait_until

HTTP_TIMEOUT = 10.0
"""Bound on one HTTP request of a test (a probe answers within health_check_timeout + 1 s)."""
STARTUP = 60.0
"""Deadline for a ``rayvisor start`` subprocess to serve (Python and Ray imports on a busy CI)."""


def get(url: str) -> tuple[int, str]:
    """``GET url``: status and body, 5xx included (what ``curl -s -w '%{http_code}'`` shows)."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def answering(url: str) -> tuple[int, str] | None:
    """``get(url)``, or None while nothing listens there yet."""
    try:
        return get(url)
    except urllib.error.URLError as err:
        if isinstance(err.reason, (ConnectionRefusedError, ConnectionResetError)):
            return None
        raise


def probe_ignoring_disconnects(url: str) -> None:
    """A probe whose connection the server may drop as it stops."""
    try:
        get(url)
    except OSError:
        pass


def answered_with(status: int, url: str) -> Callable[[], tuple[int, str] | None]:
    """A ``wait_until`` predicate: ``get(url)`` once it answers ``status``."""
    def check() -> tuple[int, str] | None:
        response = get(url)
        return response if response[0] == status else None
    return check


async def entrypoint(ctx: Any) -> None:
    pass


def report(**fields: Any) -> SupervisorHealth:
    return SupervisorHealth(**{"agent_name": "desk", "active_jobs": 0, "draining": False, **fields})


# --------------------------------------------------------------------------- the verdict


def test_a_supervisor_that_answers_is_healthy_even_while_draining() -> None:
    assert health_verdict(report(), uses_livekit=False).status == 200
    assert health_verdict(report(draining=True), uses_livekit=False).reason == "OK"


def test_a_supervisor_that_does_not_answer_is_unhealthy_with_the_error_as_reason() -> None:
    verdict = health_verdict(SupervisorUnavailable("the supervisor did not answer within 2s"), uses_livekit=False)
    assert (verdict.status, verdict.reason) == (503, "supervisor unavailable: the supervisor did not answer within 2s")
    ray_error = SupervisorUnavailable("the actor died unexpectedly\n\tclass_name: Supervisor\n\tpid: 7833")
    assert health_verdict(ray_error, uses_livekit=False).reason == "supervisor unavailable: the actor died unexpectedly"


@pytest.mark.parametrize("state", [None, BridgeState.CONNECTING, BridgeState.REFUSED, BridgeState.DISCONNECTED,
                                   BridgeState.CLOSED])
def test_a_livekit_agent_is_unhealthy_until_its_worker_is_registered(state: BridgeState | None) -> None:
    verdict = health_verdict(report(livekit_state=state), uses_livekit=True)
    assert verdict.status == 503
    assert verdict.reason == f"livekit worker not registered: state={state.value if state else 'none'}"
    assert health_verdict(report(livekit_state=BridgeState.REGISTERED), uses_livekit=True).status == 200


def test_worker_json_has_livekit_agents_keys_and_rayvisors() -> None:
    info = worker_info(report(active_jobs=3, worker_load=0.375, worker_id="AW_1", livekit_state=BridgeState.REGISTERED),
                       health_verdict(report(), uses_livekit=False))
    assert {k: info[k] for k in ("agent_name", "worker_type", "active_jobs", "worker_load", "worker_id",
                                 "draining", "livekit_state", "sdk_version", "project_type", "healthy")} == {
        "agent_name": "desk", "worker_type": "JT_ROOM", "active_jobs": 3, "worker_load": 0.375, "worker_id": "AW_1",
        "draining": False, "livekit_state": "registered", "sdk_version": rayvisor.__version__,
        "project_type": "python", "healthy": True}
    assert "error" not in info


# --------------------------------------------------------------------------- settings


def test_the_port_defaults_to_8081_for_start_and_a_free_port_for_dev_as_in_livekit_agents() -> None:
    opts = WorkerOptions(entrypoint_fnc=entrypoint)
    assert (opts.host, opts.port) == ("", None)
    assert (opts.http_port(devmode=False), opts.http_port(devmode=True)) == (START_HTTP_PORT, DEV_HTTP_PORT) == (8081, 0)
    assert WorkerOptions(entrypoint_fnc=entrypoint, port=9000).http_port(devmode=True) == 9000


@pytest.mark.parametrize("bad", [dict(port=-1), dict(port=65536), dict(port=True), dict(port="8081"),
                                 dict(host=None), dict(health_check_timeout=0)])
def test_bad_http_settings_are_refused_when_the_options_are_built(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidAgent, match=next(iter(bad))):
        WorkerOptions(entrypoint_fnc=entrypoint, **bad)


def test_command_line_flags_override_the_agents_host_and_port() -> None:
    opts = WorkerOptions(entrypoint_fnc=entrypoint, host="10.0.0.1", port=9000)
    assert with_http(opts, None, None) is opts
    assert (with_http(opts, "127.0.0.1", 0).host, with_http(opts, "127.0.0.1", 0).port) == ("127.0.0.1", 0)
    assert with_http(opts, None, 9100).host == "10.0.0.1"


def test_no_http_turns_the_endpoint_off(tmp_path, monkeypatch) -> None:
    agent = tmp_path / "quiet_agent.py"
    agent.write_text("async def entrypoint(ctx):\n    pass\n")
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(rayvisor.cli, "_run_worker", lambda opts, **kwargs: calls.append({"opts": opts, **kwargs}))
    for args in (["start", str(agent), "--no-http"], ["dev", str(agent), "--http-port", "9100"]):
        result = CliRunner().invoke(build_cli(), args)
        assert result.exit_code == 0, result.output
    assert calls[0]["http"] is False
    assert (calls[1]["http"], calls[1]["opts"].port) == (True, 9100)


# --------------------------------------------------------------------------- the server


class FakeSupervisor:
    """Answers ``health`` like ``Client.health``; ``down`` makes it raise, ``hang`` makes it
    block until released (a supervisor that does not answer)."""

    def __init__(self) -> None:
        self.down = False
        self.hang = threading.Event()
        self.release = threading.Event()
        self.asked: list[tuple[str | None, bool, float | None]] = []

    def health(self, agent_name: str | None = None, *, with_load: bool = False,
               timeout: float | None = None) -> SupervisorHealth:
        self.asked.append((agent_name, with_load, timeout))
        if self.hang.is_set():
            self.release.wait(HTTP_TIMEOUT)
        if self.down:
            raise SupervisorUnavailable("the supervisor is unavailable: actor died")
        return report(agent_name=agent_name or "", active_jobs=2, worker_load=0.5 if with_load else None)


@pytest.fixture
def fake() -> Iterator[FakeSupervisor]:
    supervisor = FakeSupervisor()
    yield supervisor
    supervisor.release.set()


@pytest.fixture
def served(fake: FakeSupervisor) -> Iterator[HealthServer]:
    with HealthServer(host="127.0.0.1", port=0, agent_name="desk", uses_livekit=False, timeout=0.5) as server:
        server.start(fake)
        yield server


def test_port_zero_binds_a_free_port_and_the_url_names_it(served: HealthServer) -> None:
    assert served.port != 0 and served.url == f"http://127.0.0.1:{served.port}/"
    assert get(served.url) == (200, "OK")


def test_root_asks_the_supervisor_for_this_agent_without_running_load_fnc(served: HealthServer,
                                                                          fake: FakeSupervisor) -> None:
    get(served.url)
    assert fake.asked == [("desk", False, 0.5)]
    get(served.url + "worker")
    assert fake.asked[-1] == ("desk", True, 0.5)


def test_worker_gives_the_supervisor_load_timeout_more_to_run_load_fnc(fake: FakeSupervisor) -> None:
    with HealthServer(host="127.0.0.1", port=0, agent_name="desk", uses_livekit=False, timeout=0.5,
                      load_timeout=2.0) as server:
        server.start(fake)
        get(server.url)
        get(server.url + "worker")
    assert fake.asked == [("desk", False, 0.5), ("desk", True, 2.5)]


def test_worker_answers_the_supervisors_report_as_json(served: HealthServer) -> None:
    status, body = get(served.url + "worker")
    info = json.loads(body)
    assert status == 200
    assert (info["agent_name"], info["active_jobs"], info["worker_load"], info["healthy"]) == ("desk", 2, 0.5, True)


def test_an_unavailable_supervisor_is_503_on_both_routes(served: HealthServer, fake: FakeSupervisor) -> None:
    fake.down = True
    assert get(served.url) == (503, "supervisor unavailable: the supervisor is unavailable: actor died")
    status, body = get(served.url + "worker")
    assert (status, json.loads(body)) == (503, {"healthy": False, "error": "supervisor unavailable: "
                                                "the supervisor is unavailable: actor died"})


def test_a_supervisor_that_hangs_is_503_once_the_timeout_has_passed(served: HealthServer,
                                                                     fake: FakeSupervisor) -> None:
    fake.hang.set()
    status, body = get(served.url)
    assert status == 503 and "health_check_timeout=0.5s" in body


def test_stop_returns_while_a_probe_hangs_and_the_port_is_closed(fake: FakeSupervisor) -> None:
    server = HealthServer(host="127.0.0.1", port=0, agent_name="desk", uses_livekit=False, timeout=30.0)
    server.start(fake)
    fake.hang.set()
    probe = threading.Thread(target=probe_ignoring_disconnects, args=(server.url,), daemon=True)
    probe.start()
    wait_until(lambda: fake.asked, timeout=HTTP_TIMEOUT)
    server.stop()  # with the probe still blocked in the supervisor call
    assert answering(server.url) is None
    server.stop()  # idempotent


def test_a_taken_port_is_a_health_server_error_naming_it() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(HealthServerError, match=f"127.0.0.1:{port}: Address already in use"):
            HealthServer(host="127.0.0.1", port=port, agent_name="", uses_livekit=False, timeout=1.0)


# --------------------------------------------------------------------------- end to end


AGENT = textwrap.dedent('''
    import asyncio

    from rayvisor import JobContext, WorkerOptions

    async def entrypoint(ctx: JobContext):
        await asyncio.Event().wait()  # runs until shut down

    opts = WorkerOptions(entrypoint_fnc=entrypoint, agent_name="desk", health_check_timeout=1.0)
''')


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def rayvisor_start(agent: Any, namespace: str, *args: str) -> subprocess.Popen[str]:
    """``rayvisor start AGENT`` attached to the test session's Ray, in namespace ``namespace``."""
    return subprocess.Popen(
        [sys.executable, "-m", "rayvisor.cli", "start", str(agent), "--address",
         ray.get_runtime_context().gcs_address, "--namespace", namespace, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_start_serves_health_until_its_supervisor_dies_then_stops_on_ctrl_c(tmp_path, namespace) -> None:
    agent = tmp_path / "desk_agent.py"
    agent.write_text(AGENT)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = rayvisor_start(agent, namespace, "--http-host", "127.0.0.1", "--http-port", str(port))
    try:
        assert wait_until(lambda: answering(url), timeout=STARTUP, interval=0.1) == (200, "OK")
        info = json.loads(get(url + "worker")[1])
        assert {k: info[k] for k in ("agent_name", "worker_type", "active_jobs", "worker_load", "draining",
                                     "sdk_version", "project_type", "healthy")} == {
            "agent_name": "desk", "worker_type": "JT_ROOM", "active_jobs": 0, "worker_load": info["worker_load"],
            "draining": False, "sdk_version": rayvisor.__version__, "project_type": "python", "healthy": True}
        assert 0.0 <= info["worker_load"] <= 1.0

        rayvisor.connect(namespace=namespace).submit(room="desk-1")
        assert json.loads(get(url + "worker")[1])["active_jobs"] == 1

        ray.kill(ray.get_actor(SUPERVISOR_NAME, namespace=namespace), no_restart=True)
        # each probe answers within health_check_timeout (1 s) + 1 s; Ray may take a moment to see the death
        status, body = wait_until(answered_with(503, url), timeout=15, interval=0.1)
        assert body.startswith("supervisor unavailable: ")
        status, body = get(url + "worker")
        assert status == 503 and json.loads(body)["healthy"] is False
    finally:
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert f"health: {url}" in stderr
    assert answering(url) is None


def test_a_taken_port_fails_start_with_one_line_before_any_supervisor_runs(tmp_path, namespace) -> None:
    agent = tmp_path / "desk_agent.py"
    agent.write_text(AGENT)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(build_cli(), [
            "start", str(agent), "--address", ray.get_runtime_context().gcs_address, "--namespace", namespace,
            "--http-host", "127.0.0.1", "--http-port", str(port)])
    assert result.exit_code != 0
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: HealthServerError: cannot serve the health endpoint on 127.0.0.1:{port}")
    assert "--http-port" in line and "Traceback" not in result.output
    with pytest.raises(SupervisorNotFound):
        rayvisor.connect(namespace=namespace)


@pytest.fixture
def livekit() -> Iterator[LocalLiveKitServer]:
    with LocalLiveKitServer() as server:
        yield server


def test_a_livekit_agent_is_healthy_once_its_worker_registers(
        serve: Callable[..., rayvisor.Client], livekit: LocalLiveKitServer) -> None:
    livekit.accept_workers(False)  # a LiveKit server that is restarting: registration fails
    agent_name = "agent-" + uuid.uuid4().hex[:6]
    client = serve(entrypoint, agent_name=agent_name, ws_url=livekit.ws_url, api_key=livekit.api_key,
                   api_secret=livekit.api_secret, reconnect_initial_delay=0.1, reconnect_max_delay=0.5)
    client.start_worker()
    opts = WorkerOptions(entrypoint_fnc=entrypoint, agent_name=agent_name, ws_url=livekit.ws_url,
                         api_key=livekit.api_key, api_secret=livekit.api_secret)
    with HealthServer.for_agent(replace(opts, host="127.0.0.1", port=0), devmode=False) as health:
        health.start(client)
        status, body = get(health.url)
        assert status == 503 and body.startswith("livekit worker not registered: state=")
        assert json.loads(get(health.url + "worker")[1])["healthy"] is False

        livekit.accept_workers(True)
        assert wait_until(answered_with(200, health.url), timeout=30, interval=0.1) == (200, "OK")
        info = json.loads(get(health.url + "worker")[1])
        assert (info["livekit_state"], info["healthy"]) == ("registered", True)
        assert info["worker_id"] == client.worker_status().worker_id != ""
