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


@pytest.fixture(autouse=True)
def added_nodes_removed(cluster):
    """Each test starts on the module's two slot nodes, whatever the one before added."""
    module_nodes = set(cluster.worker_nodes)
    yield
    for node in set(cluster.worker_nodes) - module_nodes:
        cluster.remove_node(node)


def worker_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("rayvisor_slot")}


def running_jobs(client, count: int) -> list:
    try:
        return wait_until(lambda: (infos := [i for i in client.list() if i.state == JobState.RUNNING])
                          and len(infos) == count and infos, timeout=60, interval=0.05)
    except AssertionError:
        raise AssertionError(f"not {count} running: {[(i.id, i.state, i.cause, i.error) for i in client.list()]}")


def idle_actor_nodes(client, namespace: str) -> list[str]:
    """The nodes of the warm pool's live actors that no job has taken (from Ray's actor table;
    an actor keeps its ``idle-`` name when a job takes it)."""
    import ray._private.state as ray_state

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == namespace and a["name"].startswith("rayvisor-job-idle-")}
    job_pids = {i.pid for i in client.list() if not i.state.is_terminal}
    return [a["Address"]["NodeID"] for a in ray_state.actors().values()
            if a["State"] == "ALIVE" and a["Name"] in names and a["Pid"] not in job_pids]


def add_slot_node(cluster):
    node = cluster.add_node(num_cpus=1, resources={"rayvisor_slot": SLOTS_PER_NODE}, object_store_memory=80_000_000)
    wait_until(lambda: node.node_id in worker_nodes(), timeout=30)
    return node


def shut_down_every_job(client) -> None:
    for job_id in [i.id for i in client.list() if not i.state.is_terminal]:
        client.shutdown(job_id)
    for job_id in [i.id for i in client.list()]:
        client.wait(job_id, timeout=30)


def test_with_default_options_every_slot_runs_a_job_and_the_next_one_is_at_capacity(cluster, serve, rooms, namespace):
    """The warm pool (on by default) holds slots only on loan: four jobs, one after another,
    each in its own room with a participant, take all four slots; the fifth is refused."""
    client = serve(waits_in_its_room)  # every WorkerOptions default: num_idle_actors=1, max_idle_actors=4
    wait_until(lambda: idle_actor_nodes(client, namespace), timeout=30)  # the pool holds a slot before any job
    for i in range(2 * SLOTS_PER_NODE):
        rooms.join(f"spread-{i}", "user")
        client.submit(room=f"spread-{i}")
    with pytest.raises(AtCapacity, match="rayvisor_slot"):
        client.submit(room="one-too-many")

    infos = running_jobs(client, 2 * SLOTS_PER_NODE)
    per_node = Counter(i.node_id for i in infos)
    assert set(per_node) == worker_nodes() and set(per_node.values()) == {SLOTS_PER_NODE}
    head = ray.get_runtime_context().get_node_id()
    assert head not in per_node  # the head advertises no slot: the control plane stays alone there
    wait_until(lambda: not idle_actor_nodes(client, namespace), timeout=10)  # no slot is left for the pool


def test_a_burst_that_fills_every_slot_right_after_start_up_is_all_admitted(cluster, serve):
    client = serve(waits_in_its_room, end_when="never")
    burst = [client.submit(room=f"burst-{i}") for i in range(2 * SLOTS_PER_NODE)]  # the pool is still prewarming
    with pytest.raises(AtCapacity, match="rayvisor_slot"):
        client.submit(room="one-too-many")
    running_jobs(client, len(burst))
    shut_down_every_job(client)


def test_adding_a_node_raises_capacity_without_restarting_anything_and_the_pool_refills_there(
        cluster, serve, namespace):
    client = serve(waits_in_its_room, end_when="never")
    first = [client.submit(room=f"before-{i}") for i in range(2 * SLOTS_PER_NODE)]
    with pytest.raises(AtCapacity):
        client.submit(room="waiting-for-a-node")
    pids = {i.id: i.pid for i in running_jobs(client, len(first))}

    new_node = add_slot_node(cluster)
    wait_until(lambda: new_node.node_id in idle_actor_nodes(client, namespace), timeout=30)  # prewarmed there
    later = [client.submit(room=f"after-{i}") for i in range(SLOTS_PER_NODE)]
    infos = {i.id: i for i in running_jobs(client, len(first) + len(later))}
    assert {infos[j].node_id for j in later} == {new_node.node_id}
    assert all(infos[j].pid == pids[j] and infos[j].restarts == 0 for j in first)
    shut_down_every_job(client)


def test_idle_actors_on_a_lost_node_stop_counting_and_the_pool_refills_elsewhere(cluster, serve, namespace):
    client = serve(waits_in_its_room, end_when="never")
    jobs = [client.submit(room=f"holds-{i}") for i in range(2 * SLOTS_PER_NODE)]
    running_jobs(client, len(jobs))  # the module's two nodes are full: the pool has no room there
    doomed = add_slot_node(cluster)
    wait_until(lambda: doomed.node_id in idle_actor_nodes(client, namespace), timeout=30)
    idle = lambda: client.metrics().gauges.get("rayvisor_idle_actors|agent=", 0)  # noqa: E731
    wait_until(lambda: idle() >= 1, timeout=30)  # alive in Ray's table first, then ready once prewarmed

    lost_at = time.monotonic()
    cluster.remove_node(doomed, allow_graceful=False)

    wait_until(lambda: idle() == 0, timeout=NODE_LOSS_BOUND + 5)  # Ray's detection + cluster_view_interval
    assert time.monotonic() - lost_at < NODE_LOSS_BOUND + 1.0 + 2.0
    client.shutdown(jobs[0])
    client.wait(jobs[0], timeout=30)
    nodes = wait_until(lambda: idle_actor_nodes(client, namespace), timeout=30)  # refilled where a slot is free
    assert doomed.node_id not in nodes and set(nodes) <= worker_nodes()
    shut_down_every_job(client)


def test_a_lost_node_ends_its_jobs_as_node_lost_and_transient_ones_restart_elsewhere(cluster, serve, namespace):
    client = serve(waits_in_its_room, end_when="never", restart="transient")
    blockers = [client.submit(rayvisor.JobSpec(room=f"blocker-{i}", restart="temporary"))
                for i in range(2 * SLOTS_PER_NODE)]
    running_jobs(client, len(blockers))  # every slot of the module's two nodes is taken
    doomed = add_slot_node(cluster)  # so the next two jobs can only run on this node
    temporary = client.submit(rayvisor.JobSpec(room="temporary-job", restart="temporary"))
    transient = client.submit(room="transient-job")
    infos = {i.id: i for i in running_jobs(client, len(blockers) + 2)}
    assert infos[temporary].node_id == infos[transient].node_id == doomed.node_id
    for job_id in blockers[:SLOTS_PER_NODE]:  # room elsewhere for the transient job's restart
        client.shutdown(job_id)
        client.wait(job_id, timeout=30)

    lost_at = time.monotonic()
    cluster.remove_node(doomed, allow_graceful=False)

    # Recorded at once (actor_crashed, or node_lost if Ray already knew), then Ray's verdict.
    ended = wait_until(lambda: (i := client.status(temporary)).cause == Cause.NODE_LOST and i, timeout=30)
    assert ended.state == JobState.FAILED
    assert time.monotonic() - lost_at < NODE_LOSS_BOUND + 5  # Ray's detection + rayvisor's reaction
    assert ended.entered(JobState.FAILED) - (time.time() - (time.monotonic() - lost_at)) < NODE_LOSS_BOUND
    info = wait_until(lambda: (i := client.status(transient)).state == JobState.RUNNING and i.restarts == 1
                      and i.attempts[0].cause == Cause.NODE_LOST and i, timeout=60)
    assert info.node_id != doomed.node_id and info.attempts[0].cause == Cause.NODE_LOST
    assert info.attempts[0].node_id == doomed.node_id
    shut_down_every_job(client)


def test_with_allow_pending_a_job_past_capacity_waits_then_is_rejected_for_no_capacity(cluster, serve):
    client = serve(waits_in_its_room, end_when="never", allow_pending=True, pending_timeout=8)
    placed = [client.submit(room=f"full-{i}") for i in range(2 * SLOTS_PER_NODE)]
    running_jobs(client, len(placed))

    waiting = client.submit(room="waits-for-a-node")  # no AtCapacity: the autoscaler's cue

    info = client.wait(waiting, timeout=30)
    assert (info.state, info.cause) == (JobState.REJECTED, Cause.NO_CAPACITY)
    assert all(client.status(j).state == JobState.RUNNING for j in placed)
