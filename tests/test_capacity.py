"""Capacity arithmetic (no Ray): jobs hold their resources; the warm pool only borrows what
no job needs, and gives it back as soon as a job does."""

from __future__ import annotations

from rayvisor.supervisor.capacity import Demand, Ledger, PoolHolding, job_bundle, shortage

SLOT = "rayvisor_slot"
TOTALS = {SLOT: 4.0, "CPU": 3.0}


def jobs(*agents: str, waiting: tuple[str, ...] = (), bundle: dict[str, float] | None = None) -> Demand:
    demand = Demand()
    for agent in agents:
        demand.add_job(agent, {SLOT: 1.0} if bundle is None else bundle, waiting=False)
    for agent in waiting:
        demand.add_job(agent, {SLOT: 1.0} if bundle is None else bundle, waiting=True)
    return demand


def pool(agent: str = "a", claimable: int = 0, queued: int = 0, bundle: dict[str, float] | None = None) -> PoolHolding:
    return PoolHolding(agent=agent, bundle={SLOT: 1.0} if bundle is None else bundle, claimable=claimable, queued=queued)


def test_a_job_bundle_is_one_slot_plus_the_agents_job_resources():
    assert job_bundle({"GPU": 1, "CPU": 0}, slot_resource=SLOT) == {"GPU": 1.0, SLOT: 1.0}
    assert job_bundle({}, slot_resource=None) == {}


def test_admission_counts_only_jobs_so_pool_actors_never_make_a_job_wait():
    assert shortage({SLOT: 1.0}, TOTALS, jobs("a", "a", "a").held) == {}
    assert shortage({SLOT: 1.0}, TOTALS, jobs("a", "a", "a", "a").held) == {SLOT: "0 of 4 free, 1 needed"}


def test_the_pool_fills_only_slots_no_job_needs():
    mine = pool(claimable=1)
    assert Ledger(jobs("a"), [mine], TOTALS, None).room(mine) == 2  # 4 slots - 1 job - 1 idle actor
    full = pool(claimable=0)
    assert Ledger(jobs("a", "b", "c", "d"), [full], TOTALS, None).room(full) == 0


def test_spare_pool_actors_beyond_what_jobs_leave_are_overcommitted():
    idle = pool(claimable=2)
    assert Ledger(jobs("b", "b"), [idle], TOTALS, None).overcommitted() == set()
    assert Ledger(jobs("b", "b", "b"), [idle], TOTALS, None).overcommitted() == {SLOT}


def test_an_actor_a_waiting_job_will_take_is_not_spare():
    idle = pool(claimable=1)
    ledger = Ledger(jobs("b", "b", "b", waiting=("a",)), [idle], TOTALS, None)
    assert ledger.overcommitted() == set()  # the waiting job of agent "a" will take it: counted once
    assert idle.spare(waiting=1) == 0 and idle.spare(waiting=0) == 1


def test_queued_actors_are_always_spare():
    queued = pool(queued=1)
    assert queued.spare(waiting=3) == 1


def test_max_jobs_bounds_the_pool_too():
    mine = pool(bundle={})
    assert Ledger(jobs("a", bundle={}), [mine], {}, max_jobs=3).room(mine) == 2
    assert Ledger(jobs("a", "a", "a", bundle={}), [pool(claimable=1, bundle={})], {}, max_jobs=3).overcommitted() == {"max_jobs"}


def test_with_no_bundle_and_no_max_jobs_nothing_bounds_the_pool():
    mine = pool(bundle={})
    assert Ledger(jobs("a", bundle={}), [mine], {}, None).room(mine) is None


def test_other_job_resources_count_the_same_way():
    gpu = {"GPU": 1.0}
    mine = pool(claimable=1, bundle=gpu)
    assert Ledger(jobs("a", bundle=gpu), [mine], {"GPU": 2.0}, None).overcommitted() == set()
    assert Ledger(jobs("a", "a", bundle=gpu), [mine], {"GPU": 2.0}, None).overcommitted() == {"GPU"}
    assert shortage(gpu, {"GPU": 2.0}, jobs("a", bundle=gpu).held) == {}


def test_fractions_add_up_exactly_so_the_pool_never_asks_for_what_it_must_then_let_go():
    twentieth = {"GPU": 0.05}
    nineteen = jobs(*["a"] * 19, bundle=twentieth)
    assert shortage(twentieth, {"GPU": 1.0}, nineteen.held) == {}  # the twentieth fits
    mine = pool(bundle=twentieth)
    assert Ledger(nineteen, [mine], {"GPU": 1.0}, None).room(mine) == 1
    one_more = pool(claimable=1, bundle=twentieth)
    assert Ledger(nineteen, [one_more], {"GPU": 1.0}, None).overcommitted() == set()
    assert Ledger(jobs(*["a"] * 20, bundle=twentieth), [one_more], {"GPU": 1.0}, None).overcommitted() == {"GPU"}
