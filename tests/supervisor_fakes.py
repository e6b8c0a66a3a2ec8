"""Fakes for the supervisor's plain asyncio parts: a job actor handle the test scripts, a
cluster view, and metrics that only count locally. No Ray runs."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from typing import Any

from rayvisor.messages import ActorStarted, Cause, JobDescription, JobOutcome, JobState, ShutdownRequest
from rayvisor.supervisor.job_handle import ActorFate, ActorGone, StartError
from rayvisor.supervisor.metrics import SupervisorMetrics

_pids = itertools.count(1000)


class LocalMetrics(SupervisorMetrics):
    """``SupervisorMetrics`` with no Ray metric behind it: the local mirror still counts."""

    @staticmethod
    def _make(kind: Any, name: str, keys: tuple[str, ...], **kwargs: Any) -> None:
        return None

    def counter(self, name: str, **tags: str) -> float:
        return self.snapshot().counters.get(name + "".join(f"|{k}={v}" for k, v in sorted(tags.items())), 0.0)


class FakeCluster:
    """A cluster view with fixed totals (``ClusterView``'s reading side)."""

    def __init__(self, totals: Mapping[str, float] | None = None, alive_nodes: frozenset[str] = frozenset({"node-1"})):
        self.totals = dict(totals or {"CPU": 2.0})
        self.alive_nodes = alive_nodes
        self.lost_nodes: frozenset[str] = frozenset()
        self.refreshes = 0

    @property
    def slots_in_use(self) -> bool:
        return self.totals.get("rayvisor_slot", 0.0) > 0

    @property
    def slots(self) -> float:
        return self.totals.get("rayvisor_slot", 0.0)

    async def refresh(self) -> None:
        self.refreshes += 1


class NoPools:
    """An agent without a warm pool: every job starts a cold actor."""

    def take(self, agent: str) -> None:
        return None


class FakeJobActor:
    """A job actor as ``JobDriver`` sees it (``JobActorHandle``'s methods), scripted by the
    test: it starts (or fails to), runs until ``finish``/``crash``, answers pings unless
    ``hang``, and ends cleanly on a shutdown request if ``obeys_shutdown``."""

    def __init__(self, name: str, *, start_error: str | None = None, obeys_shutdown: bool = True,
                 node_id: str = "node-1", start_held: bool = False) -> None:
        self.name = name
        self.start_error = start_error
        self.obeys_shutdown = obeys_shutdown
        self.node = node_id
        self.pid = next(_pids)
        self.ran = asyncio.Event()
        self.killed = False
        self.hung = False
        self.shutdown_requests: list[ShutdownRequest] = []
        self.starts: list[Any] = []
        self.start_gate = asyncio.Event()
        """Held (``start_held``) to keep the start call in flight until the test sets it."""
        if not start_held:
            self.start_gate.set()
        self.verdict: asyncio.Future[ActorFate] = asyncio.get_running_loop().create_future()
        """Ray's verdict on its death (``fate``): the test resolves it; DIED by default once it crashed."""
        self._outcome: asyncio.Future[JobOutcome] = asyncio.get_running_loop().create_future()

    # -- what the driver calls --------------------------------------------------------------

    async def start(self, start: Any, timeout: float) -> ActorStarted:
        self.starts.append(start)
        await self.start_gate.wait()
        if self.start_error is not None:
            raise StartError(self.start_error)
        if start.run and not self.shutdown_requests:  # a shutdown that came first keeps it from running
            self.run()
        return ActorStarted(pid=self.pid, node_id=self.node)

    def run(self) -> None:
        self.ran.set()

    async def wait_done(self) -> JobOutcome:
        return await asyncio.shield(self._outcome)

    async def ping(self, timeout: float) -> None:
        if self.hung:
            await asyncio.sleep(timeout)
            raise asyncio.TimeoutError

    def request_shutdown(self, request: ShutdownRequest) -> None:
        self.shutdown_requests.append(request)
        if self.obeys_shutdown and (self.ran.is_set() or self.starts):
            self.finish(JobState.SUCCEEDED, request.cause, request.reason)

    def kill(self) -> None:
        self.killed = True
        if not self._outcome.done():
            self._outcome.set_exception(ActorGone("killed"))

    async def fate(self, wait: float) -> ActorFate:
        try:
            return await asyncio.wait_for(asyncio.shield(self.verdict), wait)
        except asyncio.TimeoutError:
            return ActorFate.UNDECIDED

    def node_id(self) -> str:
        return self.node

    async def wait_placed(self, timeout: float) -> None:
        return None

    async def describe(self, timeout: float) -> JobDescription:
        return JobDescription(job_id="", shutting_down=False)

    # -- what the test does -----------------------------------------------------------------

    def finish(self, state: JobState, cause: Cause, reason: str = "") -> None:
        if not self._outcome.done():
            self._outcome.set_result(JobOutcome(state=state, cause=cause, reason=reason))

    def crash(self, verdict: ActorFate | None = ActorFate.DIED) -> None:
        """Its process dies; Ray's ``verdict`` comes with it (None: later, by ``verdict.set_result``)."""
        if verdict is not None and not self.verdict.done():
            self.verdict.set_result(verdict)
        if not self._outcome.done():
            self._outcome.set_exception(ActorGone("the actor died"))

    def hang(self) -> None:
        """Its event loop blocks: pings go unanswered."""
        self.hung = True
