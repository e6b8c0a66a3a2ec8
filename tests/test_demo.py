"""``python -m rayvisor demo`` (both scenarios), exactly as README's set-up runs it, in its own process."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import uuid

import psutil
import pytest

DEMO_TIMEOUT = 240.0
"""Bound on a whole demo (≈ 13 s here for lifecycle: a fresh Ray, three jobs, a 1 s kill
budget; ≈ 10 s for voice: a fresh Ray, one job importing livekit-agents); generous
because a fresh Ray starts slowly on a loaded 2-core machine, and under pytest-timeout's 300 s
so that the clean-up below still runs."""
MARKER = "RAYVISOR_DEMO_TEST_RUN"
"""Environment variable set only for the demo's process: every process it starts inherits it
(raylet, gcs_server, Ray's agents and workers), which tells the demo's Ray apart from the test
session's Ray and from any other Ray started on this machine meanwhile."""
RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::")
ENDINGS = [
    ("support-42", "SUCCEEDED", "room_empty"),  # the caller and the SIP participant leave
    ("support-43", "SUCCEEDED", "user_shutdown"),  # the agent calls ctx.shutdown on "bye"
    ("support-44", "KILLED", "shutdown_timeout"),  # its shutdown hook hangs past the budget
]
"""The three ways the demo's jobs end (rayvisor/demo.py), as it prints them."""
VOICE_GREETING = "Hello! I can tell you the weather. Which city?"
"""The greeting of examples/voice_agent.py."""
VOICE_WEATHER = {"Oslo": "cloudy, 9 degrees", "Lisbon": "sunny, 24 degrees"}
"""What the voice demo's user asks about, in order, and its weather service's reports
(rayvisor/voice_demo.py), written out here so a change there shows up as a failure."""


def ray_processes() -> dict[int, psutil.Process]:
    """Every live Ray process on this machine (raylet, gcs_server, ``ray::`` agents and
    workers, Ray's Python daemons), by PID."""
    found = {}
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            name, cmdline = proc.info["name"] or "", " ".join(proc.info["cmdline"] or ())
            if name.startswith(RAY_PROCESS_NAMES) or cmdline.startswith(RAY_PROCESS_NAMES) or "/ray/" in cmdline:
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def started_by(proc: psutil.Process, run: str) -> bool:
    """Whether ``proc`` is alive and descends from the demo run ``run`` (see ``MARKER``)."""
    try:
        return proc.environ().get(MARKER) == run and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def run_demo(*args: str) -> str:
    """Run ``python -m rayvisor demo ARGS`` as README's set-up does, in its own process; check
    that it exits 0, that its last line says nothing is left running and that no Ray process
    it started is; returns its output. Whatever it left behind is killed, by PID."""
    run = uuid.uuid4().hex
    env = {**os.environ, MARKER: run}
    # The user's default auth mode, not the suite's: conftest sets RAY_AUTH_MODE=disabled for
    # the test session's Ray only, and a user typing README's command has no RAY_AUTH_MODE.
    # The demo then picks its own mode for its throw-away Ray, as it does for them.
    env.pop("RAY_AUTH_MODE", None)
    before = ray_processes()
    try:
        demo = subprocess.run([sys.executable, "-m", "rayvisor", "demo", *args], env=env, capture_output=True,
                              text=True, timeout=DEMO_TIMEOUT)

        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert demo.stdout.rstrip().endswith("nothing left running"), demo.stdout

        survivors = {pid: proc.info["name"] for pid, proc in ray_processes().items()
                     if pid not in before and started_by(proc, run)}
        assert not survivors, f"Ray processes the demo started are still running: {survivors}"
        return demo.stdout
    finally:  # whatever the demo left behind is ours to remove, by PID
        for proc in ray_processes().values():
            if started_by(proc, run):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()


def test_demo_shows_three_job_endings_and_leaves_no_ray_running():
    stdout = run_demo()

    for room, state, cause in ENDINGS:
        # printed live, as the job ends, and again in the closing summary
        expected = f"{room} should end {state} cause={cause}:\n{stdout}"
        assert re.search(rf"job RJ_\w+\s+{state}\s+room={room}\s+cause={cause}\b", stdout), expected
        assert re.search(rf"^  {room}: {state}\s+cause={cause}\s", stdout, re.MULTILINE), expected


def test_voice_demo_talks_to_a_livekit_agents_agent_and_leaves_no_ray_running():
    pytest.importorskip("livekit.agents")
    stdout = run_demo("--scenario", "voice")

    assert f"agent -> alice: {VOICE_GREETING}" in stdout, stdout
    ended = re.search(r"job (RJ_\w+)\s+SUCCEEDED\s+room=weather-desk\s+cause=room_empty\b", stdout)
    assert ended, f"the voice demo's job should end SUCCEEDED cause=room_empty:\n{stdout}"
    job_id = ended.group(1)
    for city, weather in VOICE_WEATHER.items():
        # the tool ran in the job (its id) and asked the demo's weather service over HTTP (its report)
        assert f"alice -> agent: {city}\n" in stdout, stdout
        answer = re.search(rf"^\s*agent -> alice: .*{re.escape(weather)} in {city}\b.*$", stdout, re.MULTILINE)
        assert answer, f"no answer with the weather service's report for {city}:\n{stdout}"
        assert job_id in answer.group(0), f"the answer about {city} should name job {job_id}:\n{stdout}"
    assert re.search(r"^  weather-desk: SUCCEEDED\s+cause=room_empty\s", stdout, re.MULTILINE), stdout
