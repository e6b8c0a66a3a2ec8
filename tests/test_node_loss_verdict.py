"""A crashed node whose death Ray declares late: its jobs still end ``node_lost``.

Calls to an actor on a crashed node fail at once ("temporarily unavailable"), while Ray
declares the node dead only after its health checks fail (~15 s with Ray's defaults). The
supervisor records the failure at once as ``actor_crashed`` (a crash is never held back by
a verdict), and corrects it to ``node_lost`` when Ray's verdict on the node arrives."""

from __future__ import annotations

import time

import pytest
import ray
from support import ray_cluster, wait_until

from rayvisor import Cause, JobContext, JobState

RAY_WAIT_FOR_DEATH_INFO = 1.0
"""How long (s) a failed actor call waits for Ray's death info before it raises
``ActorUnavailableError`` instead (Ray's ``timeout_ms_task_wait_for_death_info``)."""

SLOW_NODE_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "8",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_initial_delay_ms": "0",
}
"""A crashed node is declared dead ~4 s after it stops: well after its actors' calls fail."""


async def waits_in_its_room(ctx: JobContext) -> None:
    await ctx.connect()


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(worker_nodes=2, node_args={"num_cpus": 1, "resources": {"rayvisor_slot": 1},
                                                "object_store_memory": 80_000_000},
                     failure_detection=SLOW_NODE_FAILURE_DETECTION) as cluster:
        yield cluster


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def test_a_job_on_a_node_ray_declares_dead_late_ends_node_lost_not_actor_crashed(cluster, serve):
    client = serve(waits_in_its_room, end_when="never", restart="temporary")
    jobs = [client.submit(room=f"late-verdict-{i}") for i in range(2)]
    infos = [wait_until(lambda j=j: (i := client.status(j)).state == JobState.RUNNING and i, timeout=60) for j in jobs]
    doomed, survivor = infos
    victim = next(n for n in cluster.worker_nodes if n.node_id == doomed.node_id)

    lost_at = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)
    declared_dead_after = wait_until(lambda: not node_alive(doomed.node_id) and time.monotonic() - lost_at,
                                     timeout=60, interval=0.05)

    assert declared_dead_after > RAY_WAIT_FOR_DEATH_INFO  # the premise: the job's calls failed before Ray decided
    corrected = wait_until(lambda: (i := client.status(doomed.id)).cause == Cause.NODE_LOST and i, timeout=60)
    assert corrected.state == JobState.FAILED and corrected.attempts[0].cause == Cause.NODE_LOST
    ends = [(e.state, e.cause) for e in client.events() if e.job_id == doomed.id and e.state == JobState.FAILED]
    assert ends == [(JobState.FAILED, Cause.ACTOR_CRASHED), (JobState.FAILED, Cause.NODE_LOST)]
    counters = client.metrics().counters
    assert counters.get("rayvisor_jobs_ended|cause=node_lost|state=FAILED") == 1
    assert not counters.get("rayvisor_jobs_ended|cause=actor_crashed|state=FAILED")
    assert counters.get("rayvisor_job_cause_corrections|now=node_lost|was=actor_crashed") == 1
    assert client.status(survivor.id).state == JobState.RUNNING  # the other node's job is untouched
    client.shutdown(survivor.id)
    assert client.wait(survivor.id, timeout=30).cause == Cause.USER_SHUTDOWN
