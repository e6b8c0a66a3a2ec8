"""A LiveKit Agents quickstart agent (``examples/voice_agent.py``) runs on rayvisor as it is.

The file imports only from ``livekit.agents``: an ``AgentSession`` started on ``ctx.room``
in text mode, a greeting from ``generate_reply``, and a function tool that reads
``get_job_context().job.id`` and calls a weather service through
``http_context.http_session()``. Served with its own ``WorkerOptions`` (and with
``rayvisor dev FILE``), it greets a local-backend participant, answers its ``lk.chat``
text with the tool's result, and ends SUCCEEDED / ``room_empty`` when the participant leaves.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("livekit.agents")

from aiohttp import web  # noqa: E402
from test_cli import serve_in_subprocess  # noqa: E402
from test_examples import load_example  # noqa: E402

import rayvisor  # noqa: E402
from rayvisor import Cause, JobState  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "voice_agent.py"
TIMEOUT = 60.0
"""Deadline for anything that involves starting a job actor (cold actors are slow on CI)."""
GREETING = "Hello! I can tell you the weather. Which city?"
SERVICE_TIMEOUT = 10.0
"""Bound on starting and stopping the local weather service."""


class WeatherService:
    """A local HTTP weather service in a thread: what the agent's tool calls."""

    def __init__(self) -> None:
        self.cities: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def weather(request: web.Request) -> web.Response:
            city = request.query.get("city", "")
            self.cities.append(city)
            return web.Response(text=f"foggy, 7 degrees in {city}")

        app = web.Application()
        app.router.add_get("/", weather)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/"
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> "WeatherService":
        self._thread.start()
        if not self._ready.wait(SERVICE_TIMEOUT):
            raise TimeoutError(f"the weather service did not start within {SERVICE_TIMEOUT}s")
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(SERVICE_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(SERVICE_TIMEOUT)


@pytest.fixture
def weather() -> Iterator[WeatherService]:
    with WeatherService() as service:
        yield service


def converse(client: rayvisor.Client, rooms, room: str, weather_url: str) -> tuple[str, list[str], rayvisor.JobInfo]:
    """Join, hear the greeting, ask about Oslo, leave: the job id, what the agent said, its end."""
    user = rooms.join(room, "user")
    job_id = client.submit(room=room, metadata=json.dumps({"weather_url": weather_url}))
    user.wait_for_messages(1, topic="lk.transcription", timeout=TIMEOUT)
    user.send_text("Oslo", topic="lk.chat")
    said = [text for _, _, text in user.wait_for_messages(2, topic="lk.transcription", timeout=TIMEOUT)]
    user.leave()
    return job_id, said, client.wait(job_id, timeout=TIMEOUT)


def test_the_quickstart_agent_served_with_its_own_worker_options_answers_through_its_tool(
        namespace, rooms, weather: WeatherService) -> None:
    module = load_example("voice_agent")
    client = rayvisor.serve(module.opts, namespace=namespace)  # livekit-agents' WorkerOptions, as the file has it
    try:
        job_id, said, info = converse(client, rooms, "weather-desk", weather.url)
    finally:
        client.stop(timeout=30)

    assert said == [GREETING, f"The weather there: foggy, 7 degrees in Oslo (job {job_id})."]
    assert weather.cities == ["Oslo"]  # the tool's HTTP call went through the job's http_session
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY)


def test_the_same_file_runs_under_rayvisor_dev(namespace, rooms, weather: WeatherService) -> None:
    proc, client = serve_in_subprocess("dev", EXAMPLE, namespace)
    try:
        job_id, said, info = converse(client, rooms, "dev-weather-desk", weather.url)
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)

    assert said[-1] == f"The weather there: foggy, 7 degrees in Oslo (job {job_id})."
    assert (info.state, info.cause) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY)
    assert proc.returncode == 0, stderr
    assert job_id in stdout + stderr  # dev printed the job's lifecycle
