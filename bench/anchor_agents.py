"""LiveKit Agents jobs for the benchmark (run in the LiveKit Agents venv, in its job processes).

The behaviours are ``common.run_behaviour``, shared with ``rayvisor_agents.py``.
"""

from __future__ import annotations

from livekit.agents import JobContext, JobProcess

from common import run_behaviour


def prewarm(proc: JobProcess) -> None:
    """Nothing to load: the figures measure the runtime, not a model."""


async def entrypoint(ctx: JobContext) -> None:
    await run_behaviour(ctx)
