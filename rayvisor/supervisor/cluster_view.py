"""The supervisor's cached view of the Ray cluster: its resource totals and live nodes.

Admission and the warm pool read it on every decision, so it must answer at once: a GCS
query (``ray.cluster_resources()``, ``ray.nodes()``) can take long while a node goes, and
must never stall the supervisor's loop. The view is read once when it is created, then
refreshed in a thread every ``interval`` seconds by a supervised task; a change (a node
joined or was lost, or job actors now take slots) is passed to ``on_change``.

Whether job actors take a ``rayvisor_slot`` is decided here, once and for all: by the
``job_slots`` setting, or else by the cluster's declarations (``autoscaler_config``: a node
type of the autoscaler's config advertises slots; or any node, alive or gone, advertised
them). Which nodes happen to be alive never decides it: with no agent node up yet, job
actors still ask for a slot, so they wait for the autoscaler instead of running on the head.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from ..aio import supervised_task
from .autoscaler_config import declared_resources

logger = logging.getLogger("rayvisor.supervisor")

SLOT_RESOURCE = "rayvisor_slot"
"""The custom resource a node advertises for each job it may run (cluster.yaml)."""


@dataclass(frozen=True)
class ClusterSnapshot:
    """One read of the cluster: resource totals over live nodes, the live nodes' ids, the
    ids of nodes Ray has declared dead, and the resources any node, alive or dead, advertised."""

    totals: dict[str, float]
    alive_nodes: frozenset[str]
    lost_nodes: frozenset[str] = frozenset()
    advertised: frozenset[str] = frozenset()

    @classmethod
    def read(cls) -> "ClusterSnapshot":
        """Ask the GCS (blocking: call it from a thread once the loop runs)."""
        nodes = ray.nodes()
        totals: dict[str, float] = {}
        alive: set[str] = set()
        lost: set[str] = set()
        advertised: set[str] = set()
        for node in nodes:
            resources = node.get("Resources") or {}
            advertised.update(name for name, amount in resources.items() if amount)
            if not node.get("Alive"):
                lost.add(node["NodeID"])
                continue
            alive.add(node["NodeID"])
            for name, amount in resources.items():
                totals[name] = totals.get(name, 0.0) + float(amount)
        return cls(totals=totals, alive_nodes=frozenset(alive), lost_nodes=frozenset(lost),
                   advertised=frozenset(advertised))


class ClusterView:
    """See the module docstring. ``job_slots``: the setting (None: decided by the cluster's
    declarations, read by ``declared``). Once on, ``slots_in_use`` stays on: a moment with no
    slot alive (every agent node lost, or none started yet) makes jobs wait or be refused,
    never fall back onto the head."""

    def __init__(self, *, interval: float, on_change: Callable[[ClusterSnapshot], None],
                 tasks: set[asyncio.Task[Any]], job_slots: bool | None = None,
                 read: Callable[[], ClusterSnapshot] = ClusterSnapshot.read,
                 declared: Callable[[], frozenset[str]] = declared_resources) -> None:
        self._interval = interval
        self._on_change = on_change
        self._read = read
        self._declared = declared
        self._job_slots = job_slots
        self._snapshot = read()
        self._slots = self._decide(self._snapshot, read_config=True)
        if self._slots:
            logger.info("job actors take a %s each (%s)", SLOT_RESOURCE,
                        "job_slots=True" if job_slots else "the cluster declares it")
        self._refresher = supervised_task(self._refresh_forever(), name="cluster-view", logger=logger, tasks=tasks)

    def _decide(self, snapshot: ClusterSnapshot, *, read_config: bool) -> bool:
        """Whether job actors take slots: the setting, else whether the cluster declares them."""
        if self._job_slots is not None:
            return self._job_slots
        if SLOT_RESOURCE in snapshot.advertised:
            return True
        if not read_config:
            return False
        try:
            return SLOT_RESOURCE in self._declared()
        except Exception as err:  # a private Ray API that moved, an unreadable config file
            logger.warning("cannot read the autoscaler's cluster config: %r", err)
            return False

    @property
    def totals(self) -> dict[str, float]:
        return self._snapshot.totals

    @property
    def alive_nodes(self) -> frozenset[str]:
        return self._snapshot.alive_nodes

    @property
    def lost_nodes(self) -> frozenset[str]:
        return self._snapshot.lost_nodes

    @property
    def slots_in_use(self) -> bool:
        """Whether job actors take a ``rayvisor_slot`` each (see the class docstring)."""
        return self._slots

    @property
    def slots(self) -> float:
        return self._snapshot.totals.get(SLOT_RESOURCE, 0.0)

    @property
    def cpu_count(self) -> int:
        return max(1, int(self._snapshot.totals.get("CPU", 1)))

    async def refresh(self) -> None:
        """Read the cluster now (in a thread) and report a change."""
        try:
            snapshot = await asyncio.to_thread(self._read)
        except Exception as err:  # the GCS may be briefly unreachable while a node goes
            logger.warning("cannot read the cluster's nodes and resources: %r", err)
            return
        slots = self._slots or await asyncio.to_thread(self._decide, snapshot, read_config=True)
        if snapshot == self._snapshot and slots == self._slots:
            return
        if slots and not self._slots:
            logger.info("job actors take a %s each from now on: the cluster declares it", SLOT_RESOURCE)
        self._snapshot = snapshot
        self._slots = slots
        try:
            self._on_change(snapshot)
        except Exception:
            logger.exception("reacting to a change of the cluster failed")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()

    def close(self) -> None:
        self._refresher.cancel()
