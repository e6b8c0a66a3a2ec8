"""Load: fill the supervisor to capacity, hold, shut everything down, again and again.
Its footprint comes back each time: no per-job leak beyond the bounded history of
finished records (``finished_job_history``), and ``status`` keeps answering at once."""

from __future__ import annotations

import os
import statistics
import time

from support import wait_until

from rayvisor import JobState
from rayvisor.errors import AtCapacity

CAPACITY = 8
HISTORY = 5
CYCLES = int(os.environ.get("RAYVISOR_LOAD_CYCLES", "2"))
"""Measured fill-hold-empty cycles; a soak sets ``RAYVISOR_LOAD_CYCLES=25`` (RELIABILITY.md)."""
RSS_GROWTH_ALLOWED = 16 * 1024 * 1024
"""Bytes the supervisor's RSS may grow over the measured cycles (allocator noise, not jobs:
a per-job leak of records, snapshots or tasks shows in the counts, which must be exact)."""


async def stays(ctx) -> None:
    await ctx.connect()


def footprint(client) -> dict[str, float]:
    """Read once the warm pool has settled: a prewarm in flight is a task of its own."""
    wait_until(lambda: client.metrics().gauges.get("rayvisor_prewarming_actors|agent=") == 0, timeout=30)
    gauges = client.metrics().gauges
    return {name: gauges[name] for name in (
        "rayvisor_supervisor_rss_bytes", "rayvisor_job_records", "rayvisor_stored_job_snapshots",
        "rayvisor_supervisor_tasks")}


def fill_hold_and_empty(client, cycle: int) -> list[float]:
    """Submit until ``AtCapacity``, wait for all to run, time ``status`` calls, shut all down."""
    job_ids: list[str] = []
    while True:
        try:
            job_ids.append(client.submit(room=f"load-{cycle}-{len(job_ids)}"))
        except AtCapacity:
            break
    assert len(job_ids) == CAPACITY
    for job_id in job_ids:
        client.wait_for_state(job_id, JobState.RUNNING, timeout=60)
    latencies = []
    for _ in range(5):
        for job_id in job_ids:
            asked = time.perf_counter()
            assert client.status(job_id).state == JobState.RUNNING
            latencies.append(time.perf_counter() - asked)
    for job_id in job_ids:  # one at a time: with a history of 5, older finished records are dropped
        client.shutdown(job_id, reason="load cycle over")
        assert client.wait(job_id, timeout=30).state == JobState.SUCCEEDED
    return latencies


def test_capacity_cycles_leave_only_the_bounded_history_and_status_stays_fast(serve):
    client = serve(stays, max_jobs=CAPACITY, end_when="never", finished_job_history=HISTORY, event_history=100)
    fill_hold_and_empty(client, cycle=0)  # first use: imports, caches and pools are not a leak
    baseline = footprint(client)

    latencies = [t for cycle in range(1, CYCLES + 1) for t in fill_hold_and_empty(client, cycle)]

    after = footprint(client)
    assert after["rayvisor_job_records"] == HISTORY == baseline["rayvisor_job_records"]
    assert after["rayvisor_stored_job_snapshots"] == HISTORY  # evicted records leave Ray's KV too
    assert after["rayvisor_supervisor_tasks"] == baseline["rayvisor_supervisor_tasks"]  # no task per job left
    growth = after["rayvisor_supervisor_rss_bytes"] - baseline["rayvisor_supervisor_rss_bytes"]
    assert growth < RSS_GROWTH_ALLOWED, f"RSS grew {growth / 2**20:.1f} MiB over {CYCLES * CAPACITY} jobs"
    assert len(client.list()) == HISTORY
    # "At once": well inside control_call_timeout; the figures themselves are in RELIABILITY.md.
    print(f"status p50 {statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms, "
          f"RSS growth {growth / 2**20:.1f} MiB")
    assert max(latencies) < 1.0
