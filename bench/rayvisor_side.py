"""rayvisor's side of the benchmark: the same figures, through the public client API.

Runs in the project's environment with a local Ray started here (as ``rayvisor dev``
does); each figure gets its own supervisor namespace so pools and jobs never mix.
Writes one JSON object (the figures) to the ``--out`` file.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

from ray_side import START_TIMEOUT, local_ray  # before ray: it sets the environment Ray reads

import ray

import rayvisor
import rayvisor_agents
from common import DEFAULT_POOL, MEMORY_SETTLE_SECONDS, BEHAVIOURS, MARKS_ENV, SHUTDOWN_BUDGET, SHUTDOWN_CAP, Marks, density_figures, memory_mib, size_arguments, summary, wait_gone, write_json
from rayvisor import JobSpec, JobState


class Rayvisor:
    def __init__(self, marks: Marks) -> None:
        self.marks = marks
        self._namespaces = 0

    def serve(self, **options: Any) -> rayvisor.Client:
        self._namespaces += 1
        opts = rayvisor.WorkerOptions(entrypoint_fnc=rayvisor_agents.entrypoint, ws_url="", api_key="",
                                      api_secret="", shutdown_process_timeout=SHUTDOWN_BUDGET, **options)
        return rayvisor.serve(opts, namespace=f"bench-{self._namespaces}", log_format="text")

    def wait_idle(self, client: rayvisor.Client, count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            idle = sum(v for k, v in client.metrics().gauges.items() if k.startswith("rayvisor_idle_actors"))
            if idle >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("idle actors did not become ready")
            time.sleep(0.005)

    def submit(self, client: rayvisor.Client, behaviour: str) -> str:
        return client.submit(JobSpec(room=f"room-{time.monotonic_ns()}", metadata=behaviour))

    def close_jobs(self, client: rayvisor.Client, job_ids: list[str]) -> None:
        for job_id in job_ids:
            client.shutdown(job_id)
        for job_id in job_ids:
            client.wait(job_id, timeout=SHUTDOWN_CAP)

    def start_latencies(self, client: rayvisor.Client, runs: int, *, warm: bool) -> list[float]:
        latencies = []
        for _ in range(runs):
            if warm:
                self.wait_idle(client, 1)
            began = time.time()
            job_id = self.submit(client, "idle")
            found = self.marks.wait([(job_id, "start")], START_TIMEOUT)
            latencies.append(found[(job_id, "start")][0] - began)
            self.close_jobs(client, [job_id])
        return latencies

    def burst(self, client: rayvisor.Client, size: int, idle: int) -> tuple[list[float], float]:
        self.wait_idle(client, idle)
        ids: list[str] = []
        began = time.time()
        # At once: one thread per submit, as independent callers would.
        threads = [threading.Thread(target=lambda: ids.append(self.submit(client, "idle"))) for _ in range(size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        found = self.marks.wait([(j, "start") for j in ids], START_TIMEOUT)
        latencies = [found[(j, "start")][0] - began for j in ids]
        self.close_jobs(client, ids)
        return latencies, max(latencies)

    def shutdown_times(self, behaviour: str, count: int) -> list[float | None]:
        client = self.serve()
        ids = [self.submit(client, behaviour) for _ in range(count)]
        found = self.marks.wait([(j, "start") for j in ids], START_TIMEOUT)
        pids = [found[(j, "start")][1] for j in ids]
        began = time.time()
        asked = {}
        for job_id, pid in zip(ids, pids):  # one call each: every job's time runs from its own request
            asked[pid] = time.time()
            client.shutdown(job_id)
        gone = wait_gone(pids, began, SHUTDOWN_CAP)
        client.stop(timeout=SHUTDOWN_CAP)
        return [None if gone[p] is None else gone[p] - (asked[p] - began) for p in pids]

    def crash_detection(self, client: rayvisor.Client, runs: int) -> list[float]:
        detections = []
        for _ in range(runs):
            job_id = self.submit(client, "crash")
            info = client.wait(job_id, timeout=START_TIMEOUT)
            assert info.state == JobState.FAILED, info
            crashed = self.marks.read()[(job_id, "crash")][0]
            detections.append(info.entered(JobState.FAILED) - crashed)  # when the supervisor recorded it
        return detections

    def density(self, client: rayvisor.Client, count: int) -> tuple[dict[str, Any], list[str]]:
        ids = [self.submit(client, "idle") for _ in range(count)]
        found = self.marks.wait([(j, "start") for j in ids], START_TIMEOUT)
        time.sleep(MEMORY_SETTLE_SECONDS)  # measured once the processes are idle
        memory = [memory_mib(found[(j, "start")][1]) for j in ids]
        return density_figures(memory), ids

    def status_queries_per_second(self, client: rayvisor.Client, job_ids: list[str], seconds: float) -> float:
        done, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            client.status(job_ids[done % len(job_ids)])
            done += 1
        return done / seconds

    def submissions_per_second(self, client: rayvisor.Client, count: int) -> float:
        self.wait_idle(client, count)
        began = time.time()
        ids = [self.submit(client, "idle") for _ in range(count)]
        found = self.marks.wait([(j, "start") for j in ids], START_TIMEOUT)
        elapsed = max(found[(j, "start")][0] for j in ids) - began
        self.close_jobs(client, ids)
        return count / elapsed


def run(args: argparse.Namespace) -> dict[str, Any]:
    marks = Marks(Path(os.environ[MARKS_ENV]))
    bench = Rayvisor(marks)
    figures: dict[str, Any] = {}
    with local_ray():
        client = bench.serve(num_idle_actors=1, max_idle_actors=1)
        figures["warm_start"] = summary(bench.start_latencies(client, args.runs, warm=True))
        client.stop()

        client = bench.serve(num_idle_actors=0, max_idle_actors=0)
        figures["cold_start"] = summary(bench.start_latencies(client, args.runs, warm=False))
        client.stop()

        # LiveKit Agents' default pool, fixed as theirs is (rayvisor's own default adapts from 1 to 4)
        client = bench.serve(num_idle_actors=DEFAULT_POOL, max_idle_actors=DEFAULT_POOL)
        latencies, all_running = [], []
        for _ in range(args.bursts):
            burst, last = bench.burst(client, args.burst_size, idle=DEFAULT_POOL)
            latencies += burst
            all_running.append(last)
        figures["burst"] = {"start": summary(latencies), "all_running": summary(all_running),
                            "size": args.burst_size, "idle": DEFAULT_POOL}
        figures["crash_detection"] = summary(bench.crash_detection(client, args.runs))
        client.stop()

        client = bench.serve(num_idle_actors=args.burst_size, max_idle_actors=args.burst_size)  # sized for the burst
        latencies = []
        for _ in range(args.bursts):
            latencies += bench.burst(client, args.burst_size, idle=args.burst_size)[0]
        figures["burst_sized_pool"] = {"start": summary(latencies), "idle": args.burst_size}
        figures["submissions_per_second"] = bench.submissions_per_second(client, args.burst_size)
        client.stop()

        client = bench.serve()
        figures["density"], running = bench.density(client, args.density_jobs)
        more = [bench.submit(client, "idle") for _ in range(max(0, args.control_jobs - len(running)))]
        marks.wait([(j, "start") for j in more], START_TIMEOUT * 2)
        figures["status_queries_per_second"] = bench.status_queries_per_second(client, running + more, args.query_seconds)
        figures["status_queries_while_running"] = len(running) + len(more)
        bench.close_jobs(client, running + more)
        client.stop()

        figures["shutdown"] = {b: summary(bench.shutdown_times(b, args.shutdown_jobs)) for b in BEHAVIOURS}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    size_arguments(parser)
    parser.add_argument("--control-jobs", type=int, default=100)
    parser.add_argument("--query-seconds", type=float, default=3.0)
    args = parser.parse_args()
    figures = run(args)
    write_json(args.out, {"system": f"rayvisor {rayvisor.__version__} (ray {ray.__version__})", "figures": figures,
                          "versions": {"rayvisor": rayvisor.__version__, "ray": ray.__version__}})


if __name__ == "__main__":
    main()
