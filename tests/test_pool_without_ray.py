"""The warm pool's state machine against a fake job-actor handle (no Ray): which actor a job
takes, which one the pool lets go, and what happens to an actor a job gives back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rayvisor.agents.options import WorkerOptions
from rayvisor.messages import ActorStarted
from rayvisor.supervisor.capacity import Demand
from rayvisor.supervisor.pool import PoolActorState, WarmPools
from rayvisor.supervisor.start_slots import StartSlots

PREWARM_SECONDS = 0.05


class FakeActor:
    """Stands in for ``JobActorHandle``: prewarms in ``PREWARM_SECONDS``, records its kill."""

    created: list["FakeActor"] = []

    def __init__(self) -> None:
        self.name = f"rayvisor-job-idle-{len(FakeActor.created)}"
        self.killed = False
        FakeActor.created.append(self)

    async def prewarm(self, timeout: float) -> ActorStarted:
        await asyncio.sleep(PREWARM_SECONDS)
        return ActorStarted(pid=1000 + FakeActor.created.index(self), node_id="node-1")

    def kill(self) -> None:
        self.killed = True


class FakeMetrics:
    def pool_actors(self, agent: str, *, idle: int, prewarming: int) -> None:
        pass

    def prewarm_failed(self, agent: str, *, backoff: float) -> None:
        pass


async def entrypoint(ctx: Any) -> None:
    pass


def pools(demand: Callable[[], Demand] = Demand, **options: Any) -> WarmPools:
    FakeActor.created = []
    warm = WarmPools(demand=demand, totals=lambda: {"rayvisor_slot": 4.0}, lost_nodes=frozenset, max_jobs=lambda: None,
                     metrics=FakeMetrics(), start_slots=StartSlots(lambda: 2))
    warm.start(WorkerOptions(entrypoint_fnc=entrypoint, **options), create=FakeActor,
               bundle=lambda: {"rayvisor_slot": 1.0})
    return warm


async def until(condition: Callable[[], Any], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def states(warm: WarmPools) -> list[PoolActorState]:
    return [a.state for a in warm._pools[""]._actors]


def test_a_job_takes_a_ready_actor_at_once_and_one_still_prewarming_when_it_is_ready():
    async def scenario() -> None:
        warm = pools(num_idle_actors=1, max_idle_actors=1)
        await until(lambda: states(warm) == [PoolActorState.READY])
        ready = warm.take("")
        assert ready.done() and ready.result() is FakeActor.created[0]

        await until(lambda: states(warm) == [PoolActorState.PREWARMING])
        prewarming = warm.take("")
        assert not prewarming.done()
        assert await prewarming is FakeActor.created[1] and not FakeActor.created[1].killed
        warm.close()

    asyncio.run(scenario())


def test_an_actor_a_job_gives_back_while_it_prewarms_is_kept_and_an_extra_one_is_let_go():
    async def scenario() -> None:
        warm = pools(num_idle_actors=1, max_idle_actors=1)
        await until(lambda: states(warm) == [PoolActorState.PREWARMING])
        claim = warm.take("")  # the pool refills behind it
        claim.cancel()  # the job was shut down while it waited

        await until(lambda: states(warm) == [PoolActorState.READY] and FakeActor.created[1].killed)
        assert warm._pools[""]._actors[0].handle is FakeActor.created[0]  # the given-back actor, ready
        warm.close()
        assert FakeActor.created[0].killed

    asyncio.run(scenario())


def test_when_jobs_need_the_slots_the_pool_lets_go_of_what_costs_least_first():
    jobs = Demand()

    async def scenario() -> None:
        warm = pools(demand=lambda: jobs, num_idle_actors=3, max_idle_actors=3)
        await until(lambda: states(warm) == [PoolActorState.READY] * 3)
        for _ in range(2):
            jobs.add_job("other", {"rayvisor_slot": 1.0}, waiting=False)
        warm.rebalance()  # 4 slots, 2 jobs: the pool may keep 2
        assert states(warm) == [PoolActorState.READY] * 2 and FakeActor.created[2].killed  # the newest goes

        jobs.add_job("", {"rayvisor_slot": 1.0}, waiting=True)  # about to take one of this pool's actors
        warm.rebalance()  # 3 jobs and 1 spare actor: the waiting job's actor is counted once
        assert states(warm) == [PoolActorState.READY] * 2
        jobs.add_job("other", {"rayvisor_slot": 1.0}, waiting=False)
        warm.rebalance()  # 4 jobs: only the waiting job's actor may stay
        assert states(warm) == [PoolActorState.READY] and FakeActor.created[1].killed
        warm.close()

    asyncio.run(scenario())


def test_a_pool_with_no_room_asks_for_nothing():
    jobs = Demand()
    for _ in range(4):
        jobs.add_job("", {"rayvisor_slot": 1.0}, waiting=False)

    async def scenario() -> None:
        warm = pools(demand=lambda: jobs, num_idle_actors=2, max_idle_actors=2)
        for _ in range(3):  # the filler's first pass decides synchronously: let it run
            await asyncio.sleep(0)
        assert states(warm) == [] and FakeActor.created == []
        warm.close()

    asyncio.run(scenario())


def test_closing_the_pool_kills_its_spare_actors_but_a_job_still_gets_the_prewarm_it_took():
    async def scenario() -> None:
        warm = pools(num_idle_actors=2, max_idle_actors=2)
        await until(lambda: states(warm) == [PoolActorState.PREWARMING] * 2)
        claim = warm.take("")

        warm.close()  # a drain: no more refills

        await until(lambda: FakeActor.created[1].killed)  # its prewarm abandoned
        assert await claim is FakeActor.created[0]  # the job starts on it, not on a cold actor
        assert not FakeActor.created[0].killed
        assert len(FakeActor.created) == 2

    asyncio.run(scenario())
