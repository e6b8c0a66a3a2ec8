"""What the supervisor asks Ray's autoscaler for: room for its jobs, plus headroom.

Ray's autoscaler adds a node when something waits for resources no node has. A job refused
at once (``AtCapacity``) waits for nothing, so the supervisor says what it needs through
``ray.autoscaler.sdk.request_resources(bundles=...)``, a standing request for the cluster
to fit those bundles in total (running ones included; it is not added to usage). The
request is one job bundle (``rayvisor_slot`` and the agent's ``job_resources``) for:

- every live job, pending ones included (with ``allow_pending`` these are the demand);
- the warm pool's spare actors or ``min_free_slots``, whichever is more: the headroom is
  free room for jobs, which idle actors fill on loan, so they are not counted twice;
- every recent submit refused for lack of resources (``RefusedDemand``), so the caller's
  retry finds room.

It is updated as jobs come and go (at most every ``autoscaler_request_interval``), so once
demand falls the autoscaler may remove idle nodes. A supervisor that no longer admits jobs
(draining, stopping) asks only for its live jobs. The request is cluster-wide: one
supervisor per cluster should rely on it. ``stop`` withdraws it, and a new supervisor's
first request replaces whatever an earlier one (killed, or crashed) left standing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..aio import supervised_task

logger = logging.getLogger("rayvisor.supervisor")

Bundle = Mapping[str, float]
RECOMPUTE_EVERY = 10
"""With nothing changing, the request is recomputed every this many intervals (refused
demand expires, pools settle)."""


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def withdraw_request() -> None:
    """Withdraw the request to Ray's autoscaler from outside a supervisor (``Client.stop``
    when the supervisor could not withdraw it itself); a failure is logged, not raised."""
    try:
        _request_resources([])
    except Exception as err:
        logger.warning("cannot withdraw the request to Ray's autoscaler: %r", err)


class RefusedDemand:
    """Submits refused for lack of resources, one per (agent, room): a caller retrying the
    same room counts once. An entry ends when a job of that agent and room is admitted, or
    ``timeout`` seconds after the last refusal."""

    def __init__(self, timeout: Callable[[], float], *, on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout = timeout
        self._on_change = on_change
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, dict[str, float]]] = {}

    def refused(self, agent: str, room: str, bundle: Bundle) -> None:
        """A submit of ``agent`` for ``room`` was refused for lack of ``bundle``'s resources."""
        self._entries[(agent, room)] = (self._clock() + self._timeout(), dict(bundle))
        self._on_change()

    def admitted(self, agent: str, room: str) -> None:
        """A job of ``agent`` for ``room`` was admitted: that room's refusal is answered."""
        if self._entries.pop((agent, room), None) is not None:
            self._on_change()

    def clear(self) -> None:
        """Forget every refusal (the supervisor admits no more jobs: no retry will come in)."""
        if self._entries:
            self._entries.clear()
            self._on_change()

    def bundles(self) -> list[dict[str, float]]:
        """The bundles of the refusals that still count (expired ones are dropped)."""
        now = self._clock()
        for key in [key for key, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[key]
        return [bundle for _, bundle in self._entries.values()]


def headroom(min_free_slots: int, *, admitting: bool, max_jobs: int | None, live_jobs: int) -> int:
    """Free job bundles to ask for ahead of demand: ``min_free_slots``, none while no job is
    admitted (draining, stopping), and never more than ``max_jobs`` leaves room for."""
    if not admitting:
        return 0
    if max_jobs is not None:
        return min(min_free_slots, max(0, max_jobs - live_jobs))
    return min_free_slots


def autoscaler_bundles(*, jobs: Iterable[Bundle], pool_spare: Sequence[Bundle], headroom: int,
                       headroom_bundle: Bundle, refused: Iterable[Bundle]) -> list[dict[str, float]]:
    """The bundles to request (see the module docstring); empty bundles ask for nothing and
    are left out. Sorted, so that equal demands make equal requests."""
    extra = list(pool_spare) + [headroom_bundle] * max(0, headroom - len(pool_spare))
    bundles = [dict(bundle) for bundle in (*jobs, *extra, *refused) if bundle]
    return sorted(bundles, key=lambda bundle: sorted(bundle.items()))


class AutoscalerRequest:
    """Keeps Ray's autoscaler request equal to ``compute()``: recomputed on ``changed()``
    (and every ``RECOMPUTE_EVERY`` intervals), sent when it differs from the last one sent,
    at most once per ``interval`` seconds. The first computation is always sent: it replaces
    any request an earlier supervisor left standing. Sends are GCS writes, made in order on
    one thread of their own, so the request Ray keeps is the last one made."""

    def __init__(self, *, compute: Callable[[], list[dict[str, float]]], interval: Callable[[], float],
                 tasks: set[asyncio.Task[Any]],
                 send: Callable[[list[dict[str, float]]], None] = _request_resources,
                 on_sent: Callable[[list[dict[str, float]]], None] = lambda bundles: None) -> None:
        self._compute = compute
        self._on_sent = on_sent
        self._interval = interval
        self._send = send
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayvisor-autoscaler-request")
        self._sent: list[dict[str, float]] | None = None
        self._wake = asyncio.Event()
        self._wake.set()
        self._closed = False
        self._task = supervised_task(self._follow(), name="autoscaler-request", logger=logger, tasks=tasks)

    @property
    def sent(self) -> list[dict[str, float]] | None:
        """The request last sent (None: none yet, and an earlier one may stand)."""
        return self._sent

    def changed(self) -> None:
        """Demand may have changed: recompute soon."""
        self._wake.set()

    async def _follow(self) -> None:
        while not self._closed:
            try:
                async with asyncio.timeout(self._interval() * RECOMPUTE_EVERY):  # unlike wait_for, never
                    await self._wake.wait()                                     # swallows a cancellation
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                bundles = self._compute()
            except Exception:  # a bug in the arithmetic must not freeze the request for good
                logger.exception("computing the request to Ray's autoscaler failed; trying again")
            else:
                await self._update(bundles)
            await asyncio.sleep(self._interval())

    async def _update(self, bundles: list[dict[str, float]]) -> None:
        if bundles == self._sent or (self._closed and bundles):  # once closed, only the withdrawal
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._sender, self._send, bundles)
        except Exception as err:  # the GCS may be briefly unreachable: try again next round
            logger.warning("cannot update the request to Ray's autoscaler: %r", err)
            self._wake.set()
            return
        log = logger.info if bundles or self._sent else logger.debug  # a cluster that never autoscales: quiet
        log("asked Ray's autoscaler for room for %d job bundles%s", len(bundles), _summary(bundles))
        self._sent = bundles
        self._on_sent(bundles)

    async def close(self) -> None:
        """Stop following demand and withdraw the request (a stopped supervisor needs no room)."""
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        if self._sent != []:
            await self._update([])  # queued after any send in flight: the last one Ray keeps
        self._sender.shutdown(wait=False)


def _summary(bundles: list[dict[str, float]]) -> str:
    totals: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            totals[name] = totals.get(name, 0.0) + amount
    return f" ({', '.join(f'{name}: {amount:g}' for name, amount in sorted(totals.items()))})" if totals else ""
