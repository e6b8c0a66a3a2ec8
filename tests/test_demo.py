"""``python -m rayvisor demo``, exactly as README's set-up runs it, in its own process."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import uuid

import psutil

DEMO_TIMEOUT = 240.0
"""Bound on the whole demo (≈ 13 s here: a fresh Ray, three jobs, a 1 s kill budget); generous
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


def test_demo_shows_three_job_endings_and_leaves_no_ray_running():
    run = uuid.uuid4().hex
    env = {**os.environ, MARKER: run}
    # The user's default auth mode, not the suite's: conftest sets RAY_AUTH_MODE=disabled for
    # the test session's Ray only, and a user typing README's command has no RAY_AUTH_MODE.
    # The demo then picks its own mode for its throw-away Ray, as it does for them.
    env.pop("RAY_AUTH_MODE", None)
    before = ray_processes()
    try:
        demo = subprocess.run([sys.executable, "-m", "rayvisor", "demo"], env=env, capture_output=True, text=True,
                              timeout=DEMO_TIMEOUT)

        assert demo.returncode == 0, demo.stdout + demo.stderr
        for room, state, cause in ENDINGS:
            # printed live, as the job ends, and again in the closing summary
            expected = f"{room} should end {state} cause={cause}:\n{demo.stdout}"
            assert re.search(rf"job RJ_\w+\s+{state}\s+room={room}\s+cause={cause}\b", demo.stdout), expected
            assert re.search(rf"^  {room}: {state}\s+cause={cause}\s", demo.stdout, re.MULTILINE), expected
        assert demo.stdout.rstrip().endswith("nothing left running"), demo.stdout

        survivors = {pid: proc.info["name"] for pid, proc in ray_processes().items()
                     if pid not in before and started_by(proc, run)}
        assert not survivors, f"Ray processes the demo started are still running: {survivors}"
    finally:  # whatever the demo left behind is ours to remove, by PID
        for proc in ray_processes().values():
            if started_by(proc, run):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
