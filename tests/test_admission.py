"""Admission decides whether one more job may run, and reserves its place atomically.

Plain asyncio with a fake cluster view: no Ray, milliseconds per test.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from rayvisor import Cause, JobState, SupervisorSettings, WorkerOptions
from rayvisor.errors import AtCapacity, Draining, DuplicateJob, JobRejected, MetadataTooLarge
from rayvisor.messages import JobSpec
from rayvisor.supervisor.admission import Admission
from rayvisor.supervisor.job_table import JobTable
from bounded import SCENARIO_DEADLINE, run_bounded
from supervisor_fakes import FakeCluster, LocalMetrics

DEADLINE = SCENARIO_DEADLINE


async def agent(ctx: Any) -> None:
    pass


def options(**overrides: Any) -> WorkerOptions:
    return WorkerOptions(entrypoint_fnc=agent, **overrides)


def admission(settings: SupervisorSettings | None = None, cluster: FakeCluster | None = None,
              opts: WorkerOptions | None = None) -> Admission:
    table = JobTable(finished_job_history=100, event_history=100)
    return Admission(settings=settings or SupervisorSettings(), table=table, cluster=cluster or FakeCluster(),
                     metrics=LocalMetrics("RW_test"), agent_options=lambda name: opts or options(),
                     idle_actors=lambda: 0)


def live(gate: Admission) -> int:
    return len(gate._table.live())


def test_max_jobs_is_the_limit_and_a_refused_job_leaves_no_record() -> None:
    gate = admission(SupervisorSettings(max_jobs=2))

    async def scenario() -> None:
        await gate.reserve(JobSpec(room="a"), options())
        await gate.reserve(JobSpec(room="b"), options())
        with pytest.raises(AtCapacity, match="max_jobs=2"):
            await gate.reserve(JobSpec(room="c"), options())
    run_bounded(scenario)
    assert live(gate) == 2
    assert gate._metrics.counter("rayvisor_jobs_rejected", reason="at_capacity") == 1


def test_a_reservation_counts_at_once_so_concurrent_admissions_cannot_share_the_last_place() -> None:
    """``load_fnc`` runs in a thread: both admissions are in flight together, yet one job fits."""
    both_asked = threading.Barrier(2, timeout=DEADLINE)

    def load(info: Any) -> float:
        both_asked.wait()
        return 0.0

    gate = admission(SupervisorSettings(max_jobs=1, load_fnc=load, load_timeout=DEADLINE))

    async def scenario() -> list[Any]:
        return await asyncio.gather(gate.reserve(JobSpec(room="a"), options()),
                                    gate.reserve(JobSpec(room="b"), options()), return_exceptions=True)
    outcomes = run_bounded(scenario)
    assert sorted(type(o).__name__ for o in outcomes) == ["AtCapacity", "JobRecord"]
    assert live(gate) == 1


@pytest.mark.parametrize("load_fnc, match", [
    (lambda info: 0.9, "load 0.90 is at or above load_threshold=0.75"),
    (lambda info: 1 / 0, "load_fnc failed \\(ZeroDivisionError"),
])
def test_load_fnc_over_its_threshold_or_failing_refuses_the_job(load_fnc: Callable[[Any], float], match: str) -> None:
    gate = admission(SupervisorSettings(load_fnc=load_fnc))
    with pytest.raises(AtCapacity, match=match):
        run_bounded(lambda: gate.reserve(JobSpec(room="a"), options()))
    assert live(gate) == 0


def test_a_load_fnc_that_does_not_answer_in_time_fails_closed() -> None:
    release = threading.Event()
    gate = admission(SupervisorSettings(load_fnc=lambda info: release.wait(DEADLINE) and 0.0, load_timeout=0.05))
    try:
        with pytest.raises(AtCapacity, match="load_timeout=0.05s"):
            run_bounded(lambda: gate.reserve(JobSpec(room="a"), options()))
    finally:
        release.set()


def test_jobs_take_a_slot_each_and_past_the_slots_only_an_allow_pending_agent_is_admitted() -> None:
    cluster = FakeCluster({"CPU": 2.0, "rayvisor_slot": 2.0})
    gate = admission(cluster=cluster)

    async def scenario() -> None:
        await gate.reserve(JobSpec(room="a"), options())
        await gate.reserve(JobSpec(room="b"), options())
        with pytest.raises(AtCapacity, match="not enough free Ray resources.*rayvisor_slot"):
            await gate.reserve(JobSpec(room="c"), options())
        assert cluster.refreshes == 1, "it looks at the cluster again before refusing"
        await gate.reserve(JobSpec(room="d"), options(allow_pending=True))
    run_bounded(scenario)
    assert live(gate) == 3


def test_request_fnc_accepting_sets_the_agents_identity_and_rejecting_records_rejected() -> None:
    async def accept(request: Any) -> None:
        await request.accept(identity="bot-1", name="Bot", attributes={"k": "v"})

    async def reject(request: Any) -> None:
        await request.reject()

    gate = admission()

    async def scenario() -> None:
        accepted = await gate.reserve(JobSpec(room="a"), options(request_fnc=accept))
        await gate.ask(accepted, options(request_fnc=accept))
        assert (accepted.identity, accepted.agent_participant_name, accepted.agent_attributes) == (
            "bot-1", "Bot", {"k": "v"})
        rejected = await gate.reserve(JobSpec(room="b"), options(request_fnc=reject))
        with pytest.raises(JobRejected, match="rejected by request_fnc"):
            await gate.ask(rejected, options(request_fnc=reject))
        assert (rejected.state, rejected.cause) == (JobState.REJECTED, Cause.REJECTED)
    run_bounded(scenario)
    assert live(gate) == 1


def test_a_request_fnc_that_does_not_answer_in_time_rejects_the_job() -> None:
    async def undecided(request: Any) -> None:
        await asyncio.sleep(DEADLINE)

    gate = admission()

    async def scenario() -> None:
        opts = options(request_fnc=undecided, request_timeout=0.05)
        record = await gate.reserve(JobSpec(room="a"), opts)
        with pytest.raises(JobRejected, match="request_timeout=0.05s"):
            await gate.ask(record, opts)
    run_bounded(scenario)
    assert live(gate) == 0


def test_a_draining_supervisor_admits_nothing() -> None:
    gate = admission()
    gate.stop("draining")
    with pytest.raises(Draining, match="draining"):
        run_bounded(lambda: gate.reserve(JobSpec(room="a"), options()))
    assert not gate.admitting


def test_oversized_metadata_and_a_reused_job_id_are_refused() -> None:
    gate = admission(SupervisorSettings(max_metadata_bytes=8))

    async def scenario() -> None:
        with pytest.raises(MetadataTooLarge, match="max_metadata_bytes=8"):
            await gate.reserve(JobSpec(room="a", metadata="x" * 9), options())
        await gate.reserve(JobSpec(room="a", job_id="same"), options())
        assert gate.existing(JobSpec(room="a", job_id="same")) is not None
        with pytest.raises(DuplicateJob, match="room 'a'"):
            gate.existing(JobSpec(room="b", job_id="same"))
    run_bounded(scenario)


def test_the_worker_load_is_live_jobs_over_the_clusters_slots() -> None:
    gate = admission(cluster=FakeCluster({"CPU": 2.0, "rayvisor_slot": 2.0}))

    async def scenario() -> tuple[Any, Any]:
        await gate.reserve(JobSpec(room="a"), options())
        half = await gate.worker_load(options())
        await gate.reserve(JobSpec(room="b"), options())
        return half, await gate.worker_load(options())
    half, full = run_bounded(scenario)
    assert (half.load, half.full, half.job_count) == (0.5, False, 1)
    assert (full.load, full.full, full.job_count) == (1.0, True, 2)
