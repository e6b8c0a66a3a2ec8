"""Across a Ray cluster (``ray.cluster_utils.Cluster``: a head and worker nodes that
advertise ``rayvisor_slot``): placement, capacity, scale-out and node loss."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import ray
from support import ray_cluster, wait_until

import rayvisor
from rayvisor import Cause, JobContext, JobState
from rayvisor.errors import AtCapacity

SLOTS_PER_NODE = 2
NODE_LOSS_BOUND = 1.1 + 1.0
"""Ray declares a crashed node dead ~1.1 s after it stops (support.FAST_NODE_FAILURE_DETECTION); rayvisor
then records its jobs node_lost at once. One second of margin for this 2-core machine."""


async def waits_in_its_room(ctx: JobContext) -> None:
    await ctx.connect()


@pytest.fixture(scope="module")
def cluster():
    """Swap the session's single-node Ray for a 1-head + 2-worker cluster, and back."""
    with ray_cluster(worker_nodes=2, node_args={"num_cpus": 1, "resources": {"rayvisor_slot": SLOTS_PER_NODE},
                                                "object_store_memory": 80_000_000}) as cluster:
        yield cluster


def worker_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("rayvisor_slot")}


def running_jobs(client, count: int) -> list:
    try:
        return wait_until(lambda: (infos := [i for i in client.list() if i.state == JobState.RUNNING])
                          and len(infos) == count and infos, timeout=60, interval=0.05)
    except AssertionError:
        raise AssertionError(f"not {count} running: {[(i.id, i.state, i.cause, i.error) for i in client.list()]}")


def test_jobs_spread_over_the_slots_of_the_worker_nodes_and_capacity_is_their_sum(cluster, serve):
    client = serve(waits_in_its_room, end_when="never")
    for i in range(2 * SLOTS_PER_NODE):
        client.submit(room=f"spread-{i}")
    with pytest.raises(AtCapacity, match="rayvisor_slot"):
        client.submit(room="one-too-many")

    infos = running_jobs(client, 2 * SLOTS_PER_NODE)
    per_node = Counter(i.node_id for i in infos)
    assert set(per_node) == worker_nodes() and set(per_node.values()) == {SLOTS_PER_NODE}
    head = ray.get_runtime_context().get_node_id()
    assert head not in per_node  # the head advertises no slot: the control plane stays alone there


def test_adding_a_node_raises_capacity_without_restarting_anything(cluster, serve):
    client = serve(waits_in_its_room, end_when="never")
    first = [client.submit(room=f"before-{i}") for i in range(2 * SLOTS_PER_NODE)]
    with pytest.raises(AtCapacity):
        client.submit(room="waiting-for-a-node")
    pids = {i.id: i.pid for i in running_jobs(client, len(first))}

    new_node = cluster.add_node(num_cpus=1, resources={"rayvisor_slot": SLOTS_PER_NODE},
                                object_store_memory=80_000_000)
    try:
        wait_until(lambda: ray.cluster_resources().get("rayvisor_slot") == 3 * SLOTS_PER_NODE, timeout=30)
        later = [client.submit(room=f"after-{i}") for i in range(SLOTS_PER_NODE)]
        infos = {i.id: i for i in running_jobs(client, len(first) + len(later))}
        assert {infos[j].node_id for j in later} == {new_node.node_id}
        assert all(infos[j].pid == pids[j] and infos[j].restarts == 0 for j in first)
    finally:
        for job_id in [i.id for i in client.list()]:
            client.shutdown(job_id)
        for job_id in [i.id for i in client.list()]:
            client.wait(job_id, timeout=30)
        cluster.remove_node(new_node)


def test_a_lost_node_ends_its_jobs_as_node_lost_and_transient_ones_restart_elsewhere(cluster, serve):
    client = serve(waits_in_its_room, end_when="never", restart="transient")
    spare = cluster.add_node(num_cpus=1, resources={"rayvisor_slot": SLOTS_PER_NODE}, object_store_memory=80_000_000)
    wait_until(lambda: ray.cluster_resources().get("rayvisor_slot") == 3 * SLOTS_PER_NODE, timeout=30)
    temporary = client.submit(rayvisor.JobSpec(room="temporary-job", restart="temporary"))
    transient = [client.submit(room=f"transient-{i}") for i in range(SLOTS_PER_NODE - 1)]
    infos = {i.id: i for i in running_jobs(client, SLOTS_PER_NODE)}
    doomed_node = infos[temporary].node_id
    on_doomed = [j for j, i in infos.items() if i.node_id == doomed_node]
    victim = next(n for n in cluster.worker_nodes if n.node_id == doomed_node)

    lost_at = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)

    ended = client.wait(temporary, timeout=30)
    assert (ended.state, ended.cause) == (JobState.FAILED, Cause.NODE_LOST)
    assert time.monotonic() - lost_at < NODE_LOSS_BOUND + 5  # Ray's detection + rayvisor's reaction
    assert ended.entered(JobState.FAILED) - (time.time() - (time.monotonic() - lost_at)) < NODE_LOSS_BOUND
    for job_id in on_doomed:
        if job_id == temporary:
            continue
        info = wait_until(lambda: (i := client.status(job_id)).state == JobState.RUNNING and i.restarts == 1 and i,
                          timeout=60)
        assert info.node_id != doomed_node and info.attempts[0].cause == Cause.NODE_LOST
    assert not any(i.state == JobState.RUNNING and i.node_id == doomed_node for i in client.list())
    for job_id in [i.id for i in client.list() if not i.state.is_terminal]:
        client.shutdown(job_id)
        client.wait(job_id, timeout=30)
    if victim is spare:  # leave two slot nodes for the next test, as the module started
        return
    # the spare now stands in for the lost original node


def test_with_allow_pending_a_job_past_capacity_waits_then_is_rejected_for_no_capacity(cluster, serve):
    client = serve(waits_in_its_room, end_when="never", allow_pending=True, pending_timeout=8)
    placed = [client.submit(room=f"full-{i}") for i in range(2 * SLOTS_PER_NODE)]
    running_jobs(client, len(placed))

    waiting = client.submit(room="waits-for-a-node")  # no AtCapacity: the autoscaler's cue

    info = client.wait(waiting, timeout=30)
    assert (info.state, info.cause) == (JobState.REJECTED, Cause.NO_CAPACITY)
    assert all(client.status(j).state == JobState.RUNNING for j in placed)
