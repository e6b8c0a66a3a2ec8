"""The supervisor's side of LiveKit dispatch: its worker bridges, and jobs on offer.

A LiveKit server hands out a job in two steps: an ``AvailabilityRequest`` (may this
worker take it?) and, if the answer was yes, a ``JobAssignment`` (the token to join
with). Between the two the job is held PENDING, counting against capacity, for
``assignment_timeout``; the assignment starts it, termination shuts it down.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from livekit.protocol import agent as agent_proto

from ..agents.options import WorkerOptions
from ..aio import supervised_task
from ..errors import InvalidJobSpec, LiveKitNotConfigured, RayvisorError
from ..messages import Cause, JobOrigin, JobSpec, JobState, WorkerBridgeStatus
from .credentials import LiveKitCredentials
from .job_table import JobRecord, JobTable
from .store import SupervisorStore
from .worker_bridge import Offer, WorkerBridge, WorkerLoad

logger = logging.getLogger("rayvisor.worker")


class DispatchHost(Protocol):
    """What LiveKit dispatch needs from the supervisor."""

    @property
    def admitting(self) -> bool: ...

    @property
    def jobs(self) -> JobTable: ...

    def agent_options(self, agent_name: str) -> WorkerOptions: ...

    def existing_job(self, spec: JobSpec) -> JobRecord | None:
        """The job ``spec.job_id`` names (``DuplicateJob`` if it is another room's)."""

    async def admit(self, spec: JobSpec, opts: WorkerOptions) -> JobRecord:
        """Capacity, then ``request_fnc``: a PENDING record, or a typed error."""

    def run_job(self, record: JobRecord, opts: WorkerOptions) -> None: ...

    def reject(self, record: JobRecord, cause: Cause, reason: str) -> None: ...

    def begin_shutdown(self, record: JobRecord, cause: Cause, reason: str) -> None: ...

    async def worker_load(self, opts: WorkerOptions) -> WorkerLoad: ...


def is_dispatched(record: JobRecord) -> bool:
    """A job a LiveKit server assigned (it reports its status back to the server)."""
    return record.spec.origin == JobOrigin.LIVEKIT and bool(record.spec.token)


def status_error(record: JobRecord) -> str | None:
    """The error text a JS_FAILED update carries."""
    if record.error:
        return record.error
    if record.state.is_terminal and record.state != JobState.SUCCEEDED and record.cause is not None:
        return f"{record.cause.value}: {record.reason}" if record.reason else record.cause.value
    return None


class LiveKitDispatch:
    """One ``WorkerBridge`` per registered agent; implements the bridges' ``WorkerHost``."""

    def __init__(self, host: DispatchHost, store: SupervisorStore, tasks: set[asyncio.Task[Any]]) -> None:
        self._host = host
        self._store = store
        self._tasks = tasks
        self._bridges: dict[str, WorkerBridge] = {}
        self._offers: dict[str, asyncio.Task[Any]] = {}
        """Jobs offered to a LiveKit server, each with its expiry timer."""

    # -- driven by the supervisor -------------------------------------------------------

    def register(self, opts: WorkerOptions) -> WorkerBridgeStatus:
        """Register ``opts``' agent with its LiveKit server (idempotent, remembered for a
        restarted supervisor)."""
        if not opts.uses_livekit:
            raise LiveKitNotConfigured(f"agent {opts.agent_name!r} has no LiveKit server (ws_url, api_key, api_secret)")
        self._store.put_bridge(opts.agent_name)
        return self._bridge(opts).status()

    def resume(self) -> None:
        """After a supervisor restart: register again every agent that was registered."""
        for agent_name in self._store.bridges():
            try:
                self._bridge(self._host.agent_options(agent_name))
            except RayvisorError as err:
                logger.error("cannot register agent %r with LiveKit again: %s", agent_name, err)

    def status(self, agent_name: str) -> WorkerBridgeStatus:
        bridge = self._bridges.get(agent_name)
        if bridge is None:
            raise LiveKitNotConfigured(f"agent {agent_name!r} is not registered with a LiveKit server")
        return bridge.status()

    def job_changed(self, record: JobRecord) -> None:
        bridge = self._bridges.get(record.agent_name)
        if bridge is not None and is_dispatched(record):
            bridge.job_changed(record.id, record.state, status_error(record))

    def set_draining(self) -> None:
        for bridge in self._bridges.values():
            bridge.set_draining()

    async def close(self, flush_timeout: float) -> None:
        """Leave the servers once the last job statuses were sent (or ``flush_timeout`` passed)."""
        for bridge in self._bridges.values():
            await bridge.close(flush_timeout)

    def _bridge(self, opts: WorkerOptions) -> WorkerBridge:
        bridge = self._bridges.get(opts.agent_name)
        if bridge is None:
            credentials = LiveKitCredentials.of(opts)
            if credentials is None:
                raise LiveKitNotConfigured(f"agent {opts.agent_name!r} has no LiveKit server")
            bridge = self._bridges[opts.agent_name] = WorkerBridge(opts, credentials, self)
            if not self._host.admitting:
                bridge.set_draining()
            bridge.start()
        return bridge

    # -- WorkerHost: driven by the bridges ------------------------------------------------

    async def offer_job(self, opts: WorkerOptions, job: agent_proto.Job) -> Offer:
        """An ``AvailabilityRequest``: admit the job as PENDING and hold it for the assignment.
        The job runs the agent as registered now, not as the bridge was started with (``rayvisor
        dev`` re-registers an edited agent while its bridge stays connected)."""
        try:
            opts = self._host.agent_options(opts.agent_name)
            spec = JobSpec(room=job.room.name, metadata=job.metadata, agent_name=opts.agent_name,
                           dispatch_id=job.dispatch_id, job_id=job.id, origin=JobOrigin.LIVEKIT)
            record = self._host.existing_job(spec)
            if record is not None and record.id not in self._offers:
                # Assigned, ended, or still before request_fnc's answer: not offered (again) now.
                return Offer(False, reason=f"job {job.id} is already {record.state.value}")
            if record is None:
                record = await self._host.admit(spec, opts)
        except RayvisorError as err:
            return Offer(False, reason=f"{type(err).__name__}: {err}")
        if record.id not in self._offers:
            self._offers[record.id] = supervised_task(
                self._expire(record, opts.assignment_timeout), name=f"offer:{record.id}", logger=logger,
                tasks=self._tasks)
        agent_attribute = {"lk.agent.name": opts.agent_name} if opts.agent_name else {}
        return Offer(True, identity=record.identity,
                     name=record.agent_participant_name or opts.agent_name or record.identity,
                     metadata=record.agent_metadata, attributes={**agent_attribute, **record.agent_attributes})

    async def _expire(self, record: JobRecord, timeout: float) -> None:
        await asyncio.sleep(timeout)
        self._offers.pop(record.id, None)
        if record.state == JobState.PENDING and not record.spec.token:
            self._host.reject(record, Cause.REJECTED, f"no JobAssignment within assignment_timeout={timeout}s")

    def withdraw_offer(self, record: JobRecord, cause: Cause, reason: str) -> bool:
        """A job on offer (or still before ``request_fnc``'s answer) that is being shut down:
        it never ran, so it ends REJECTED at once. False for any other job."""
        if record.spec.origin != JobOrigin.LIVEKIT or record.spec.token or record.state != JobState.PENDING:
            return False
        self._withdraw(record.id)
        self._host.reject(record, cause, f"withdrawn before its assignment: {reason}")
        return True

    def _withdraw(self, job_id: str) -> None:
        timer = self._offers.pop(job_id, None)
        if timer is not None:
            timer.cancel()

    def assign_job(self, job_id: str, url: str, token: str) -> str | None:
        """A ``JobAssignment``: run the offered job with its url and token."""
        record = self._host.jobs.get(job_id)
        if record is None or record.spec.origin != JobOrigin.LIVEKIT:
            return f"job {job_id} was not offered by this worker"
        if record.spec.token:
            return None  # assigned twice: it is already running
        if record.state != JobState.PENDING:
            return f"job {job_id} is {record.state.value} ({record.reason or record.cause})"
        self._withdraw(job_id)
        try:
            record.spec = JobSpec(**{**record.spec.model_dump(), "url": url, "token": token})
        except InvalidJobSpec as err:
            self._host.reject(record, Cause.REJECTED, str(err))
            return str(err)
        self._host.run_job(record, self._host.agent_options(record.agent_name))
        return None

    def terminate_job(self, job_id: str) -> None:
        """A ``JobTermination``: the shutdown protocol (an offer not yet assigned is withdrawn)."""
        record = self._host.jobs.get(job_id)
        if record is None or record.is_terminal:
            return
        self._host.begin_shutdown(record, Cause.TERMINATED, "terminated by the LiveKit server")

    async def worker_load(self, opts: WorkerOptions) -> WorkerLoad:
        return await self._host.worker_load(opts)

    def dispatched_jobs(self, agent_name: str) -> list[str]:
        return [r.id for r in self._host.jobs.live() if r.agent_name == agent_name and is_dispatched(r)]
