"""rayvisor jobs for the benchmark: the behaviours of ``common.run_behaviour``."""

from __future__ import annotations

from rayvisor import JobContext

from common import run_behaviour


async def entrypoint(ctx: JobContext) -> None:
    await run_behaviour(ctx)
