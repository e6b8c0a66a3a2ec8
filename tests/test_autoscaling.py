"""Scaling out by itself, with Ray's own autoscaler (its fake multi-node provider, on this
machine): a head with no ``rayvisor_slot`` and an ``agent`` node type (2 slots,
``min_workers: 0``, ``max_workers: 3``) that the autoscaler adds and removes.

The supervisor is told nothing about the cluster: it finds ``rayvisor_slot`` in the
autoscaler's config, so job actors ask for one even while no agent node exists.
"""

from __future__ import annotations

import json
import time

import pytest
import ray
from autoscaling_cluster import agent_nodes, autoscaling_cluster, wait_for_agent_nodes
from support import wait_until

import rayvisor
from rayvisor import JobContext, JobState
from rayvisor.errors import AtCapacity
from rayvisor.supervisor.supervisor import SUPERVISOR_NAME

SLOTS_PER_NODE = 2
NODE_START_TIMEOUT = 60.0
"""A fake agent node is up and placed ~2-5 s after the request; generous for 2 shared cores."""
NODE_IDLE_TIMEOUT_MINUTES = 0.2
SUBMIT_RETRY_INTERVAL = 0.5
"""How often a caller refused with ``AtCapacity`` submits again."""
NODE_REMOVAL_TIMEOUT = 90.0
"""Idle nodes go ~12-25 s after their last job (idle timeout 12 s, autoscaler rounds of 1 s)."""


async def waits_in_its_room(ctx: JobContext) -> None:
    await ctx.connect()


@pytest.fixture(scope="module")
def cluster():
    """Swap the session's single-node Ray for the autoscaling cluster, and back."""
    from conftest import start_session_ray

    ray.shutdown()
    try:
        with autoscaling_cluster(agent_resources={"CPU": 1, "rayvisor_slot": SLOTS_PER_NODE}, max_agent_nodes=3,
                                 idle_timeout_minutes=NODE_IDLE_TIMEOUT_MINUTES) as cluster:
            ray.init(address=cluster.address, namespace="rayvisor-tests", log_to_driver=False)
            try:
                yield cluster
            finally:
                ray.shutdown()
    finally:
        start_session_ray()


@pytest.fixture(autouse=True)
def no_agent_node_at_start(cluster):
    """Each test starts from zero agent nodes (the previous test's idle nodes are removed)."""
    wait_for_agent_nodes(0, timeout=NODE_REMOVAL_TIMEOUT)


def standing_request() -> list[dict[str, float]]:
    """The bundles Ray's autoscaler (v1, as ``ray start --autoscaling-config`` runs it) is asked to fit."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def head_node() -> str:
    return ray.get_runtime_context().get_node_id()


def running(client, count: int) -> list:
    try:
        return wait_until(lambda: (infos := [i for i in client.list() if i.state == JobState.RUNNING])
                          and len(infos) == count and infos, timeout=NODE_START_TIMEOUT, interval=0.1)
    except AssertionError:
        raise AssertionError(f"not {count} running: {[(i.id, i.state, i.cause, i.error) for i in client.list()]}")


def submit_until_admitted(client, room: str) -> tuple[str, int]:
    """Retry a submit refused with ``AtCapacity``, as a caller would; the job id and the refusals."""
    refusals = 0
    deadline = time.monotonic() + NODE_START_TIMEOUT
    while True:
        try:
            return client.submit(room=room), refusals
        except AtCapacity as err:
            assert "rayvisor_slot" in str(err)
            refusals += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(SUBMIT_RETRY_INTERVAL)


def test_from_zero_agent_nodes_a_refused_submit_makes_the_autoscaler_add_a_node_and_the_retry_runs_there(serve):
    client = serve(waits_in_its_room)
    with pytest.raises(AtCapacity, match="rayvisor_slot"):
        client.submit(room="first")  # no slot anywhere: refused, never run on the head

    first, _ = submit_until_admitted(client, "first")
    assert len(agent_nodes()) == 1
    second, refusals = submit_until_admitted(client, "second")
    assert refusals == 0, "the node's second slot was free"
    third, refusals = submit_until_admitted(client, "third")
    assert refusals >= 1, "both slots were taken: the third job waited for a second node"
    infos = running(client, 3)
    assert head_node() not in {info.node_id for info in infos}
    assert len({info.node_id for info in infos}) == 2
    assert {first, second, third} == {info.id for info in infos}


def test_pending_jobs_from_zero_agent_nodes_start_on_the_nodes_the_autoscaler_adds_and_idle_ones_go(serve):
    # allow_pending: the mode under test. No warm pool: an idle actor holds a slot, so its
    # node is not idle and would stay (README: "Scale out").
    client = serve(waits_in_its_room, allow_pending=True, num_idle_actors=0, max_idle_actors=0)
    ids = [client.submit(room=f"pending-{n}") for n in range(3)]
    infos = running(client, 3)
    assert {info.id for info in infos} == set(ids)
    nodes = {info.node_id for info in infos}
    assert head_node() not in nodes and len(nodes) == 2
    assert len(agent_nodes()) == 2

    # Demand falls: the jobs of one node end; that node goes, the other job is not disturbed.
    by_node: dict[str, list] = {}
    for info in infos:
        by_node.setdefault(info.node_id, []).append(info)
    emptied, kept = sorted(by_node.values(), key=len, reverse=True)
    for info in emptied:
        client.shutdown(info.id)
        client.wait(info.id, timeout=30)
    wait_until(lambda: {n["NodeID"] for n in agent_nodes()} == {kept[0].node_id}, timeout=NODE_REMOVAL_TIMEOUT,
               interval=0.5)
    survivor = client.status(kept[0].id)
    assert survivor.state == JobState.RUNNING and survivor.pid == kept[0].pid
    assert all(client.status(info.id).cause == rayvisor.Cause.USER_SHUTDOWN for info in emptied)


def test_with_headroom_a_node_is_added_before_the_slots_run_out(serve):
    client = serve(waits_in_its_room, min_free_slots=1)
    wait_for_agent_nodes(1, timeout=NODE_START_TIMEOUT)  # one free slot asked for, before any job
    client.submit(room="one")
    client.submit(room="two")  # takes the node's last free slot: refused by no one
    running(client, 2)
    wait_for_agent_nodes(2, timeout=NODE_START_TIMEOUT)  # headroom restored ahead of the next job
    third, refusals = submit_until_admitted(client, "three")
    assert refusals == 0
    assert third in {info.id for info in running(client, 3)}
    wait_until(lambda: standing_request() == [{"rayvisor_slot": 1.0}] * 4, timeout=10)  # 3 jobs + 1 free
    client.stop()
    assert standing_request() == [], "a stopped supervisor needs no room: the nodes may go"


def test_a_supervisor_that_could_not_withdraw_its_request_leaves_none_standing(serve, namespace):
    client = serve(waits_in_its_room, min_free_slots=1)
    wait_until(lambda: standing_request() == [{"rayvisor_slot": 1.0}], timeout=10)
    ray.kill(ray.get_actor(SUPERVISOR_NAME, namespace=namespace), no_restart=True)
    client.stop()
    assert standing_request() == []
