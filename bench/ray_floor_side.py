"""The Ray floor: the same figures done by bare Ray, with the least a supervised job needs.

A client (this driver) calls one async "supervisor" actor, which calls one job actor per
job (``num_cpus=0``). Nothing else: no job records, no snapshots, no restarts, no
shutdown budget. A pool is job actors created and called once ahead of the job, then idle;
a job takes one if there is one, else the supervisor creates a fresh actor. The job actor
runs ``common.run_behaviour``, so its marks are the other sides' marks. Any design that puts
a job in a Ray actor behind a supervisor actor pays at least this, on this machine.
Writes one JSON object (the figures) to the ``--out`` file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ray_side import START_TIMEOUT, local_ray  # before ray: it sets the environment Ray reads

import ray
from ray.actor import ActorHandle

import common
from common import DEFAULT_POOL, MARKS_ENV, MEMORY_SETTLE_SECONDS, SHUTDOWN_CAP, Marks, density_figures, memory_mib, size_arguments, summary, wait_gone, write_json


@ray.remote(num_cpus=0)
class JobActor:
    """One job: ``ready`` is the pool's call ahead of a job, ``run`` is the job's entrypoint."""

    def ready(self) -> int:
        return os.getpid()

    async def run(self, job_id: str, behaviour: str) -> None:
        ctx = SimpleNamespace(job=SimpleNamespace(id=job_id, metadata=behaviour), add_shutdown_callback=lambda _: None)
        await common.run_behaviour(ctx)


@ray.remote(num_cpus=0)
class Supervisor:
    """Hands each job to an idle job actor (or a fresh one) and watches its call."""

    def __init__(self) -> None:
        self.idle: list[tuple[ActorHandle, int]] = []
        self.jobs: dict[str, ActorHandle] = {}
        self.outcomes: dict[str, asyncio.Task[tuple[str, float]]] = {}

    async def prewarm(self, count: int) -> None:
        """Create job actors and call each once, until ``count`` are idle."""
        fresh = [JobActor.remote() for _ in range(count - len(self.idle))]
        pids = await asyncio.gather(*(actor.ready.remote() for actor in fresh))
        self.idle += zip(fresh, pids)

    async def submit(self, job_id: str, behaviour: str) -> None:
        """Start the job and return (the caller does not wait for the entrypoint)."""
        actor = self.idle.pop()[0] if self.idle else JobActor.remote()
        self.jobs[job_id] = actor
        self.outcomes[job_id] = asyncio.ensure_future(self._watch(actor.run.remote(job_id, behaviour)))

    async def _watch(self, call: ray.ObjectRef) -> tuple[str, float]:
        """How the job's call ended, and when this actor learnt it (``time.time()``)."""
        try:
            await call
        except ray.exceptions.RayActorError:
            return "crashed", time.time()
        return "returned", time.time()

    async def outcome(self, job_id: str) -> tuple[str, float]:
        return await self.outcomes[job_id]

    async def close(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            ray.kill(self.jobs.pop(job_id))
            self.outcomes.pop(job_id).cancel()

    async def stop(self) -> list[int]:
        """Kill the idle actors; their pids, so the caller can wait for them to be gone."""
        for actor, _ in self.idle:
            ray.kill(actor)
        pids = [pid for _, pid in self.idle]
        self.idle.clear()
        return pids


class Floor:
    def __init__(self, marks: Marks) -> None:
        self.marks = marks
        self.supervisor = Supervisor.remote()

    def prewarm(self, count: int) -> None:
        ray.get(self.supervisor.prewarm.remote(count), timeout=START_TIMEOUT)

    def submit(self, behaviour: str) -> str:
        job_id = "FJ_" + uuid.uuid4().hex[:12]
        ray.get(self.supervisor.submit.remote(job_id, behaviour))
        return job_id

    def close_jobs(self, job_ids: list[str], found: dict[tuple[str, str], tuple[float, int]]) -> None:
        """Kill the jobs' actors and wait until their processes are gone (as the other sides do)."""
        ray.get(self.supervisor.close.remote(job_ids))
        wait_gone([found[(j, "start")][1] for j in job_ids], time.time(), SHUTDOWN_CAP)

    def start_latencies(self, runs: int, *, pool: int) -> list[float]:
        latencies = []
        for _ in range(runs):
            self.prewarm(pool)
            began = time.time()
            job_id = self.submit("idle")
            found = self.marks.wait([(job_id, "start")], START_TIMEOUT)
            latencies.append(found[(job_id, "start")][0] - began)
            self.close_jobs([job_id], found)
        return latencies

    def burst(self, size: int, pool: int) -> tuple[list[float], float]:
        self.prewarm(pool)
        ids = ["FJ_" + uuid.uuid4().hex[:12] for _ in range(size)]
        began = time.time()
        ray.get([self.supervisor.submit.remote(j, "idle") for j in ids])  # all sent at once
        found = self.marks.wait([(j, "start") for j in ids], START_TIMEOUT)
        latencies = [found[(j, "start")][0] - began for j in ids]
        self.close_jobs(ids, found)
        return latencies, max(latencies)

    def bursts(self, count: int, size: int, pool: int) -> dict[str, Any]:
        latencies: list[float] = []
        all_running = []
        for _ in range(count):
            burst, last = self.burst(size, pool)
            latencies += burst
            all_running.append(last)
        return {"start": summary(latencies), "all_running": summary(all_running), "size": size, "idle": pool}

    def crash_detection(self, runs: int) -> list[float]:
        detections = []
        for _ in range(runs):
            job_id = self.submit("crash")
            ended, detected = ray.get(self.supervisor.outcome.remote(job_id), timeout=START_TIMEOUT)
            assert ended == "crashed", ended
            crashed = self.marks.read()[(job_id, "crash")][0]
            detections.append(detected - crashed)  # when the supervisor actor's call raised
            ray.get(self.supervisor.close.remote([job_id]))
        return detections

    def density(self, count: int, pool: int) -> dict[str, Any]:
        self.prewarm(pool)
        ids = [self.submit("idle") for _ in range(count)]
        found = self.marks.wait([(j, "start") for j in ids], START_TIMEOUT)
        time.sleep(MEMORY_SETTLE_SECONDS)  # measured once the processes are idle
        memory = [memory_mib(found[(j, "start")][1]) for j in ids]
        self.close_jobs(ids, found)
        return density_figures(memory)

    def submissions_per_second(self, count: int) -> float:
        self.prewarm(count)
        began = time.time()
        ids = [self.submit("idle") for _ in range(count)]
        found = self.marks.wait([(j, "start") for j in ids], START_TIMEOUT)
        elapsed = max(found[(j, "start")][0] for j in ids) - began
        self.close_jobs(ids, found)
        return count / elapsed

    def stop(self) -> None:
        wait_gone(ray.get(self.supervisor.stop.remote()), time.time(), SHUTDOWN_CAP)
        ray.kill(self.supervisor)


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with local_ray():
        floor = Floor(Marks(Path(os.environ[MARKS_ENV])))
        floor.prewarm(0)  # the supervisor actor is up before anything is timed
        # Each figure with the other sides' pool: 1 for warm starts, none for cold ones,
        # LiveKit Agents' default for the burst, 20 for the sized burst and submissions.
        figures["warm_start"] = summary(floor.start_latencies(args.runs, pool=1))
        figures["cold_start"] = summary(floor.start_latencies(args.runs, pool=0))
        figures["burst"] = floor.bursts(args.bursts, args.burst_size, DEFAULT_POOL)
        figures["crash_detection"] = summary(floor.crash_detection(args.runs))
        figures["burst_sized_pool"] = floor.bursts(args.bursts, args.burst_size, args.burst_size)
        figures["submissions_per_second"] = floor.submissions_per_second(args.burst_size)
        figures["density"] = floor.density(args.density_jobs, DEFAULT_POOL)
        floor.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    size_arguments(parser)
    args = parser.parse_args()
    figures = run(args)
    write_json(args.out, {"system": f"bare ray {ray.__version__}", "figures": figures,
                          "versions": {"ray": ray.__version__}})


if __name__ == "__main__":
    main()
