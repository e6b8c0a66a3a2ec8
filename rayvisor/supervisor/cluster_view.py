"""The supervisor's cached view of the Ray cluster: its resource totals and live nodes.

Admission and the warm pool read it on every decision, so it must answer at once: a GCS
query (``ray.cluster_resources()``, ``ray.nodes()``) can take long while a node goes, and
must never stall the supervisor's loop. The view is read once when it is created, then
refreshed in a thread every ``interval`` seconds by a supervised task; a change (a node
joined or was lost) is passed to ``on_change``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from ..aio import supervised_task

logger = logging.getLogger("rayvisor.supervisor")

SLOT_RESOURCE = "rayvisor_slot"
"""The custom resource a node advertises for each job it may run (cluster.yaml)."""


@dataclass(frozen=True)
class ClusterSnapshot:
    """One read of the cluster: resource totals over live nodes, the live nodes' ids, and
    the ids of nodes Ray has declared dead."""

    totals: dict[str, float]
    alive_nodes: frozenset[str]
    lost_nodes: frozenset[str] = frozenset()

    @classmethod
    def read(cls) -> "ClusterSnapshot":
        """Ask the GCS (blocking: call it from a thread once the loop runs)."""
        nodes = ray.nodes()
        totals: dict[str, float] = {}
        alive: set[str] = set()
        lost: set[str] = set()
        for node in nodes:
            if not node.get("Alive"):
                lost.add(node["NodeID"])
                continue
            alive.add(node["NodeID"])
            for name, amount in (node.get("Resources") or {}).items():
                totals[name] = totals.get(name, 0.0) + float(amount)
        return cls(totals=totals, alive_nodes=frozenset(alive), lost_nodes=frozenset(lost))


class ClusterView:
    """See the module docstring. ``slots_in_use`` is sticky: once a node has advertised
    ``rayvisor_slot``, a moment with none alive (every agent node lost) makes jobs wait or
    be refused, never fall back onto the head."""

    def __init__(self, *, interval: float, on_change: Callable[[ClusterSnapshot], None],
                 tasks: set[asyncio.Task[Any]], read: Callable[[], ClusterSnapshot] = ClusterSnapshot.read) -> None:
        self._interval = interval
        self._on_change = on_change
        self._read = read
        self._snapshot = read()
        self._slots_seen = self._snapshot.totals.get(SLOT_RESOURCE, 0.0) > 0
        self._refresher = supervised_task(self._refresh_forever(), name="cluster-view", logger=logger, tasks=tasks)

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
        return self._slots_seen

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
        if snapshot == self._snapshot:
            return
        self._snapshot = snapshot
        self._slots_seen = self._slots_seen or snapshot.totals.get(SLOT_RESOURCE, 0.0) > 0
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
