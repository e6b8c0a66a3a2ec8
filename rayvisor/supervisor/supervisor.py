"""The supervisor actor: the endpoints of one supervisor, over ``SupervisorCore``'s parts.

One detached, named async actor per namespace, pinned to the node of the driver that
served it. Every method here is an endpoint that speaks typed msgpack records (through
``@endpoint``); what they do lives in plain asyncio parts: ``Admission`` (may a job run?),
a ``JobDriver`` per job (its attempts, deadlines and restarts), ``Recovery`` (taking jobs
back after Ray restarted this actor), ``LiveKitDispatch`` (LiveKit's dispatches) and the
warm pools. No other method exists, so nothing else can be called remotely.

This module stays light to import: every process that receives a handle to the supervisor
(each job actor does) imports it, as Ray loads an actor's class to rebuild its handle.
``SupervisorCore`` and everything it needs (the LiveKit bridge, aiohttp, livekit.api ...)
load in ``__init__``, in the supervisor's own process only.
"""

from __future__ import annotations

import asyncio
import logging

import psutil
import ray

from ..actors import main_thread_registries
from ..agents.options import WorkerOptions
from ..errors import InvalidJobSpec, LiveKitNotConfigured, WaitTimeout
from ..logs import configure as configure_logging
from ..messages import (
    Ack,
    AgentNameRequest,
    AgentRegistered,
    Cause,
    DrainRequest,
    DrainResult,
    DrainStarted,
    EventsRequest,
    HealthRequest,
    JobIdRequest,
    JobInfo,
    JobList,
    JobOrigin,
    JobSpec,
    MemoryReport,
    MetricsSnapshot,
    ParticipantsChanged,
    ShutdownJobRequest,
    ShutdownStarted,
    SupervisorHealth,
    TransitionList,
    WaitRequest,
    WorkerBridgeStatus,
    encode,
    endpoint,
)
from .job_table import wait_ended
from .settings import SupervisorSettings

main_thread_registries.install_in_ray_workers()  # agents' livekit plugins load on actor threads

logger = logging.getLogger("rayvisor.supervisor")

SUPERVISOR_NAME = "rayvisor-supervisor"


@ray.remote(num_cpus=0, max_restarts=-1)
class Supervisor:
    """See the module docstring."""

    def __init__(self, opts: WorkerOptions, namespace: str, log_format: str = "json",
                 settings: SupervisorSettings | None = None) -> None:
        configure_logging("start" if log_format == "json" else "dev")
        from .core import SupervisorCore  # see the module docstring

        self._core = SupervisorCore(opts, namespace=namespace, log_format=log_format, settings=settings)
        self._drained_from: list[str] = []

    # -- agents ---------------------------------------------------------------------------

    async def register_agent(self, opts: WorkerOptions, settings: SupervisorSettings | None = None) -> bytes:
        """Register (or replace, for new jobs) the agent named ``opts.agent_name``; the reply
        names the supervisor-wide settings it asked for (``settings``, or its own options)
        that this supervisor keeps otherwise. The one endpoint that takes Python objects:
        an agent's options hold its code (functions), which no record can carry."""
        conflicts = self._core.settings.conflicts(settings or SupervisorSettings.from_options(opts))
        if conflicts:
            logger.warning(
                "agent %r asks for supervisor-wide settings this supervisor keeps otherwise: %s",
                opts.agent_name, "; ".join(conflicts))
        self._core.register(opts)
        return encode(AgentRegistered(agent_name=opts.agent_name, conflicts=conflicts))

    # -- clients: jobs --------------------------------------------------------------------

    @endpoint(JobSpec)
    async def submit(self, spec: JobSpec) -> JobInfo:
        """Admit a job (capacity is reserved atomically, then ``request_fnc`` decides) and run
        it. A spec naming the id of an existing job (same room and agent) returns that job."""
        core = self._core
        existing = core.admission.existing(spec)
        if existing is not None:
            return existing.info()
        if spec.origin == JobOrigin.LIVEKIT:
            raise InvalidJobSpec("origin 'livekit' is set by the worker bridge for LiveKit's dispatches only")
        core.admission.check_admitting()
        record = await core.admit(spec, core.resolve(spec.agent_name))
        driver = core.drivers.get(record.id)
        if driver is not None:  # None only if the job ended while request_fnc decided
            driver.start()
        await core.snapshots.flush()  # the caller learns of the job once a successor would too
        return record.info()

    @endpoint(JobIdRequest)
    async def status(self, request: JobIdRequest) -> JobInfo:
        return self._core.record(request.job_id).info()

    @endpoint(JobIdRequest)
    async def list_jobs(self, request: JobIdRequest) -> JobList:
        """Every job in the table, without metadata (``status`` has it), so the reply stays
        small however large the history (the request's job id is ignored)."""
        return JobList(jobs=[r.info(with_metadata=False) for r in self._core.table.all()])

    @endpoint(ShutdownJobRequest)
    async def shutdown(self, request: ShutdownJobRequest) -> JobInfo:
        """Start the shutdown protocol for a job (idempotent)."""
        record = self._core.record(request.job_id)
        self._core.drivers.begin_shutdown(record, Cause.USER_SHUTDOWN, request.reason)
        return record.info()

    @endpoint(WaitRequest)
    async def wait(self, request: WaitRequest) -> JobInfo:
        """The job's terminal record, waiting up to ``timeout`` seconds for it."""
        record = self._core.record(request.job_id)
        if not await wait_ended([record], request.timeout):
            raise WaitTimeout(f"job {record.id} is still {record.state.value} after {request.timeout}s")
        return record.info()

    @endpoint(EventsRequest)
    async def events(self, request: EventsRequest) -> TransitionList:
        """State transitions after ``after_seq`` (long-poll up to ``timeout``)."""
        return TransitionList(events=await self._core.table.events_after(request.after_seq, request.timeout))

    @endpoint(JobIdRequest)
    async def metrics(self, request: JobIdRequest) -> MetricsSnapshot:
        core = self._core
        core.metrics.footprint(rss_bytes=psutil.Process().memory_info().rss, job_records=len(core.table.all()),
                               stored_snapshots=await asyncio.to_thread(core.store.job_count), tasks=len(core.tasks))
        return core.metrics.snapshot()

    # -- clients: the supervisor ----------------------------------------------------------

    @endpoint(DrainRequest)
    async def drain(self, request: DrainRequest) -> DrainStarted:
        """Stop admitting (``Draining``), let running jobs end for ``timeout`` seconds, then
        shut the rest down through the protocol (cause ``drained``). Returns at once."""
        core = self._core
        live = core.stop_admitting("draining")
        self._drained_from = [r.id for r in live]
        starting = max((o.request_timeout + o.initialize_process_timeout for o in core.agents.values()), default=0.0)
        bound = request.timeout + max((r.shutdown_budget for r in live), default=0.0) + starting
        core.drivers.drain_later(live, request.timeout)
        return DrainStarted(bound=bound, live_jobs=len(live))

    @endpoint(DrainRequest)
    async def wait_drained(self, request: DrainRequest) -> DrainResult:
        """Wait (up to ``timeout``) until no job is live."""
        core = self._core
        live = core.table.live()
        if not await wait_ended(live, request.timeout):
            raise WaitTimeout(f"{sum(not r.is_terminal for r in live)} jobs still live after {request.timeout}s")
        records = [r for r in map(core.table.get, self._drained_from) if r is not None]
        shut_down = sum(1 for r in records if r.current.shutdown_trigger == Cause.DRAINED)
        return DrainResult(ended_on_their_own=len(records) - shut_down, shut_down=shut_down)

    @endpoint(JobIdRequest)
    async def stop(self, request: JobIdRequest) -> Ack:
        """Refuse new jobs, shut every live job down through the protocol, wait for them all."""
        core = self._core
        live = core.stop_admitting("stopping")
        for record in live:
            core.drivers.begin_shutdown(record, Cause.SUPERVISOR_STOPPED, "supervisor stopping")
        await wait_ended(live, None)
        await core.livekit.close(core.default_agent.control_call_timeout)  # last job statuses reach LiveKit first
        core.cluster.close()
        await core.autoscaler_request.close()  # no room is needed any more: idle nodes may go
        await core.snapshots.flush()
        await asyncio.to_thread(core.store.clear)  # a stopped supervisor leaves nothing to recover
        core.snapshots.close()
        return Ack()

    # -- LiveKit: one worker registration per agent, fronting the cluster -------------------

    @endpoint(AgentNameRequest)
    async def start_worker(self, request: AgentNameRequest) -> WorkerBridgeStatus:
        """Register the agent with its LiveKit server (idempotent); a restarted supervisor
        registers again by itself."""
        return self._core.livekit.register(self._core.resolve(request.agent_name))

    @endpoint(AgentNameRequest)
    async def worker_status(self, request: AgentNameRequest) -> WorkerBridgeStatus:
        return self._core.livekit.status(self._core.resolve(request.agent_name).agent_name)

    @endpoint(HealthRequest)
    async def health(self, request: HealthRequest) -> SupervisorHealth:
        """A cheap self-report for health probes: job count, draining, the LiveKit registration;
        ``with_load`` adds the load and fullness the worker bridge reports to LiveKit."""
        core = self._core
        opts = core.resolve(request.agent_name)
        try:
            bridge = core.livekit.status(opts.agent_name)
        except LiveKitNotConfigured:  # not registered with a LiveKit server
            bridge = None
        load = await core.worker_load(opts) if request.with_load else None
        return SupervisorHealth(
            agent_name=opts.agent_name, active_jobs=core.table.live_count, draining=not core.admission.admitting,
            worker_load=load.load if load else None, full=load.full if load else False,
            livekit_state=bridge.state if bridge else None, worker_id=bridge.worker_id if bridge else "")

    # -- job actors: their reports --------------------------------------------------------

    @endpoint(ShutdownStarted)
    async def report_shutdown_started(self, report: ShutdownStarted) -> None:
        """A job began shutting down on its own: start its deadline."""
        driver = self._core.drivers.get(report.job_id)
        if driver is not None:
            driver.shutdown_started(report)

    @endpoint(ParticipantsChanged)
    async def report_participants(self, report: ParticipantsChanged) -> None:
        driver = self._core.drivers.get(report.job_id)
        if driver is not None:
            driver.participants_changed(report)

    @endpoint(MemoryReport)
    async def report_memory(self, report: MemoryReport) -> None:
        """The job's resident memory (see ``JobDriver.memory`` for the policy)."""
        driver = self._core.drivers.get(report.job_id)
        if driver is not None:
            driver.memory(report)
