"""The warm pool: job actors created and prewarmed ahead of demand, per agent.

A cold Ray actor takes ~0.4 s to start on a small machine; a job that takes a prewarmed
actor starts in milliseconds. Each agent's pool keeps between ``num_idle_actors`` and
``max_idle_actors`` actors, following the recent arrival rate; a prewarm that fails or
exceeds ``initialize_process_timeout`` is killed and replaced after an exponential
backoff, never in a tight loop.

Pool actors are capacity waiting for a job, never a reason to refuse one (see
``capacity``): a pool only asks for actors while the cluster has room no job needs, and
``WarmPools.rebalance`` lets spare actors go (a queued one first, then an abandoned
prewarm, then an idle actor) as soon as jobs need their resources or their node is lost.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..agents.options import WorkerOptions
from ..aio import supervised_task
from .capacity import Bundle, Demand, Ledger, PoolHolding
from .job_handle import JobActorHandle
from .metrics import SupervisorMetrics
from .start_slots import StartSlots

logger = logging.getLogger("rayvisor.pool")

TRIM_CHECKS_PER_WINDOW = 6
"""How often per ``pool_rate_window`` the pool re-evaluates its target when nothing happens."""
INITIAL_REFILL_ESTIMATE = 0.5
"""Assumed seconds to create and prewarm one actor until the first one has been measured."""

class PoolActorState(enum.Enum):
    QUEUED = "queued"
    """Asked for, waiting for a start slot: no actor exists yet, no resource is held."""
    PREWARMING = "prewarming"
    """Created and running ``prewarm_fnc``: holds its node's resources."""
    READY = "ready"
    """Prewarmed and idle, waiting for a job."""


@dataclass(eq=False)
class PoolActor:
    """One actor of a warm pool, from the request for it until a job takes it or it is let go."""

    state: PoolActorState = PoolActorState.QUEUED
    handle: JobActorHandle | None = None
    node_id: str | None = None
    task: asyncio.Task[Any] | None = None
    claim: asyncio.Future[JobActorHandle | None] | None = None
    """Set when a job took this actor while it was still prewarming: the job's wait for it."""


class WarmPool:
    """One agent's pool. All methods run on the supervisor's event loop."""

    def __init__(self, opts: WorkerOptions, *, create: Callable[[], JobActorHandle], bundle: Callable[[], Bundle],
                 share: Callable[["WarmPool"], "PoolShare"], lost_nodes: Callable[[], frozenset[str]],
                 on_change: Callable[[], None], metrics: SupervisorMetrics, start_slots: StartSlots) -> None:
        self.opts = opts
        self._create = create
        self._bundle = bundle
        self._share = share
        self._lost_nodes = lost_nodes
        self._on_change = on_change
        self._metrics = metrics
        self._start_slots = start_slots
        self._actors: list[PoolActor] = []
        """Actors no job has taken yet, in the order they were asked for."""
        self._arrivals: deque[float] = deque()
        self._failures = 0
        self._not_before = 0.0
        self._refill_seconds = INITIAL_REFILL_ESTIMATE
        self._wake = asyncio.Event()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._filler = supervised_task(self._fill(), name=f"pool:{opts.agent_name}", logger=logger, tasks=self._tasks)

    @property
    def agent(self) -> str:
        return self.opts.agent_name

    def _in(self, *states: PoolActorState) -> list[PoolActor]:
        return [a for a in self._actors if a.state in states]

    @property
    def idle(self) -> int:
        """Prewarmed actors waiting for a job."""
        return len(self._in(PoolActorState.READY))

    @property
    def size(self) -> int:
        """Actors asked for and not taken by a job (queued, prewarming or ready)."""
        return len(self._actors)

    def holding(self) -> PoolHolding:
        claimable = len(self._in(PoolActorState.PREWARMING, PoolActorState.READY))
        return PoolHolding(agent=self.agent, bundle=self._bundle(), claimable=claimable,
                           queued=len(self._actors) - claimable)

    def take(self) -> "asyncio.Future[JobActorHandle | None] | None":
        """An actor for a job, counting an arrival: a ready one (a done future), else one
        still prewarming (a future that resolves when its prewarm ends: the actor, or None if
        it failed), else None (start a cold one). Cancelling the future gives the actor back."""
        self._arrivals.append(time.monotonic())
        claimable = self._in(PoolActorState.READY) or self._in(PoolActorState.PREWARMING)
        self._wake.set()
        if not claimable:
            return None
        actor = claimable[0]
        self._actors.remove(actor)
        actor.claim = asyncio.get_running_loop().create_future()
        if actor.state is PoolActorState.READY:
            actor.claim.set_result(actor.handle)
        self._publish()
        return actor.claim

    def target(self) -> int:
        """How many actors to keep: the floor plus what the recent arrival rate needs while
        one actor is being prewarmed, capped at ``max_idle_actors``."""
        horizon = time.monotonic() - self.opts.pool_rate_window
        while self._arrivals and self._arrivals[0] < horizon:
            self._arrivals.popleft()
        rate = len(self._arrivals) / self.opts.pool_rate_window
        wanted = self.opts.num_idle_actors + math.ceil(rate * self._refill_seconds)
        return max(self.opts.num_idle_actors, min(self.opts.max_idle_actors, wanted))

    def release_spare(self, waiting: int) -> bool:
        """Let one spare actor go (``waiting``: this agent's jobs about to take one): a queued
        one, else the newest prewarm in flight, else the newest idle actor. False if none."""
        if not self._in(PoolActorState.QUEUED) and len(self._actors) <= waiting:
            return False
        self._let_go(self._least_ready())
        return True

    def _least_ready(self) -> PoolActor:
        """The actor whose loss costs least: the newest queued one, else the newest prewarm in
        flight, else the newest idle one (the reverse of the order jobs take them in)."""
        for state in (PoolActorState.QUEUED, PoolActorState.PREWARMING, PoolActorState.READY):
            actors = self._in(state)
            if actors:
                return actors[-1]
        raise LookupError("the pool holds no actor")

    def forget_lost_nodes(self) -> None:
        """Idle actors on a node that is gone stop counting at once."""
        lost = self._lost_nodes()
        for actor in self._in(PoolActorState.READY):
            if actor.node_id in lost:
                logger.warning("an idle actor of agent %r was lost with its node %s", self.agent, actor.node_id)
                self._let_go(actor)

    def _let_go(self, actor: PoolActor) -> None:
        self._actors.remove(actor)
        if actor.task is not None and not actor.task.done():
            actor.task.cancel()  # its prewarm kills the actor, if it had one
        elif actor.handle is not None:
            actor.handle.kill()
        self._publish()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Stop refilling and kill every actor no job has taken. A prewarm a job is waiting
        for goes on: that job still starts on it (or it is killed if the job gives it up)."""
        self._filler.cancel()
        for actor in list(self._actors):
            self._let_go(actor)
        self._closed = True
        self._metrics.pool_actors(self.agent, idle=0, prewarming=0)

    async def _fill(self) -> None:
        while not self._closed:
            self._wake.clear()
            share = self._share(self)
            target = self.target()
            while len(self._actors) > max(target, share.waiting):  # the rate fell, or a job gave an actor back
                self._let_go(self._least_ready())
            now = time.monotonic()
            while now >= self._not_before and len(self._actors) < target and self._has_room():
                actor = PoolActor()
                self._actors.append(actor)
                actor.task = supervised_task(self._prewarm(actor), name="pool-prewarm", logger=logger, tasks=self._tasks)
                self._on_change()
            # Wake for a backoff that ends, and now and then to let the target follow the rate.
            wait = self.opts.pool_rate_window / TRIM_CHECKS_PER_WINDOW
            if now < self._not_before:
                wait = min(wait, self._not_before - now)
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _has_room(self) -> bool:
        room = self._share(self).room
        return room is None or room >= 1

    async def _prewarm(self, actor: PoolActor) -> None:
        began = time.monotonic()
        try:
            async with self._start_slots.for_pool():
                began = time.monotonic()
                actor.state = PoolActorState.PREWARMING
                actor.handle = self._create()
                self._publish()
                started = await actor.handle.prewarm(self.opts.initialize_process_timeout)
                actor.node_id = started.node_id
        except asyncio.CancelledError:  # let go (spare, or the pool is closing)
            if actor.handle is not None:
                actor.handle.kill()
            self._hand_over(actor, None)
            raise
        except Exception as err:
            if actor.handle is not None:
                actor.handle.kill()
            self._failures += 1
            delay = min(self.opts.pool_backoff_max, self.opts.pool_backoff_initial * 2 ** (self._failures - 1))
            self._not_before = time.monotonic() + delay
            self._metrics.prewarm_failed(self.agent, backoff=delay)
            logger.warning("prewarming an idle actor of agent %r failed (%d in a row); next try in %.2fs: %s",
                           self.agent, self._failures, delay, err or type(err).__name__)
            self._hand_over(actor, None)
        else:
            if self._failures:
                self._failures = 0
                self._metrics.prewarm_recovered(self.agent)
            self._refill_seconds = 0.8 * self._refill_seconds + 0.2 * (time.monotonic() - began)
            if actor.claim is None or actor.claim.cancelled():  # no job waits for it (any more)
                actor.claim = None
                if self._closed or actor.node_id in self._lost_nodes():  # its node went meanwhile
                    actor.handle.kill()
                else:
                    actor.state = PoolActorState.READY
                    if actor not in self._actors:
                        self._actors.append(actor)
            else:
                self._hand_over(actor, actor.handle)
        finally:
            if actor.state is not PoolActorState.READY and actor in self._actors:
                self._actors.remove(actor)
            self._publish()
            self._wake.set()
            self._on_change()

    @staticmethod
    def _hand_over(actor: PoolActor, handle: JobActorHandle | None) -> None:
        """Give a job that took ``actor`` while it prewarmed its outcome: the actor, or None."""
        if actor.claim is not None and not actor.claim.done():
            actor.claim.set_result(handle)

    def _publish(self) -> None:
        if not self._closed:  # a closed pool's late prewarm must not overwrite its successor's gauges
            self._metrics.pool_actors(self.agent, idle=self.idle, prewarming=len(self._in(PoolActorState.PREWARMING)))


@dataclass(frozen=True)
class PoolShare:
    """What the cluster leaves one pool at a moment (see ``capacity.Ledger``)."""

    room: int | None
    """More spare actors it may ask for (None: unbounded)."""
    waiting: int
    """Its agent's jobs about to take one of its actors."""


class WarmPools:
    """Every agent's pool, sharing the cluster with the jobs: pools fill only what no job
    needs (``Ledger.room``) and give back what jobs need (``rebalance``)."""

    def __init__(self, *, demand: Callable[[], Demand], totals: Callable[[], Mapping[str, float]],
                 lost_nodes: Callable[[], frozenset[str]], max_jobs: Callable[[], int | None],
                 metrics: SupervisorMetrics, start_slots: StartSlots) -> None:
        self._demand = demand
        self._totals = totals
        self._lost_nodes = lost_nodes
        self._max_jobs = max_jobs
        self._metrics = metrics
        self._start_slots = start_slots
        self._pools: dict[str, WarmPool] = {}
        self._rebalance_scheduled = False

    def start(self, opts: WorkerOptions, *, create: Callable[[], JobActorHandle],
              bundle: Callable[[], Bundle]) -> None:
        """(Re)start ``opts.agent_name``'s pool, if its options ask for one."""
        self.stop(opts.agent_name)
        if opts.num_idle_actors + opts.max_idle_actors > 0:
            self._pools[opts.agent_name] = WarmPool(
                opts, create=create, bundle=bundle, share=self._share, lost_nodes=self._lost_nodes,
                on_change=self.rebalance_soon, metrics=self._metrics, start_slots=self._start_slots)

    def stop(self, agent: str) -> None:
        pool = self._pools.pop(agent, None)
        if pool is not None:
            pool.close()

    def close(self) -> None:
        for agent in list(self._pools):
            self.stop(agent)

    @property
    def idle(self) -> int:
        return sum(pool.idle for pool in self._pools.values())

    def take(self, agent: str) -> "asyncio.Future[JobActorHandle | None] | None":
        """See ``WarmPool.take``; None when the agent has no pool."""
        pool = self._pools.get(agent)
        if pool is None:
            return None
        self.rebalance_soon()  # the job is no longer waiting: what it did not take may be spare
        return pool.take()

    def ledger(self) -> Ledger:
        return Ledger(self._demand(), [p.holding() for p in self._pools.values()], self._totals(), self._max_jobs())

    def _share(self, pool: WarmPool) -> PoolShare:
        ledger = self.ledger()
        return PoolShare(room=ledger.room(pool.holding()), waiting=ledger.demand.waiting.get(pool.agent, 0))

    def rebalance_soon(self) -> None:
        """Rebalance once, after the current step of the loop (changes come in bursts)."""
        if not self._rebalance_scheduled:
            self._rebalance_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_rebalance)

    def _scheduled_rebalance(self) -> None:
        self._rebalance_scheduled = False
        try:
            self.rebalance()
        except Exception:
            logger.exception("rebalancing the warm pools failed")

    def rebalance(self) -> None:
        """Let spare actors go while jobs and pools together hold more than the cluster has,
        from the pool with the most spare actors first; then let every pool look for room."""
        for _ in range(sum(pool.size for pool in self._pools.values())):
            ledger = self.ledger()
            over = ledger.overcommitted()
            if not over:
                break
            spare = {pool: ledger.spare(holding) for pool, holding in zip(self._pools.values(), ledger.pools)}
            candidates = [p for p, n in spare.items() if n and ("max_jobs" in over or over & set(p.holding().bundle))]
            if not candidates:
                break
            pool = max(candidates, key=spare.__getitem__)
            pool.release_spare(ledger.demand.waiting.get(pool.agent, 0))
        for pool in self._pools.values():
            pool.wake()

    def nodes_changed(self) -> None:
        """A node joined or was lost: idle actors on lost nodes stop counting; pools may refill."""
        for pool in self._pools.values():
            pool.forget_lost_nodes()
        self.rebalance()
