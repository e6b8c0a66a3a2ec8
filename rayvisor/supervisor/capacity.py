"""Who holds the cluster's job resources: jobs first, the warm pool only what is left.

Every job actor asks Ray for a bundle of resources: one ``rayvisor_slot`` where the cluster
advertises slots, plus its agent's ``job_resources``. The supervisor counts the bundles
itself (Ray's view of free resources lags actor creation, which would let a burst
over-admit). A live job holds its bundle from admission to its end, whether or not its
actor exists yet. A warm-pool actor holds one too, but only on loan: it is capacity
waiting for a job, never a reason to refuse one.

A job of agent A that has no actor yet will take one of A's pool actors when it starts,
so that many of A's pool actors are *matched*: their bundles are the job's, counted once.
The pool's other actors are *spare*; together with the jobs they may not exceed the
totals, and when they would (a job was admitted, a node was lost) spare actors are let go.
Everything here is plain arithmetic, testable without Ray.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Bundle = Mapping[str, float]

UNITS = 10_000
"""Resource amounts are counted in integer units of 1/10,000 (Ray's own granularity), so
that fractions (``{"GPU": 0.05}``) add up exactly: twenty such jobs fit one GPU, and "the
pool may ask for one more" never disagrees with "the pool must let one go"."""


def units(amount: float) -> int:
    return round(amount * UNITS)


def job_bundle(job_resources: Mapping[str, float], *, slot_resource: str | None) -> dict[str, float]:
    """What one job actor of an agent asks Ray for (``slot_resource``: where slots are in use)."""
    bundle = {name: float(amount) for name, amount in job_resources.items() if amount > 0}
    if slot_resource is not None:
        bundle[slot_resource] = bundle.get(slot_resource, 0.0) + 1.0
    return bundle


@dataclass
class Demand:
    """What the live jobs hold (or hold once started), in units per resource, and how many
    of each agent's jobs are admitted but not yet started (each takes one of its pool's actors)."""

    held: Counter[str] = field(default_factory=Counter)
    jobs: int = 0
    waiting: Counter[str] = field(default_factory=Counter)
    bundles: list[Bundle] = field(default_factory=list)
    """Each live job's bundle (what the autoscaler request asks room for)."""

    def add_job(self, agent: str, bundle: Bundle, *, waiting: bool) -> None:
        self.jobs += 1
        self.bundles.append(bundle)
        for name, amount in bundle.items():
            self.held[name] += units(amount)
        if waiting:
            self.waiting[agent] += 1


def shortage(bundle: Bundle, totals: Mapping[str, float], held: Mapping[str, int]) -> dict[str, str]:
    """The resources one more job of ``bundle`` would lack, each with a short explanation
    (``held``: ``Demand.held``)."""
    short = {}
    for name, amount in bundle.items():
        free = units(totals.get(name, 0.0)) - held.get(name, 0)
        if free < units(amount):
            short[name] = f"{max(0, free) / UNITS:g} of {totals.get(name, 0.0):g} free, {amount:g} needed"
    return short


@dataclass(frozen=True)
class PoolHolding:
    """One agent's warm pool as the capacity arithmetic sees it."""

    agent: str
    bundle: Bundle
    claimable: int
    """Actors a job can take (prewarming or ready): each holds a bundle."""
    queued: int = 0
    """Actors asked for, waiting for a start slot: each will hold a bundle."""

    def spare(self, waiting: int) -> int:
        """Actors none of ``waiting`` jobs of this agent about to start will take."""
        return max(0, self.claimable - waiting) + self.queued


class Ledger:
    """Jobs and warm pools against the cluster's totals (and ``max_jobs``) at one moment."""

    def __init__(self, demand: Demand, pools: Iterable[PoolHolding], totals: Mapping[str, float],
                 max_jobs: int | None) -> None:
        self.demand = demand
        self.pools = list(pools)
        self.max_jobs = max_jobs
        self._totals = {name: units(amount) for name, amount in totals.items()}
        self._spare_held: Counter[str] = Counter()
        self._spare_actors = 0
        for pool in self.pools:
            spare = self.spare(pool)
            self._spare_actors += spare
            for name, amount in pool.bundle.items():
                self._spare_held[name] += spare * units(amount)

    def spare(self, pool: PoolHolding) -> int:
        """``pool``'s actors that no waiting job of its agent will take."""
        return pool.spare(self.demand.waiting.get(pool.agent, 0))

    def _free(self, name: str) -> int:
        """Units of ``name`` neither jobs nor spare pool actors hold (negative: overcommitted)."""
        return self._totals.get(name, 0) - self.demand.held.get(name, 0) - self._spare_held.get(name, 0)

    def overcommitted(self) -> set[str]:
        """What jobs and spare pool actors together hold beyond the totals: resource names,
        and ``"max_jobs"`` when they are more than ``max_jobs``."""
        over = {name for name, amount in self._spare_held.items() if amount > 0 and self._free(name) < 0}
        if self.max_jobs is not None and self._spare_actors and self.demand.jobs + self._spare_actors > self.max_jobs:
            over.add("max_jobs")
        return over

    def room(self, pool: PoolHolding) -> int | None:
        """How many more spare actors ``pool`` may ask for without holding what a job needs;
        None when nothing bounds it (an empty bundle and no ``max_jobs``). Adding that many
        leaves ``overcommitted()`` empty."""
        room: int | None = None
        for name, amount in pool.bundle.items():
            fits = max(0, self._free(name) // max(1, units(amount)))
            room = fits if room is None else min(room, fits)
        if self.max_jobs is not None:
            fits = max(0, self.max_jobs - self.demand.jobs - self._spare_actors)
            room = fits if room is None else min(room, fits)
        return room
