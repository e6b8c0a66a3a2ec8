"""What the supervisor asks Ray's autoscaler for, and whether job actors take slots.

Plain asyncio with fakes: no Ray (``tests/test_autoscaling.py`` runs Ray's own autoscaler).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from rayvisor import SupervisorSettings, WorkerOptions
from rayvisor.errors import AtCapacity, InvalidAgent
from rayvisor.messages import JobSpec
from rayvisor.supervisor import autoscaler_config
from rayvisor.supervisor.admission import Admission
from rayvisor.supervisor.autoscaler_request import AutoscalerRequest, RefusedDemand, autoscaler_bundles, headroom
from rayvisor.supervisor.cluster_view import ClusterSnapshot, ClusterView
from rayvisor.supervisor.job_table import JobTable
from bounded import run_bounded
from supervisor_fakes import FakeCluster, LocalMetrics

SLOT = {"rayvisor_slot": 1.0}


async def agent(ctx: Any) -> None:
    pass


# -- the request --------------------------------------------------------------------------


def test_the_request_is_every_live_job_plus_headroom_plus_refused_submits() -> None:
    bundles = autoscaler_bundles(jobs=[SLOT, SLOT], pool_spare=[], headroom=2, headroom_bundle=SLOT,
                                 refused=[SLOT])
    assert bundles == [SLOT] * 5


def test_idle_actors_fill_the_headroom_so_they_are_not_counted_twice() -> None:
    assert len(autoscaler_bundles(jobs=[SLOT], pool_spare=[SLOT], headroom=2, headroom_bundle=SLOT,
                                  refused=[])) == 3
    assert len(autoscaler_bundles(jobs=[SLOT], pool_spare=[SLOT] * 3, headroom=2, headroom_bundle=SLOT,
                                  refused=[])) == 4, "a pool larger than the headroom is counted as it is"


def test_bundles_that_ask_for_nothing_are_left_out() -> None:
    """Without slots and without job_resources a job needs no resource the autoscaler could add."""
    assert autoscaler_bundles(jobs=[{}, {}], pool_spare=[{}], headroom=1, headroom_bundle={}, refused=[{}]) == []
    gpu = {"GPU": 1.0, "rayvisor_slot": 1.0}
    assert autoscaler_bundles(jobs=[gpu, {}], pool_spare=[], headroom=0, headroom_bundle=SLOT, refused=[]) == [gpu]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_refused_room_counts_once_however_often_its_caller_retries_and_ends_when_admitted() -> None:
    clock, changes = Clock(), []
    refused = RefusedDemand(lambda: 60.0, on_change=lambda: changes.append(1), clock=clock)
    for _ in range(5):
        refused.refused("agent", "room-a", SLOT)
    refused.refused("agent", "room-b", SLOT)
    assert refused.bundles() == [SLOT, SLOT]
    refused.admitted("agent", "room-a")
    assert refused.bundles() == [SLOT]
    refused.admitted("other-agent", "room-b")  # another agent's job in that room is not this demand
    assert refused.bundles() == [SLOT]
    assert len(changes) == 7
    refused.clear()  # the supervisor stops admitting
    assert refused.bundles() == [] and len(changes) == 8


def test_a_refused_submit_stops_counting_after_the_timeout() -> None:
    clock = Clock()
    refused = RefusedDemand(lambda: 60.0, clock=clock)
    refused.refused("agent", "room-a", SLOT)
    clock.now += 59.0
    assert refused.bundles() == [SLOT]
    clock.now += 2.0
    assert refused.bundles() == []


class Autoscaler:
    """Records every request sent to it; ``fail`` makes the next send raise."""

    def __init__(self) -> None:
        self.requests: list[list[dict[str, float]]] = []
        self.fail = 0
        self.sent = asyncio.Event()

    def __call__(self, bundles: list[dict[str, float]]) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("GCS unreachable")
        self.requests.append(bundles)
        self.sent.set()

    async def next_request(self) -> list[dict[str, float]]:
        self.sent.clear()
        await self.sent.wait()
        return self.requests[-1]


def test_the_request_follows_demand_sends_only_changes_and_is_withdrawn_on_close() -> None:
    demand: list[dict[str, float]] = []
    autoscaler = Autoscaler()

    async def scenario() -> None:
        request = AutoscalerRequest(compute=lambda: list(demand), interval=lambda: 0.01, tasks=set(),
                                    send=autoscaler)
        demand.extend([SLOT, SLOT])
        request.changed()
        assert await autoscaler.next_request() == [SLOT, SLOT]
        request.changed()  # nothing new: nothing sent
        demand.pop()
        request.changed()
        assert await autoscaler.next_request() == [SLOT]
        await request.close()
        assert autoscaler.requests == [[SLOT, SLOT], [SLOT], []]
    run_bounded(scenario)


def test_the_first_request_is_sent_even_when_empty_replacing_whatever_an_earlier_supervisor_left() -> None:
    autoscaler = Autoscaler()

    async def scenario() -> None:
        request = AutoscalerRequest(compute=list, interval=lambda: 0.01, tasks=set(), send=autoscaler)
        assert await autoscaler.next_request() == []
        await request.close()
    run_bounded(scenario)
    assert autoscaler.requests[-1] == []


def test_the_request_withdrawn_on_close_is_the_last_one_made_even_with_a_send_in_flight() -> None:
    release = threading.Event()
    made: list[list[dict[str, float]]] = []

    def slow_autoscaler(bundles: list[dict[str, float]]) -> None:
        if bundles:
            release.wait(5)
        made.append(bundles)

    async def scenario() -> None:
        request = AutoscalerRequest(compute=lambda: [SLOT], interval=lambda: 0.01, tasks=set(), send=slow_autoscaler)
        await asyncio.sleep(0)  # one turn of the loop: the first send is submitted, and blocks
        closing = asyncio.ensure_future(request.close())
        await asyncio.sleep(0)  # one turn: close has queued the withdrawal behind it
        release.set()
        await closing
    run_bounded(scenario)
    assert made == [[SLOT], []]


def test_a_failing_computation_is_logged_and_retried_not_the_end_of_the_request() -> None:
    autoscaler = Autoscaler()
    calls = []

    def compute() -> list[dict[str, float]]:
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("a bug")
        return [SLOT]

    async def scenario() -> None:
        request = AutoscalerRequest(compute=compute, interval=lambda: 0.01, tasks=set(), send=autoscaler)
        request.changed()
        assert await autoscaler.next_request() == [SLOT]
        await request.close()
    run_bounded(scenario)


def test_headroom_is_kept_only_while_jobs_are_admitted_and_within_max_jobs() -> None:
    assert headroom(2, admitting=True, max_jobs=None, live_jobs=10) == 2
    assert headroom(2, admitting=False, max_jobs=None, live_jobs=0) == 0, "draining or stopping: no job will come"
    assert headroom(2, admitting=True, max_jobs=5, live_jobs=4) == 1
    assert headroom(2, admitting=True, max_jobs=5, live_jobs=5) == 0


def test_a_failed_send_is_retried() -> None:
    autoscaler = Autoscaler()
    autoscaler.fail = 2

    async def scenario() -> None:
        AutoscalerRequest(compute=lambda: [SLOT], interval=lambda: 0.01, tasks=set(), send=autoscaler)
        assert await autoscaler.next_request() == [SLOT]
    run_bounded(scenario)
    assert autoscaler.requests == [[SLOT]]


# -- admission's part -----------------------------------------------------------------


def admission(cluster: FakeCluster, settings: SupervisorSettings | None = None) -> Admission:
    return Admission(settings=settings or SupervisorSettings(), table=JobTable(finished_job_history=10,
                     event_history=10), cluster=cluster, metrics=LocalMetrics("RW_test"),
                     agent_options=lambda name: WorkerOptions(entrypoint_fnc=agent), idle_actors=lambda: 0)


def test_a_submit_refused_for_lack_of_slots_raises_the_request_until_its_retry_is_admitted() -> None:
    cluster = FakeCluster({"CPU": 2.0, "rayvisor_slot": 1.0})
    gate = admission(cluster)
    opts = WorkerOptions(entrypoint_fnc=agent)

    async def scenario() -> None:
        await gate.reserve(JobSpec(room="a"), opts)
        with pytest.raises(AtCapacity, match="rayvisor_slot.*autoscaler"):
            await gate.reserve(JobSpec(room="b"), opts)
        assert gate.refused.bundles() == [SLOT]
        cluster.totals["rayvisor_slot"] = 2.0  # the autoscaler added a node
        await gate.reserve(JobSpec(room="b"), opts)
        assert gate.refused.bundles() == []
    run_bounded(scenario)


def test_a_submit_refused_by_the_supervisors_own_limits_asks_the_autoscaler_for_nothing() -> None:
    gate = admission(FakeCluster({"CPU": 2.0, "rayvisor_slot": 0.0}), SupervisorSettings(max_jobs=1))
    opts = WorkerOptions(entrypoint_fnc=agent)

    async def scenario() -> None:
        await gate.reserve(JobSpec(room="a"), WorkerOptions(entrypoint_fnc=agent, allow_pending=True))
        with pytest.raises(AtCapacity, match="max_jobs=1"):
            await gate.reserve(JobSpec(room="b"), opts)
    run_bounded(scenario)
    assert gate.refused.bundles() == []


# -- whether job actors take slots ----------------------------------------------------


def view(snapshot: ClusterSnapshot, *, job_slots: bool | None = None,
         declared: frozenset[str] = frozenset()) -> ClusterView:
    view = ClusterView(interval=3600, on_change=lambda _: None, tasks=set(), job_slots=job_slots,
                       read=lambda: snapshot, declared=lambda: declared)
    view.close()
    return view


HEAD_ONLY = ClusterSnapshot(totals={"CPU": 2.0}, alive_nodes=frozenset({"head"}), advertised=frozenset({"CPU"}))


def test_slots_are_off_on_a_cluster_that_declares_none() -> None:
    async def scenario() -> None:
        assert not view(HEAD_ONLY).slots_in_use
    run_bounded(scenario)


def test_slots_are_on_when_the_autoscalers_config_declares_them_though_no_agent_node_is_up() -> None:
    async def scenario() -> None:
        assert view(HEAD_ONLY, declared=frozenset({"CPU", "rayvisor_slot"})).slots_in_use
    run_bounded(scenario)


def test_slots_are_on_when_a_node_advertised_them_even_if_that_node_is_gone() -> None:
    gone = ClusterSnapshot(totals={"CPU": 2.0}, alive_nodes=frozenset({"head"}), lost_nodes=frozenset({"agent-1"}),
                           advertised=frozenset({"CPU", "rayvisor_slot"}))

    async def scenario() -> None:
        assert view(gone).slots_in_use
    run_bounded(scenario)


def test_the_setting_decides_over_the_cluster() -> None:
    async def scenario() -> None:
        assert view(HEAD_ONLY, job_slots=True).slots_in_use
        assert not view(HEAD_ONLY, job_slots=False, declared=frozenset({"rayvisor_slot"})).slots_in_use
    run_bounded(scenario)


def test_once_a_node_advertises_slots_they_stay_on_when_it_goes() -> None:
    snapshots = [HEAD_ONLY]
    changes: list[ClusterSnapshot] = []

    async def scenario() -> None:
        cluster = ClusterView(interval=3600, on_change=changes.append, tasks=set(), read=lambda: snapshots[-1],
                              declared=frozenset)
        assert not cluster.slots_in_use
        snapshots.append(ClusterSnapshot(totals={"CPU": 3.0, "rayvisor_slot": 2.0},
                                         alive_nodes=frozenset({"head", "agent-1"}),
                                         advertised=frozenset({"CPU", "rayvisor_slot"})))
        await cluster.refresh()
        assert cluster.slots_in_use and len(changes) == 1
        snapshots.append(ClusterSnapshot(totals={"CPU": 2.0}, alive_nodes=frozenset({"head"}),
                                         lost_nodes=frozenset({"agent-1"}), advertised=frozenset({"CPU"})))
        await cluster.refresh()
        assert cluster.slots_in_use, "no slot alive is a moment, not a decision"
        cluster.close()
    run_bounded(scenario)


def test_job_slots_and_headroom_are_validated() -> None:
    with pytest.raises(InvalidAgent, match="job_slots"):
        WorkerOptions(entrypoint_fnc=agent, job_slots="yes")
    with pytest.raises(InvalidAgent, match="min_free_slots"):
        WorkerOptions(entrypoint_fnc=agent, min_free_slots=-1)
    with pytest.raises(InvalidAgent, match="refused_demand_timeout"):
        SupervisorSettings(refused_demand_timeout=0)


# -- the autoscaler's config ----------------------------------------------------------


def test_the_node_types_of_a_cluster_config_declare_their_resources() -> None:
    config = {"available_node_types": {"head": {"resources": {}},
                                       "agent": {"resources": {"CPU": 4, "rayvisor_slot": 8, "GPU": 0}}}}
    assert autoscaler_config.node_type_resources(config) == {"CPU", "rayvisor_slot"}
    assert autoscaler_config.node_type_resources({"available_node_types": "garbage"}) == frozenset()
    assert autoscaler_config.node_type_resources(None) == frozenset()


def test_the_config_file_of_this_clusters_autoscaler_is_found_from_its_command_line_not_another_clusters(
        tmp_path: Path) -> None:
    config = tmp_path / "autoscaler.yaml"
    config.write_text(textwrap.dedent("""
        available_node_types:
          ray.head.default: {resources: {CPU: 1}}
          agent: {resources: {CPU: 1, rayvisor_slot: 2}, min_workers: 0, max_workers: 3}
    """))
    monitor = tmp_path / "monitor.py"
    monitor.write_text("import sys\nsys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, str(monitor), "--gcs-address=10.0.0.1:6379",
                             f"--autoscaling-config={config}"], stdin=subprocess.PIPE)
    try:
        assert autoscaler_config.autoscaler_config_path("10.0.0.1:6379") == config
        assert autoscaler_config.autoscaler_config_path("10.0.0.2:6379") is None, "another cluster's autoscaler"
        assert "rayvisor_slot" in autoscaler_config.node_type_resources(
            yaml.safe_load(autoscaler_config.autoscaler_config_path("10.0.0.1:6379").read_text()))
    finally:
        proc.communicate(b"", timeout=10)


def test_job_slots_default_comes_from_the_environment_where_the_autoscaler_is_out_of_sight(monkeypatch) -> None:
    for value, expected in (("on", True), ("off", False), ("auto", None), ("", None)):
        monkeypatch.setenv("RAYVISOR_JOB_SLOTS", value)
        assert WorkerOptions(entrypoint_fnc=agent).job_slots is expected
        assert SupervisorSettings().job_slots is expected
    monkeypatch.setenv("RAYVISOR_JOB_SLOTS", "maybe")
    with pytest.raises(InvalidAgent, match="RAYVISOR_JOB_SLOTS"):
        WorkerOptions(entrypoint_fnc=agent)
