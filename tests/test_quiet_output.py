"""Ray's own warnings stay out of the CLI's output unless ``--verbose``; the supervisor's
logs carry no Ray deprecation warning."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from support import actor_pid, worker_log_lines

from rayvisor import JobContext
from rayvisor.supervisor.supervisor import SUPERVISOR_NAME

CLI_TIMEOUT = 120.0
"""Bound on one ``rayvisor`` command in its own process (≈ 3 s here: importing Ray, attaching)."""
TOKEN_AUTH_WARNING = "Token authentication is enabled for this Ray cluster"
RAY_LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?:WARNING|INFO)\s+\S+\.py:\d+ -- ")
"""A line of Ray's ``ray`` logger, as its default handler formats it."""
RAY_CORE_LOG_RECORD = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ [WI] \d+ \d+\] \S+:\d+: ")
"""A warning or info line of Ray's C++ core (``[... W pid tid] file.cc:210: ...``)."""


async def waits(ctx: JobContext) -> None:
    await ctx.connect()


@pytest.fixture
def user_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``python -m rayvisor ARGS`` in its own process, as README's user runs it after
    ``rayvisor dev``: no RAY_AUTH_MODE (Ray's default), an auth token on disk, and the default
    ``--address auto``, which makes Ray turn token auth on and say so on every call.

    ``auto`` is pinned to the test session's Ray by the file in which ``ray start`` records
    the latest cluster (``$RAY_TMPDIR/ray/ray_current_cluster``), so another Ray running on
    this machine is never attached to; the token is a file of the test's own
    (``RAY_AUTH_TOKEN_PATH``). The session's Ray has auth off, and accepts the token."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    ray_tmpdir = tmp_path / "rt"
    (ray_tmpdir / "ray").mkdir(parents=True)
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(ray.get_runtime_context().gcs_address)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(ray_tmpdir))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rayvisor", *args], env=env, capture_output=True, text=True,
                              timeout=CLI_TIMEOUT)

    return run


def ray_noise(output: str) -> list[str]:
    """The lines of ``output`` that are Ray's own: its logger's records and its warnings."""
    return [line for line in output.splitlines()
            if RAY_LOG_RECORD.match(line) or RAY_CORE_LOG_RECORD.match(line)
            or TOKEN_AUTH_WARNING in line or "RayDeprecationWarning" in line]


def test_cli_output_has_no_ray_warning_without_verbose_but_keeps_its_own_output_and_errors(serve, namespace, user_cli):
    serve(waits)

    metrics = user_cli("metrics", "--namespace", namespace)
    assert metrics.returncode == 0, metrics.stderr
    assert "counters" in json.loads(metrics.stdout)
    assert not ray_noise(metrics.stdout + metrics.stderr), metrics.stderr

    missing = user_cli("status", "RJ_missing", "--namespace", namespace)
    assert missing.returncode != 0
    assert "JobNotFound" in missing.stderr
    assert not ray_noise(missing.stdout + missing.stderr), missing.stderr


def test_verbose_shows_rays_own_warnings(serve, namespace, user_cli):
    serve(waits)

    metrics = user_cli("--verbose", "metrics", "--namespace", namespace)
    assert metrics.returncode == 0, metrics.stderr
    assert "counters" in json.loads(metrics.stdout)
    assert TOKEN_AUTH_WARNING in metrics.stderr  # Ray turned token auth on, and says so


def test_the_supervisor_logs_no_ray_deprecation_warning(serve, namespace):
    """The supervisor's stderr is kept in the Ray session's log files (tests run with
    ``log_to_driver=False``); a Ray API it calls while starting must not be deprecated."""
    serve(waits)  # returns once the supervisor has started and answered
    lines = worker_log_lines(actor_pid(ray.get_actor(SUPERVISOR_NAME, namespace=namespace)))
    assert not [line for line in lines if "RayDeprecationWarning" in line], lines
