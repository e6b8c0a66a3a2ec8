"""rayvisor jobs for the benchmark; the same behaviours as ``anchor_agents.py``."""

from __future__ import annotations

import asyncio
import os
import time

from rayvisor import JobContext

from common import mark


async def entrypoint(ctx: JobContext) -> None:
    behaviour = ctx.job.metadata
    mark(ctx.job.id, "start")
    if behaviour == "crash":
        await asyncio.sleep(0.2)
        mark(ctx.job.id, "crash")
        os._exit(1)
    if behaviour == "cooperative":
        async def quick_callback() -> None:
            await asyncio.sleep(0)

        ctx.add_shutdown_callback(quick_callback)
        return
    if behaviour == "callback_hangs":
        async def hang() -> None:
            await asyncio.Event().wait()

        ctx.add_shutdown_callback(hang)
        return
    if behaviour == "ignores_cancellation":
        await asyncio.sleep(3600)  # keeps working through the shutdown request until it is cancelled
    if behaviour == "swallows_cancellation":
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass
    if behaviour == "blocks_loop":
        time.sleep(3600)
