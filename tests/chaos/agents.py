"""The chaos workload's agent: one entrypoint whose behaviour the job's metadata picks.

Metadata is JSON: ``{"kind": ..., "after": seconds, "ledger": path, "hog_mb": n}``.

- ``cooperative``: waits in its room; ends when asked or when its users leave.
- ``participants``: the same, with a participant entrypoint (a child actor per user).
- ``hang``: its shutdown callback never returns, so every shutdown ends in a kill.
- ``crash``: ``os._exit`` after ``after`` seconds.
- ``raise``: its entrypoint raises after ``after`` seconds.
- ``memory``: allocates ``hog_mb`` MiB after ``after`` seconds and keeps it.

Every shutdown callback run and every participant entrypoint start is written to the
ledger, so the checker can count them.
"""

from __future__ import annotations

import asyncio
import json
import os

from chaos.ledger import Ledger

from rayvisor import JobContext

PAGE = 4096
_hogs: list[bytearray] = []  # keeps a memory job's allocation alive


class ChaosError(RuntimeError):
    """What a ``raise`` job's entrypoint raises."""


def _plan(ctx) -> dict:
    return json.loads(ctx.job.metadata)


async def serve_participant(ctx, participant) -> None:
    plan = _plan(ctx)
    Ledger(plan["ledger"]).write("participant", job=ctx.job.id, identity=participant.identity)
    await asyncio.Event().wait()  # lives until its participant leaves or the job ends


async def chaos_agent(ctx: JobContext) -> None:
    plan = _plan(ctx)
    kind, ledger, job_id = plan["kind"], Ledger(plan["ledger"]), ctx.job.id

    async def on_shutdown(reason: str) -> None:
        ledger.write("callback", job=job_id, reason=reason)
        if kind == "hang":
            await asyncio.Event().wait()  # never returns: only the deadline's kill ends it

    ctx.add_shutdown_callback(on_shutdown)
    if kind == "participants":
        ctx.add_participant_entrypoint(serve_participant)
    await ctx.connect()
    ledger.write("started", job=job_id)
    if kind in ("crash", "raise", "memory"):
        await asyncio.sleep(plan["after"])
    if kind == "crash":
        os._exit(3)
    if kind == "raise":
        raise ChaosError(f"job {job_id} raised on purpose")
    if kind == "memory":
        hog = bytearray(plan["hog_mb"] << 20)
        hog[::PAGE] = b"\x01" * len(range(0, len(hog), PAGE))  # touch every page: resident, not just mapped
        _hogs.append(hog)
