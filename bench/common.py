"""What the benchmark's sides share: job behaviours, marks, process measurements, statistics.

Imported by ``rayvisor_side.py`` and ``ray_floor_side.py`` (the project's environment) and
``anchor_side.py`` (the LiveKit Agents virtual environment), so it needs nothing but the
standard library and psutil. Jobs of every side report when their entrypoint started (and
when they are about to crash) by appending a line to a marks file: one clock
(``time.time()``) on one machine.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

MARKS_ENV = "RAYVISOR_BENCH_MARKS"
"""Environment variable naming the marks file (inherited by both systems' job processes)."""

BEHAVIOURS = ("cooperative", "ignores_cancellation", "swallows_cancellation", "blocks_loop", "callback_hangs")
"""The shutdown figure's job kinds (what the metadata of a job says it does at shutdown)."""

DEFAULT_POOL = min(os.cpu_count() or 1, 4)
"""LiveKit Agents' default ``num_idle_processes`` (cores, at most 4): the pool every side
uses for the "burst of 20" row (rayvisor's own default is adaptive, 1 to 4), so that row
compares like with like."""

SHUTDOWN_BUDGET = 2.0
SHUTDOWN_CAP = 20.0
"""How long the bench waits for a job process to go before it records ``> cap`` and kills it."""
DENSITY_BUDGET_MIB = 8 * 1024
MEMORY_SETTLE_SECONDS = 1.0
"""Idle time given to job processes before their memory is read (part of the method)."""


def mark(job_id: str, event: str) -> None:
    """Append ``job_id event time pid`` to the marks file (one write: lines never interleave)."""
    line = f"{job_id} {event} {time.time():.6f} {os.getpid()}\n"
    fd = os.open(os.environ[MARKS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Marks:
    """Reads the marks file as jobs write it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def read(self) -> dict[tuple[str, str], tuple[float, int]]:
        found = {}
        for line in self.path.read_text().split("\n")[:-1]:  # the last piece may still be being written
            job_id, event, at, pid = line.split()
            found[(job_id, event)] = (float(at), int(pid))
        return found

    def wait(self, keys: list[tuple[str, str]], timeout: float, poll: float = 0.001) -> dict[tuple[str, str], tuple[float, int]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.read()
            if all(k in found for k in keys):
                return found
            if time.monotonic() > deadline:
                missing = [k for k in keys if k not in found]
                raise TimeoutError(f"{len(missing)} marks missing after {timeout}s, e.g. {missing[:3]}")
            time.sleep(poll)


def wait_gone(pids: list[int], started: float, cap: float) -> dict[int, float | None]:
    """Seconds from ``started`` (``time.time()``) until each process is gone; None past ``cap``
    (those are killed, so nothing outlives the bench)."""
    gone: dict[int, float | None] = {}
    deadline = started + cap
    while len(gone) < len(pids):
        for pid in pids:
            if pid not in gone and not alive(pid):
                gone[pid] = time.time() - started
        if time.time() > deadline:
            for pid in pids:
                if pid not in gone:
                    gone[pid] = None
                    try:
                        psutil.Process(pid).kill()
                    except psutil.NoSuchProcess:
                        pass
            break
        time.sleep(0.002)
    return gone


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def memory_mib(pid: int) -> tuple[float, float]:
    """(PSS, RSS) of a process in MiB."""
    info = psutil.Process(pid).memory_full_info()
    return info.pss / 2**20, info.rss / 2**20


def density_figures(memory: list[tuple[float, float]]) -> dict[str, Any]:
    """The memory rows from each idle job's (PSS, RSS): medians, and jobs per 8 GiB by PSS."""
    pss = sorted(m[0] for m in memory)
    rss = sorted(m[1] for m in memory)
    return {"pss_mib": summary(pss, "MiB"), "rss_mib": summary(rss, "MiB"),
            "jobs_in_8_gib": int(DENSITY_BUDGET_MIB // pss[len(pss) // 2])}


def summary(values: list[float | None], unit: str = "s") -> dict[str, Any]:
    """Median and p95 (nearest rank) of the measured values; censored (None) ones count as
    larger than any measured one, so a job that never ended raises the p95, not hides it."""
    measured = sorted(v for v in values if v is not None)
    censored = len(values) - len(measured)
    ordered: list[float] = measured + [float("inf")] * censored

    def rank(q: float) -> float | None:
        """Nearest rank: the smallest value with at least ``q`` of the samples at or below it."""
        if not ordered:
            return None
        value = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
        return None if value == float("inf") else value

    return {"n": len(values), "p50": rank(0.5), "p95": rank(0.95), "max": rank(1.0),
            "censored": censored, "unit": unit,
            "mean": statistics.fmean(measured) if measured else None}


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


async def run_behaviour(ctx: Any) -> None:
    """What a benchmark job does, by ``ctx.job.metadata``. Both systems' ``JobContext`` offer
    the same ``job`` and ``add_shutdown_callback`` (the floor's job actor passes a stand-in
    with the two), so one function serves every side."""
    import asyncio

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
        return  # as agents usually do: the session runs on, the entrypoint returns
    if behaviour == "callback_hangs":
        async def hang() -> None:
            await asyncio.Event().wait()

        ctx.add_shutdown_callback(hang)
        return
    if behaviour == "ignores_cancellation":
        # Work that must not be interrupted: it runs shielded, and a cancelled entrypoint
        # keeps waiting for it (then re-raises). Unlike swallows_cancellation, the
        # cancellation is honoured, but only once the work is done, an hour from now.
        work = asyncio.ensure_future(asyncio.sleep(3600))
        cancelled = False
        while not work.done():
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
    if behaviour == "swallows_cancellation":
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass
    if behaviour == "blocks_loop":
        time.sleep(3600)
    # "idle": the entrypoint returned; the job lives until it is shut down


def size_arguments(parser: Any) -> None:
    """The sizes every side takes (``run.py`` passes the same values to all three)."""
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--burst-size", type=int, default=20)
    parser.add_argument("--shutdown-jobs", type=int, default=20)
    parser.add_argument("--density-jobs", type=int, default=20)
