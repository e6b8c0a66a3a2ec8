"""LiveKit Agents' side of the benchmark: its job process pool, driven directly.

Runs in the LiveKit Agents virtual environment (``run.py`` makes it). ``ProcPool`` is set
up as ``livekit.agents.Worker`` sets it up on Linux: a forkserver that preloads
``livekit.agents.ipc._preload`` (local-inference models off: these jobs use none), job
processes (not threads), and jobs given as a locally built ``RunningJobInfo`` — no
LiveKit server is involved. Prints one JSON object (the figures) to the ``--out`` file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")]))
os.environ.setdefault("LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE", "0")

from livekit.agents import JobExecutorType  # noqa: E402
from livekit.agents.ipc.job_executor import JobStatus  # noqa: E402
from livekit.agents.ipc.proc_pool import ProcPool  # noqa: E402
from livekit.agents.job import JobAcceptArguments, RunningJobInfo  # noqa: E402
from livekit.protocol import agent, models  # noqa: E402

import anchor_agents  # noqa: E402
from common import DEFAULT_POOL, MEMORY_SETTLE_SECONDS, BEHAVIOURS, MARKS_ENV, SHUTDOWN_BUDGET, SHUTDOWN_CAP, Marks, density_figures, memory_mib, size_arguments, summary, wait_gone, write_json  # noqa: E402

START_TIMEOUT = 60.0


def job_info(behaviour: str) -> RunningJobInfo:
    job_id = "AJ_" + uuid.uuid4().hex[:12]
    return RunningJobInfo(
        accept_arguments=JobAcceptArguments(name="bench", identity=f"agent-{job_id}", metadata=""),
        job=agent.Job(id=job_id, type=agent.JobType.JT_ROOM, room=models.Room(name=f"room-{job_id}"),
                      metadata=behaviour),
        url="ws://127.0.0.1:1", token="unused", worker_id="bench", fake_job=False,
    )


class Anchor:
    def __init__(self, marks: Marks) -> None:
        self.marks = marks
        self.mp_ctx = mp.get_context("forkserver")
        self.mp_ctx.set_forkserver_preload(["livekit.agents.ipc._preload", "livekit.agents.ipc._preload_freeze"])

    async def pool(self, idle: int, close_timeout: float = SHUTDOWN_BUDGET) -> ProcPool:
        pool = ProcPool(
            initialize_process_fnc=anchor_agents.prewarm, job_entrypoint_fnc=anchor_agents.entrypoint,
            session_end_fnc=None, simulation_end_fnc=None, num_idle_processes=idle, initialize_timeout=10.0,
            close_timeout=close_timeout, session_end_timeout=close_timeout, inference_executor=None,
            job_executor_type=JobExecutorType.PROCESS, mp_ctx=self.mp_ctx, memory_warn_mb=0, memory_limit_mb=0,
            http_proxy=None, loop=asyncio.get_running_loop())
        await pool.start()
        return pool

    async def wait_idle(self, pool: ProcPool, count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while pool._warmed_proc_queue.qsize() < count:  # the pool's own count of ready processes
            if time.monotonic() > deadline:
                raise TimeoutError("idle processes did not become ready")
            await asyncio.sleep(0.005)

    async def close_jobs(self, pool: ProcPool, job_ids: list[str]) -> None:
        procs = [p for p in (pool.get_by_job_id(j) for j in job_ids) if p is not None]
        await asyncio.gather(*(p.aclose() for p in procs), return_exceptions=True)

    async def start_latencies(self, pool: ProcPool, runs: int, *, warm: bool) -> list[float]:
        latencies = []
        for _ in range(runs):
            if warm:
                await self.wait_idle(pool, 1)
            info = job_info("idle")
            began = time.time()
            await pool.launch_job(info)
            found = await asyncio.to_thread(self.marks.wait, [(info.job.id, "start")], START_TIMEOUT)
            latencies.append(found[(info.job.id, "start")][0] - began)
            await self.close_jobs(pool, [info.job.id])
        return latencies

    async def burst(self, pool: ProcPool, size: int, idle: int = DEFAULT_POOL) -> tuple[list[float], float]:
        await self.wait_idle(pool, idle)
        infos = [job_info("idle") for _ in range(size)]
        began = time.time()
        await asyncio.gather(*(pool.launch_job(i) for i in infos))
        found = await asyncio.to_thread(self.marks.wait, [(i.job.id, "start") for i in infos], START_TIMEOUT)
        latencies = [found[(i.job.id, "start")][0] - began for i in infos]
        await self.close_jobs(pool, [i.job.id for i in infos])
        return latencies, max(latencies)

    async def shutdown_times(self, behaviour: str, count: int) -> list[float | None]:
        pool = await self.pool(DEFAULT_POOL)
        infos = [job_info(behaviour) for _ in range(count)]
        await asyncio.gather(*(pool.launch_job(i) for i in infos))
        found = await asyncio.to_thread(self.marks.wait, [(i.job.id, "start") for i in infos], START_TIMEOUT)
        pids = [found[(i.job.id, "start")][1] for i in infos]
        procs = [pool.get_by_job_id(i.job.id) for i in infos]
        began = time.time()
        closing = [asyncio.ensure_future(p.aclose()) for p in procs if p is not None]
        gone = await asyncio.to_thread(wait_gone, pids, began, SHUTDOWN_CAP)
        for task in closing:
            task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)
        await self._close_pool(pool)
        return [gone[p] for p in pids]

    async def crash_detection(self, pool: ProcPool, runs: int) -> list[float]:
        detections = []
        for _ in range(runs):
            info = job_info("crash")
            await pool.launch_job(info)
            proc = pool.get_by_job_id(info.job.id)
            assert proc is not None
            while proc.status != JobStatus.FAILED:  # how the pool records a crashed job
                await asyncio.sleep(0.0005)
            recorded = time.time()
            found = self.marks.read()
            detections.append(recorded - found[(info.job.id, "crash")][0])
        return detections

    async def density(self, pool: ProcPool, count: int) -> dict[str, Any]:
        infos = [job_info("idle") for _ in range(count)]
        for info in infos:
            await pool.launch_job(info)
        found = await asyncio.to_thread(self.marks.wait, [(i.job.id, "start") for i in infos], START_TIMEOUT)
        await asyncio.sleep(MEMORY_SETTLE_SECONDS)  # measured once the processes are idle
        memory = [memory_mib(found[(i.job.id, "start")][1]) for i in infos]
        await self.close_jobs(pool, [i.job.id for i in infos])
        return density_figures(memory)

    async def submissions_per_second(self, pool: ProcPool, count: int) -> float:
        await self.wait_idle(pool, count)
        infos = [job_info("idle") for _ in range(count)]
        began = time.time()
        for info in infos:
            await pool.launch_job(info)
        found = await asyncio.to_thread(self.marks.wait, [(i.job.id, "start") for i in infos], START_TIMEOUT)
        elapsed = max(found[(i.job.id, "start")][0] for i in infos) - began
        await self.close_jobs(pool, [i.job.id for i in infos])
        return count / elapsed

    async def _close_pool(self, pool: ProcPool) -> None:
        try:
            await asyncio.wait_for(pool.aclose(), SHUTDOWN_CAP)
        except asyncio.TimeoutError:
            for proc in pool.processes:
                if proc.pid is not None:
                    try:
                        os.kill(proc.pid, 9)
                    except ProcessLookupError:
                        pass


async def run(args: argparse.Namespace) -> dict[str, Any]:
    marks = Marks(Path(os.environ[MARKS_ENV]))
    anchor = Anchor(marks)
    figures: dict[str, Any] = {}

    pool = await anchor.pool(1)
    figures["warm_start"] = summary(await anchor.start_latencies(pool, args.runs, warm=True))
    await anchor._close_pool(pool)

    pool = await anchor.pool(0)
    figures["cold_start"] = summary(await anchor.start_latencies(pool, args.runs, warm=False))
    await anchor._close_pool(pool)

    pool = await anchor.pool(DEFAULT_POOL)  # livekit-agents' default, and the pool of every side for this row
    latencies, all_running = [], []
    for _ in range(args.bursts):
        burst, last = await anchor.burst(pool, args.burst_size)
        latencies += burst
        all_running.append(last)
    figures["burst"] = {"start": summary(latencies), "all_running": summary(all_running),
                        "size": args.burst_size, "idle": DEFAULT_POOL}
    figures["crash_detection"] = summary(await anchor.crash_detection(pool, args.runs))
    await anchor._close_pool(pool)

    pool = await anchor.pool(args.burst_size)  # a pool sized for the burst
    latencies = []
    for _ in range(args.bursts):
        latencies += (await anchor.burst(pool, args.burst_size, idle=args.burst_size))[0]
    figures["burst_sized_pool"] = {"start": summary(latencies), "idle": args.burst_size}
    figures["submissions_per_second"] = await anchor.submissions_per_second(pool, args.burst_size)
    await anchor._close_pool(pool)

    pool = await anchor.pool(DEFAULT_POOL)
    figures["density"] = await anchor.density(pool, args.density_jobs)
    await anchor._close_pool(pool)

    figures["shutdown"] = {b: summary(await anchor.shutdown_times(b, args.shutdown_jobs)) for b in BEHAVIOURS}
    figures["status_queries_per_second"] = None  # LiveKit Agents has no job status API
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    size_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    figures = asyncio.run(run(args))
    import livekit.agents

    write_json(args.out, {"system": f"livekit-agents {livekit.agents.__version__}", "figures": figures,
                          "versions": {"livekit_agents": livekit.agents.__version__,
                                       "livekit_agents_python": platform.python_version()}})


if __name__ == "__main__":
    main()
