"""``rayvisor demo --scenario voice``: a text conversation with a LiveKit Agents voice agent.

The agent is ``examples/voice_agent.py``, written for LiveKit Agents only (an
``AgentSession`` with a scripted LLM in text mode and a ``lookup_weather`` function tool),
served by rayvisor on a local Ray with the built-in local room backend:
  1. a tiny weather HTTP service starts on 127.0.0.1 (its URL goes in the job's metadata);
  2. alice joins room weather-desk and the agent greets her;
  3. she asks about two cities, one after the other; for each, the agent's tool finds its
     job with ``get_job_context()`` and GETs the weather service through the job's
     ``http_context.http_session()``, and the agent reads the report back, job id included;
  4. alice leaves and the job ends SUCCEEDED, cause room_empty.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import ray

from .agents.options import WorkerOptions
from .errors import AgentLoadError
from .messages import Cause, JobState, Transition

VOICE_DEMO_NAMESPACE = "rayvisor-voice-demo"
WAIT = 30.0
"""Bound on every wait in the voice demo (a job's first AgentSession is slow to import)."""
DEFAULT_AGENT_FILE = Path(__file__).resolve().parent.parent / "examples" / "voice_agent.py"
"""The repository's LiveKit Agents quickstart agent (not installed with the package)."""
INSTALL_HINT = "pip install -e '.[agents]'"
ROOM = "weather-desk"
USER = "alice"
CITIES = ("Oslo", "Lisbon")
"""What the user asks about, in order (the scripted LLM takes the user's text as the city)."""
CHAT_TOPIC = "lk.chat"
"""LiveKit Agents' text input: a participant's text on this topic is the user's turn."""
REPLY_TOPIC = "lk.transcription"
"""LiveKit Agents' text output: the agent's replies (``lk.agent.session`` carries binary
session events, not shown here)."""
WEATHER = {"oslo": "cloudy, 9 degrees", "lisbon": "sunny, 24 degrees", "paris": "sunny, 21 degrees"}
"""The weather service's reports."""


def weather_report(city: str) -> str:
    """What the weather service answers for ``city``."""
    return f"{WEATHER.get(city.strip().lower(), 'no report')} in {city.strip()}"


class WeatherService:
    """``GET /?city=X`` -> ``"<report> in X"`` (text/plain), an aiohttp app on 127.0.0.1 at a
    free port, run in a background thread with its own event loop. ``on_request(city, answer)``
    is called for every request it serves."""

    def __init__(self, on_request: Callable[[str, str], None] = lambda city, answer: None) -> None:
        self._on_request = on_request
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rayvisor-weather-service",
                                        daemon=True)
        self._runner = None
        self.url = ""

    def start(self, timeout: float = WAIT) -> str:
        """Start serving; returns the service's URL."""
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout)
        return self.url

    def stop(self, timeout: float = WAIT) -> None:
        """Stop serving and end the thread (safe to call more than once, or before ``start``)."""
        if not self._thread.is_alive():
            return
        try:
            if self._runner is not None:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()

    async def _start(self) -> str:
        from aiohttp import web

        async def answer(request: web.Request) -> web.Response:
            city = request.query.get("city", "")
            text = weather_report(city)
            self._on_request(city, text)
            return web.Response(text=text)

        app = web.Application()
        app.router.add_get("/", answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)  # port 0: a free port
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}/"


def load_voice_agent(path: Path) -> WorkerOptions:
    """The agent file's rayvisor ``WorkerOptions``, forced onto the local room backend
    (even with LIVEKIT_* set); ``AgentLoadError`` naming the fix when it cannot run here."""
    from .agent_loader import load_agent

    if importlib.util.find_spec("livekit.agents") is None:
        raise AgentLoadError(f"the voice demo needs livekit-agents, which is not installed; "
                             f"install it with `{INSTALL_HINT}` (from the rayvisor repository)")
    if not path.is_file():
        raise AgentLoadError(f"the voice demo's agent {path} does not exist; it ships with the rayvisor "
                             f"repository: run the demo from a checkout installed with `{INSTALL_HINT}`")
    opts = load_agent(str(path))
    return dataclasses.replace(opts, ws_url="", api_key="", api_secret="")


def run_voice_demo(*, agent_file: Path | None = None, ray_logging_level: int = logging.ERROR) -> int:
    """Run the scripted conversation; returns a process exit code (0 when the job ended
    SUCCEEDED with cause room_empty and every answer carried the weather service's report).
    ``agent_file``: the agent to talk to (default: the repository's ``examples/voice_agent.py``).
    ``ray_logging_level``: this process's ``ray`` logger (``rayvisor --verbose demo`` shows Ray's lines)."""
    import rayvisor
    from .cli import format_transition

    path = Path(agent_file) if agent_file is not None else DEFAULT_AGENT_FILE
    opts = load_voice_agent(path)  # before starting anything: a missing dependency is one line
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throw-away local Ray, gone when the demo ends
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            print(line, flush=True)

    served: list[str] = []

    def on_request(city: str, answer: str) -> None:
        served.append(answer)
        say(f"            weather service: GET /?city={city} -> {answer!r}")

    weather = WeatherService(on_request)
    client = None
    stop = threading.Event()
    follower: threading.Thread | None = None
    say("starting a local weather service, a local Ray and the rayvisor supervisor ...")
    try:
        url = weather.start()
        say(f"weather service listening at {url} (GET /?city=X)")
        # address="local": always a Ray of its own, which ray.shutdown() below removes (see demo.py).
        ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace=VOICE_DEMO_NAMESPACE,
                 logging_level=ray_logging_level, configure_logging=True)
        client = rayvisor.serve(opts, namespace=VOICE_DEMO_NAMESPACE)
        rooms = rayvisor.local_rooms(namespace=VOICE_DEMO_NAMESPACE)
        say(f"serving {_shown(path)}")
        if path == DEFAULT_AGENT_FILE:
            say("  a LiveKit Agents AgentSession in text mode: its scripted LLM takes what the user says as a")
            say("  city and calls the lookup_weather tool, which GETs the weather service")
        follower = threading.Thread(target=_follow, args=(client, stop, say, format_transition), daemon=True)
        follower.start()

        user = rooms.join(ROOM, USER)
        metadata = json.dumps({"weather_url": url})
        say(f"{USER} joins room {ROOM}; a job is submitted for it with metadata {metadata}")
        job = client.submit(room=ROOM, metadata=metadata)
        replies = _show_replies(user, 1, say)
        answers: list[str] = []
        for city in CITIES:
            say(f"            {USER} -> agent: {city}")
            user.send_text(city, topic=CHAT_TOPIC)
            replies = _show_replies(user, len(replies) + 1, say)
            answers.append(replies[-1])
        say(f"            {USER} leaves")
        user.leave()
        info = client.wait(job, timeout=WAIT)
        stop.set()
        follower.join(timeout=WAIT)

        carried = [weather_report(city) in answer and info.id in answer for city, answer in zip(CITIES, answers)]
        ok = info.state == JobState.SUCCEEDED and info.cause == Cause.ROOM_EMPTY and all(carried)
        say("")
        say("summary")
        say(f"  {info.room}: {info.state.value:<9} cause={info.cause.value if info.cause else None}"
            f"  (expected SUCCEEDED, room_empty)")
        for city, answer_ok in zip(CITIES, carried):
            say(f"  {city}: the agent's answer {'carried' if answer_ok else 'did NOT carry'} the weather "
                f"service's report and job id {info.id}")
        say(f"  the weather service answered {len(served)} requests: the tool's GETs through the job's http_session")
        return 0 if ok else 1
    finally:
        stop.set()
        if follower is not None:
            follower.join(timeout=WAIT)
        try:
            if client is not None:
                client.stop()
        finally:
            ray.shutdown()
            weather.stop()
            say("local Ray stopped; nothing left running")


def _follow(client, stop: threading.Event, say: Callable[[str], None],
            format_transition: Callable[[Transition], str]) -> None:
    """Print every transition as it happens; once ``stop`` is set, one last poll prints those
    recorded meanwhile (the job's final state, when ``stop`` is set after ``client.wait``)."""
    after = -1
    while True:
        last = stop.is_set()
        for event in client.events(after, timeout=0.0 if last else 0.5):
            say(format_transition(event))
            after = event.seq
        if last:
            return


def _show_replies(participant, count: int, say) -> list[str]:
    """Wait for the agent's ``count``-th reply; print it; return every reply so far."""
    replies = [text for _sender, _topic, text in participant.wait_for_messages(count, topic=REPLY_TOPIC,
                                                                               timeout=WAIT)]
    say(f"            agent -> {participant.identity}: {replies[count - 1]}")
    return replies


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
