"""A job actor imports what a job needs, not the supervisor's side.

Ray rebuilds the supervisor's handle in every job actor by importing the supervisor's
actor class; that module must stay light (the client, the core and the LiveKit bridge,
with aiohttp and livekit.api, cost ~0.2 s and ~17 MiB per job actor)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from support import wait_until

from rayvisor import JobContext, JobState

SUPERVISOR_SIDE = ("rayvisor.supervisor.core", "rayvisor.supervisor.client", "rayvisor.supervisor.job_driver",
                   "rayvisor.supervisor.worker_bridge", "aiohttp", "livekit.api")


async def reports_its_modules(ctx: JobContext) -> None:
    """Writes which supervisor-side modules its process has loaded to the file in its metadata."""
    loaded = [name for name in SUPERVISOR_SIDE if name in sys.modules]
    Path(ctx.job.metadata).write_text(json.dumps(loaded))


def test_a_job_actor_loads_none_of_the_supervisor_side(serve, tmp_path) -> None:
    client = serve(reports_its_modules)
    report = tmp_path / "modules.json"
    job_id = client.submit(room="imports", metadata=str(report))
    wait_until(report.exists, timeout=30)
    assert json.loads(report.read_text()) == []
    client.shutdown(job_id)
    assert client.wait(job_id, timeout=30).state == JobState.SUCCEEDED
