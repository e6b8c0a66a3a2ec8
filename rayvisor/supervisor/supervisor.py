"""The supervisor actor: admits jobs, runs one actor per job attempt, holds every deadline.

One detached, named async actor per namespace, pinned to the node of the driver that
served it. It never awaits a job actor without a deadline: status comes from its own
table, shutdown requests are fire-and-forget, and the supervisor's own timers kill a job
whose graceful budget is spent, that stops answering pings, or that outgrows its memory
limit. Restart policies (OTP's temporary / transient / permanent, with a restart
intensity) decide whether an ended attempt is followed by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from typing import Any

import psutil
import ray

from ..agents.job import make_job
from ..agents.options import WorkerOptions
from ..agents.request import Answer, JobRequest, LoadInfo
from ..aio import supervised_task
from ..errors import (
    AtCapacity,
    Draining,
    DuplicateJob,
    InvalidJobSpec,
    JobNotFound,
    JobRejected,
    MetadataTooLarge,
    UnknownAgent,
    WaitTimeout,
)
from ..logs import configure as configure_logging
from ..messages import (
    Ack,
    AgentRegistered,
    ActorStarted,
    AgentNameRequest,
    AttemptInfo,
    Cause,
    DrainRequest,
    DrainResult,
    DrainStarted,
    EventsRequest,
    JobIdRequest,
    JobInfo,
    JobList,
    JobOrigin,
    JobSpec,
    JobStart,
    JobState,
    MemoryReport,
    MetricsSnapshot,
    ParticipantsChanged,
    ShutdownJobRequest,
    ShutdownRequest,
    ShutdownStarted,
    TransitionList,
    WaitRequest,
    WorkerBridgeStatus,
    encode,
    endpoint,
    now,
)
from ..rooms.local import evict_participant
from .capacity import Bundle, Demand, job_bundle, shortage
from .cluster_view import SLOT_RESOURCE, ClusterSnapshot, ClusterView
from .job_handle import JOB_ACTOR_PREFIX, ActorFate, ActorGone, JobActorHandle, StartError
from .job_table import AttemptEnd, JobRecord, JobTable
from .credentials import LiveKitCredentials
from .livekit_dispatch import LiveKitDispatch
from .metrics import SupervisorMetrics
from .pool import WarmPools
from .restart_policy import ABNORMAL_ENDS, EndedAttempt, restart_decision
from .settings import SupervisorSettings
from .start_slots import StartSlots
from .store import AttemptEndRecord, JobSnapshot, SupervisorStore, monotonic_to_wall, wall_to_monotonic
from .worker_bridge import WorkerLoad
from ..actors import main_thread_registries

logger = logging.getLogger("rayvisor.supervisor")

main_thread_registries.install_in_ray_workers()  # agents' livekit plugins load on actor threads

SUPERVISOR_NAME = "rayvisor-supervisor"
LIVE_BEFORE_SHUTDOWN = (JobState.PENDING, JobState.STARTING, JobState.RUNNING)
PING_JITTER = 0.1
"""Pings are spread by +-10% of ``ping_interval`` so many jobs do not ping in lockstep."""


_GONE = object()
"""``resume`` value for a recovered job whose actor no longer exists."""


def restarted_by_ray() -> bool:
    """Whether Ray restarted this actor (``max_restarts``): what
    ``RuntimeContext.was_current_actor_reconstructed`` says, without its deprecation warning
    (it reads the deprecated ``actor_id`` property), which would break ``start``'s JSON logs."""
    try:
        import ray._private.state as ray_state

        info = ray_state.actors(actor_id=ray.get_runtime_context().get_actor_id())
        return bool(info) and info["NumRestarts"] != 0
    except (ImportError, AttributeError, KeyError):  # a Ray whose private actor table moved
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class _DispatchHost:
    """What LiveKit dispatch asks of the supervisor (``DispatchHost``). A plain object the
    actor holds, so these hooks, which take Python objects rather than records, are not
    methods of the actor class and cannot be called remotely."""

    def __init__(self, supervisor: "Supervisor") -> None:
        self._supervisor = supervisor

    @property
    def admitting(self) -> bool:
        return self._supervisor._admitting

    @property
    def jobs(self) -> JobTable:
        return self._supervisor._table

    def agent_options(self, agent_name: str) -> WorkerOptions:
        return self._supervisor._resolve_agent(agent_name)

    def existing_job(self, spec: JobSpec) -> JobRecord | None:
        return self._supervisor._existing(spec)

    async def admit(self, spec: JobSpec, opts: WorkerOptions) -> JobRecord:
        return await self._supervisor._admit(spec, opts)

    def run_job(self, record: JobRecord, opts: WorkerOptions) -> None:
        self._supervisor._run_dispatched(record, opts)

    def reject(self, record: JobRecord, cause: Cause, reason: str) -> None:
        self._supervisor._reject(record, cause, reason)

    def begin_shutdown(self, record: JobRecord, cause: Cause, reason: str) -> None:
        self._supervisor._begin_shutdown(record, cause, reason, notify_actor=True)

    async def worker_load(self, opts: WorkerOptions) -> WorkerLoad:
        return await self._supervisor._worker_load(opts)


def new_job_id() -> str:
    return "RJ_" + uuid.uuid4().hex[:16]


@ray.remote(num_cpus=0, max_restarts=-1)
class Supervisor:
    """See the module docstring. Every public method takes and returns msgpack records."""

    def __init__(self, opts: WorkerOptions, namespace: str, log_format: str = "json",
                 settings: SupervisorSettings | None = None) -> None:
        configure_logging("start" if log_format == "json" else "dev")
        self._settings = settings or SupervisorSettings.from_options(opts)  # set once, for every agent
        self._default_agent = opts
        self._agents: dict[str, WorkerOptions] = {}
        self._namespace = namespace
        self._log_format = log_format
        self._worker_id = "RW_" + uuid.uuid4().hex[:12]
        self._metrics = SupervisorMetrics(self._worker_id)
        self._store = SupervisorStore(namespace)
        self._table = JobTable(finished_job_history=self._settings.finished_job_history,
                               event_history=self._settings.event_history,
                               on_change=self._on_change, on_evict=self._store.delete_job)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._admitting = True
        self._refusal = ""
        self._drained_from: list[str] = []
        self._livekit = LiveKitDispatch(_DispatchHost(self), self._store, self._tasks)
        self._cluster = ClusterView(interval=self._settings.cluster_view_interval, on_change=self._cluster_changed,
                                    tasks=self._tasks)
        self._start_slots = StartSlots(lambda: self._settings.max_concurrent_starts or self._cluster.cpu_count)
        self._pools = WarmPools(demand=self._demand, totals=lambda: self._cluster.totals,
                                lost_nodes=lambda: self._cluster.lost_nodes, max_jobs=lambda: self._settings.max_jobs,
                                metrics=self._metrics, start_slots=self._start_slots)
        self._pools_take_slots = self._cluster.slots_in_use
        self._agents[opts.agent_name] = opts
        if restarted_by_ray():
            # Ray restarted us (max_restarts=-1): take the jobs of the previous incarnation back.
            for agent in self._store.agents():
                self._agents[agent.agent_name] = agent
            self._livekit.resume()  # first, so what recovery changes is reported to LiveKit
            self._recover()
        else:  # a new supervisor: whatever an earlier one left in this namespace is not ours
            self._store.clear()
            self._kill_strays(keep=set())

    # -- agents ----------------------------------------------------------------------

    async def register_agent(self, opts: WorkerOptions, settings: SupervisorSettings | None = None) -> bytes:
        """Register (or replace, for new jobs) the agent named ``opts.agent_name``; the reply
        names the supervisor-wide settings it asked for (``settings``, or its own options)
        that this supervisor keeps otherwise."""
        conflicts = self._settings.conflicts(settings or SupervisorSettings.from_options(opts))
        if conflicts:
            logger.warning("agent %r asks for supervisor-wide settings this supervisor keeps otherwise: %s",
                           opts.agent_name, "; ".join(conflicts))
        self._pools.stop(opts.agent_name)
        self._agents[opts.agent_name] = opts
        self._store.put_agent(opts)
        self._start_pool(opts)
        return encode(AgentRegistered(agent_name=opts.agent_name, conflicts=conflicts))

    def _start_pool(self, opts: WorkerOptions) -> None:
        if self._admitting:
            self._pools.start(opts, create=lambda: self._new_actor(opts, "idle-" + uuid.uuid4().hex[:12]),
                              bundle=lambda: self._bundle(opts))

    def _resolve_agent(self, name: str | None) -> WorkerOptions:
        if name is None:
            if len(self._agents) == 1:
                return next(iter(self._agents.values()))
            raise UnknownAgent(f"several agents are registered ({sorted(self._agents)}); set JobSpec.agent_name")
        opts = self._agents.get(name)
        if opts is None:
            raise UnknownAgent(f"no agent named {name!r} is registered; registered: {sorted(self._agents)}")
        return opts

    def _new_actor(self, opts: WorkerOptions, suffix: str) -> JobActorHandle:
        return JobActorHandle.create(name=JOB_ACTOR_PREFIX + suffix, opts=opts,
                                     supervisor=ray.get_runtime_context().current_actor, namespace=self._namespace,
                                     slot=self._cluster.slots_in_use)

    # -- capacity: jobs first, the warm pool only what is left ----------------------------

    def _bundle(self, opts: WorkerOptions) -> Bundle:
        """What one job actor of ``opts`` asks Ray for."""
        return job_bundle(opts.job_resources, slot_resource=SLOT_RESOURCE if self._cluster.slots_in_use else None)

    def _demand(self) -> Demand:
        """What the live jobs hold, or will hold once started (see ``capacity``)."""
        demand = Demand()
        for record in self._table.live():
            demand.add_job(record.agent_name, self._bundle(self._agents.get(record.agent_name, self._default_agent)),
                           waiting=record.state == JobState.PENDING)
        return demand

    def _cluster_changed(self, snapshot: ClusterSnapshot) -> None:
        """A node joined or was lost: the pools follow (lost idle actors stop counting, new
        room may be prewarmed)."""
        logger.info("the cluster changed: %d live nodes, %s", len(snapshot.alive_nodes),
                    {k: v for k, v in snapshot.totals.items() if k in (SLOT_RESOURCE, "CPU", "GPU")})
        if self._cluster.slots_in_use and not self._pools_take_slots:
            # The first slot node: idle actors created before it hold no slot (and may sit on
            # the head); pools start afresh with actors that take one.
            self._pools_take_slots = True
            for opts in self._agents.values():
                self._start_pool(opts)
        self._pools.nodes_changed()

    # -- persistence and recovery -------------------------------------------------------

    def _on_change(self, record: JobRecord) -> None:
        """Every transition: snapshot it, and tell the LiveKit server about dispatched jobs."""
        self._persist(record)
        self._livekit.job_changed(record)
        self._pools.rebalance_soon()  # a job admitted, started or ended: what the pools may hold changed

    def _persist(self, record: JobRecord, *, attempt_end: AttemptEnd | None = None) -> None:
        """Snapshot the record; ``attempt_end`` (or a kill's end) is the current attempt's
        end when it is known before the transition that records it."""
        attempt_end = attempt_end or record.kill_end
        self._store.put_job(JobSnapshot(
            info=record.info(), spec=record.spec, shutdown_budget=record.shutdown_budget,
            restart_policy=record.restart_policy, attempt=record.attempt, actor_name=record.actor_name,
            deadline_at=monotonic_to_wall(record.deadline), shutdown_trigger=record.shutdown_trigger,
            restart_times=[monotonic_to_wall(t) for t in record.restart_times],
            agent_identity=record.agent_identity, agent_participant_name=record.agent_participant_name,
            agent_attributes=record.agent_attributes, agent_metadata=record.agent_metadata,
            attempt_end=None if attempt_end is None else AttemptEndRecord(
                state=attempt_end.state, cause=attempt_end.cause, reason=attempt_end.reason, error=attempt_end.error),
        ))

    def _recover(self) -> None:
        """Rebuild the table from the snapshots the previous incarnation wrote, and go on
        driving every live job whose actor is still there (its deadline included)."""
        snapshots = sorted(self._store.jobs(), key=lambda snap: max(snap.info.timestamps.values(), default=0.0))
        for snap in snapshots:
            try:
                self._recover_job(snap)
            except Exception:  # one bad record must not crash-loop the supervisor
                logger.exception("cannot recover job %s", snap.info.id)
        self._kill_strays(keep={r.actor_name for r in self._table.live() if r.actor_name})
        self._metrics.active_jobs(len(self._table.live()))
        for opts in self._agents.values():
            self._start_pool(opts)

    def _kill_strays(self, keep: set[str]) -> None:
        """Kill the namespace's job actors that are nobody's job (idle actors of an earlier
        incarnation, leftovers of a supervisor that was removed without stopping its jobs)."""
        for actor in ray.util.list_named_actors(all_namespaces=True):
            name = actor["name"]
            if actor["namespace"] == self._namespace and name.startswith(JOB_ACTOR_PREFIX) and name not in keep:
                handle = JobActorHandle.attach(name, self._namespace)
                if handle is not None:
                    handle.kill()

    def _recover_job(self, snap: JobSnapshot) -> None:
        info = snap.info
        record = JobRecord(
            id=info.id, spec=snap.spec, agent_name=info.agent_name, shutdown_budget=snap.shutdown_budget,
            state=info.state, cause=info.cause, reason=info.reason, error=info.error, pid=info.pid,
            node_id=info.node_id, restarts=info.restarts, participants=list(info.participants),
            participant_actors=list(info.participant_actors), timestamps=dict(info.timestamps),
            restart_policy=snap.restart_policy, attempts=list(info.attempts), attempt=snap.attempt,
            actor_name=snap.actor_name, deadline=wall_to_monotonic(snap.deadline_at),
            shutdown_trigger=snap.shutdown_trigger, agent_identity=snap.agent_identity,
            agent_participant_name=snap.agent_participant_name, agent_attributes=dict(snap.agent_attributes),
            agent_metadata=snap.agent_metadata,
        )
        record.restart_times.extend(wall_to_monotonic(t) for t in snap.restart_times)
        if snap.attempt_end is not None and not info.state.is_terminal:  # ended, but not yet recorded
            end = snap.attempt_end
            record.kill_end = AttemptEnd(end.state, end.cause, end.reason, end.error)
            record.killed.set()
        self._table.restore(record)
        if record.is_terminal:
            return
        if record.state == JobState.PENDING:  # request_fnc's answer was lost with the old process
            self._table.transition(record, JobState.REJECTED, cause=Cause.REJECTED,
                                   reason="the supervisor restarted before the job was admitted")
            return
        opts = self._agents.get(record.agent_name)
        handle = JobActorHandle.attach(record.actor_name, self._namespace) if record.actor_name else None
        if opts is None:  # its agent could not be loaded: do not run it with another agent's options
            if handle is not None:
                handle.kill()
            self._table.transition(record, JobState.FAILED, cause=Cause.START_FAILED,
                                   error=f"agent {record.agent_name!r} could not be recovered")
            return
        logger.warning("recovering job %s (%s) after a supervisor restart", record.id, record.state.value,
                       extra={"job_id": record.id, "room": record.spec.room})
        # A job still waiting for a start slot had no actor yet: it starts afresh.
        queued = record.actor_name is None and record.state == JobState.STARTING
        supervised_task(self._run_job(record, opts, resume=None if queued else handle or _GONE), name=f"job:{record.id}",
                        logger=logger, tasks=self._tasks)
        if record.state == JobState.SHUTTING_DOWN and record.deadline is not None:
            # A deadline that passed while no supervisor watched: the job may have finished
            # its shutdown and be holding its outcome; it gets a moment to hand it over.
            record.deadline = max(record.deadline, time.monotonic() + opts.failover_outcome_grace)
            self._arm_deadline(record)

    # -- admission --------------------------------------------------------------------

    @endpoint(JobSpec)
    async def submit(self, spec: JobSpec) -> JobInfo:
        """Admit a job: capacity is reserved here, atomically; then ``request_fnc`` decides.
        A spec naming the id of an existing job (same room and agent) returns that job."""
        existing = self._existing(spec)
        if existing is not None:
            return existing.info()
        if spec.origin == JobOrigin.LIVEKIT:
            raise InvalidJobSpec("origin 'livekit' is set by the worker bridge for LiveKit's dispatches only")
        self._check_admitting()
        opts = self._resolve_agent(spec.agent_name)
        record = await self._admit(spec, opts)
        supervised_task(self._run_job(record, opts), name=f"job:{record.id}", logger=logger, tasks=self._tasks)
        return record.info()

    def _existing(self, spec: JobSpec) -> JobRecord | None:
        record = self._table.get(spec.job_id) if spec.job_id else None
        if record is not None and (record.spec.room != spec.room
                                   or spec.agent_name is not None and record.agent_name != spec.agent_name):
            raise DuplicateJob(f"job id {spec.job_id!r} is already used by a job of agent {record.agent_name!r} "
                               f"in room {record.spec.room!r}")
        return record

    async def _admit(self, spec: JobSpec, opts: WorkerOptions) -> JobRecord:
        """Check, reserve capacity (atomically: a PENDING record counts), then ``request_fnc``."""
        self._check_admitting()
        size = len(spec.metadata.encode("utf-8"))
        if size > self._settings.max_metadata_bytes:
            raise MetadataTooLarge(
                f"metadata is {size} bytes; the limit is max_metadata_bytes={self._settings.max_metadata_bytes}")
        if (spec.token or spec.url) and not opts.uses_livekit:
            raise InvalidJobSpec(f"a token or url needs agent {opts.agent_name!r} to be configured for LiveKit "
                                 "(ws_url, api_key, api_secret)")
        load = await self._load()
        if self._resource_shortage(opts):
            await self._cluster.refresh()  # a node may have joined since the last read: look before refusing
        self._check_capacity(opts, load)
        if spec.job_id and self._table.get(spec.job_id) is not None:  # admitted meanwhile (the await above)
            raise DuplicateJob(f"job {spec.job_id!r} is already being admitted")
        record = JobRecord(id=spec.job_id or new_job_id(), spec=spec, agent_name=opts.agent_name,
                           shutdown_budget=opts.shutdown_process_timeout,
                           restart_policy=spec.restart or opts.restart)
        self._table.add(record)  # from here the job counts against capacity
        self._metrics.active_jobs(len(self._table.live()))
        if opts.request_fnc is not None:
            await self._ask(opts, record)
        self._metrics.admitted(opts.agent_name)
        return record

    def _check_admitting(self) -> None:
        if not self._admitting:
            self._metrics.rejected("draining")
            raise Draining(f"the supervisor is {self._refusal} and admits no new jobs")

    async def _load(self, *, admitting: bool = True) -> float | None:
        """``load_fnc``'s answer, computed in a thread so user code cannot stall the
        supervisor's loop; it fails closed (an error or no answer in time is full load).
        ``admitting``: a refusal here turns a job away (and is counted)."""
        settings = self._settings
        if settings.load_fnc is None:
            return None
        info = LoadInfo(active_jobs=len(self._table.live()), max_jobs=settings.max_jobs, idle_actors=self._pools.idle)
        try:
            load = await asyncio.wait_for(asyncio.to_thread(settings.load_fnc, info), settings.load_timeout)
            return float(load)
        except asyncio.TimeoutError:
            if admitting:
                self._metrics.rejected("at_capacity")
            raise AtCapacity(f"load_fnc did not answer within load_timeout={settings.load_timeout}s") from None
        except Exception as err:
            logger.exception("load_fnc failed")
            if admitting:
                self._metrics.rejected("at_capacity")
            raise AtCapacity(f"load_fnc failed ({type(err).__name__}: {err}); refusing jobs until it works") from None

    def _check_capacity(self, opts: WorkerOptions, load: float | None) -> None:
        """Synchronous, so the check and the reservation that follows it are atomic."""
        problem = self._capacity_problem(opts, load)
        if problem is not None:
            self._metrics.rejected("at_capacity")
            raise AtCapacity(problem)

    def _capacity_problem(self, opts: WorkerOptions, load: float | None) -> str | None:
        """Why one more job of ``opts`` would be over capacity, or None."""
        settings = self._settings
        live = self._table.live()
        if settings.max_jobs is not None and len(live) >= settings.max_jobs:
            return f"{len(live)} jobs are running; max_jobs={settings.max_jobs}"
        if load is not None and load >= settings.load_threshold:
            return f"load {load:.2f} is at or above load_threshold={settings.load_threshold}"
        short = self._resource_shortage(opts)
        return f"not enough free Ray resources: {short}" if short else None

    def _resource_shortage(self, opts: WorkerOptions) -> dict[str, str]:
        """What one more job of ``opts`` would lack (nothing for an ``allow_pending`` agent:
        past the resources its job waits for a node, the autoscaler's cue)."""
        if opts.allow_pending:
            return {}
        return shortage(self._bundle(opts), self._cluster.totals, self._demand().held)

    async def _ask(self, opts: WorkerOptions, record: JobRecord) -> None:
        """Run ``request_fnc``; a rejection (or no answer in time) records REJECTED and raises."""
        request = JobRequest(make_job(job_id=record.id, room=record.spec.room, metadata=record.spec.metadata,
                                      agent_name=opts.agent_name, dispatch_id=record.spec.dispatch_id))
        problem = ""
        try:
            await asyncio.wait_for(opts.request_fnc(request), opts.request_timeout)  # as LiveKit Agents does
        except asyncio.TimeoutError:
            problem = f"request_fnc did not answer within request_timeout={opts.request_timeout}s"
        except Exception as err:
            logger.exception("request_fnc raised")
            problem = f"request_fnc raised {type(err).__name__}: {err}"
        if record.is_terminal:  # stopped while request_fnc was deciding
            raise JobRejected(f"job {record.id} ended while request_fnc was deciding ({record.cause})")
        if request.answer is Answer.ACCEPTED and request.acceptance is not None and not problem:
            record.agent_identity = request.acceptance.identity
            record.agent_participant_name = request.acceptance.name
            record.agent_attributes = request.acceptance.attributes
            record.agent_metadata = request.acceptance.metadata
            return
        reason = problem or ("rejected by request_fnc" if request.answer is Answer.REJECTED
                             else "request_fnc neither accepted nor rejected the job")
        self._table.transition(record, JobState.REJECTED, cause=Cause.REJECTED, reason=reason)
        self._metrics.rejected("request_fnc")
        self._metrics.active_jobs(len(self._table.live()))
        raise JobRejected(f"job {record.id}: {reason}")

    # -- client endpoints -------------------------------------------------------------

    @endpoint(JobIdRequest)
    async def status(self, request: JobIdRequest) -> JobInfo:
        return self._record(request.job_id).info()

    @endpoint(JobIdRequest)
    async def list_jobs(self, request: JobIdRequest) -> JobList:
        """Every job in the table, without metadata (``status`` has it), so the reply stays
        small however large the history (the request's job id is ignored)."""
        return JobList(jobs=[r.info(with_metadata=False) for r in self._table.all()])

    @endpoint(ShutdownJobRequest)
    async def shutdown(self, request: ShutdownJobRequest) -> JobInfo:
        """Start the shutdown protocol for a job (idempotent)."""
        record = self._record(request.job_id)
        self._begin_shutdown(record, Cause.USER_SHUTDOWN, request.reason, notify_actor=True)
        return record.info()

    @endpoint(WaitRequest)
    async def wait(self, request: WaitRequest) -> JobInfo:
        """The job's terminal record, waiting up to ``timeout`` seconds for it."""
        record = self._record(request.job_id)
        if record.is_terminal:
            return record.info()
        try:
            await asyncio.wait_for(record.finished.wait(), request.timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"job {record.id} is still {record.state.value} after {request.timeout}s") from None
        return record.info()

    @endpoint(EventsRequest)
    async def events(self, request: EventsRequest) -> TransitionList:
        """State transitions after ``after_seq`` (long-poll up to ``timeout``)."""
        return TransitionList(events=await self._table.events_after(request.after_seq, request.timeout))

    @endpoint(JobIdRequest)
    async def metrics(self, request: JobIdRequest) -> MetricsSnapshot:
        self._metrics.footprint(rss_bytes=psutil.Process().memory_info().rss, job_records=len(self._table.all()),
                                stored_snapshots=await asyncio.to_thread(self._store.job_count),
                                tasks=len(self._tasks))
        return self._metrics.snapshot()

    @endpoint(DrainRequest)
    async def drain(self, request: DrainRequest) -> DrainStarted:
        """Stop admitting (``Draining``), let running jobs end for ``timeout`` seconds, then
        shut the rest down through the protocol (cause ``drained``). Returns at once."""
        live = self._stop_admitting("draining")
        self._drained_from = [r.id for r in live]
        starting = max((o.request_timeout + o.initialize_process_timeout for o in self._agents.values()), default=0.0)
        bound = request.timeout + max((r.shutdown_budget for r in live), default=0.0) + starting
        supervised_task(self._drain(live, request.timeout), name="drain", logger=logger, tasks=self._tasks)
        return DrainStarted(bound=bound, live_jobs=len(live))

    @endpoint(DrainRequest)
    async def wait_drained(self, request: DrainRequest) -> DrainResult:
        """Wait (up to ``timeout``) until no job is live."""
        live = self._table.live()
        if live:
            done, pending = await asyncio.wait([asyncio.ensure_future(r.finished.wait()) for r in live],
                                               timeout=request.timeout)
            for future in pending:
                future.cancel()
            if pending:
                raise WaitTimeout(f"{len(pending)} jobs still live after {request.timeout}s")
        records = [r for r in (self._table.get(i) for i in self._drained_from) if r is not None]
        shut_down = sum(1 for r in records if r.shutdown_trigger == Cause.DRAINED)
        return DrainResult(ended_on_their_own=len(records) - shut_down, shut_down=shut_down)

    async def _drain(self, live: list[JobRecord], timeout: float) -> None:
        waits = [asyncio.ensure_future(r.finished.wait()) for r in live]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            for future in pending:
                future.cancel()
        for record in self._table.live():
            self._begin_shutdown(record, Cause.DRAINED, f"drain deadline ({timeout}s) reached", notify_actor=True)

    @endpoint(JobIdRequest)
    async def stop(self, request: JobIdRequest) -> Ack:
        """Refuse new jobs, shut every live job down through the protocol, wait for them all."""
        live = self._stop_admitting("stopping")
        for record in live:
            self._begin_shutdown(record, Cause.SUPERVISOR_STOPPED, "supervisor stopping", notify_actor=True)
        if live:
            await asyncio.wait([asyncio.ensure_future(r.finished.wait()) for r in live])
        await self._livekit.close(self._default_agent.control_call_timeout)  # last job statuses reach LiveKit first
        self._cluster.close()
        self._store.clear()  # a stopped supervisor leaves nothing to recover
        return Ack()

    def _stop_admitting(self, why: str) -> list[JobRecord]:
        self._admitting, self._refusal = False, why
        self._pools.close()
        self._livekit.set_draining()
        return self._table.live()

    async def ping(self) -> str:
        return self._worker_id

    # -- LiveKit: one worker registration per agent, fronting the cluster ------------------

    @endpoint(AgentNameRequest)
    async def start_worker(self, request: AgentNameRequest) -> WorkerBridgeStatus:
        """Register the agent with its LiveKit server (idempotent); a restarted supervisor
        registers again by itself."""
        return self._livekit.register(self._resolve_agent(request.agent_name))

    @endpoint(AgentNameRequest)
    async def worker_status(self, request: AgentNameRequest) -> WorkerBridgeStatus:
        return self._livekit.status(self._resolve_agent(request.agent_name).agent_name)

    # -- what LiveKit dispatch asks of the supervisor (through _DispatchHost, not remotely) --

    def _run_dispatched(self, record: JobRecord, opts: WorkerOptions) -> None:
        self._persist(record)  # its token, before anything can go wrong
        supervised_task(self._run_job(record, opts), name=f"job:{record.id}", logger=logger, tasks=self._tasks)

    def _reject(self, record: JobRecord, cause: Cause, reason: str) -> None:
        self._table.transition(record, JobState.REJECTED, cause=cause, reason=reason)
        self._metrics.active_jobs(len(self._table.live()))

    async def _worker_load(self, opts: WorkerOptions) -> WorkerLoad:
        """The cluster's load as one worker reports it: ``load_fnc`` if given, else live jobs
        over capacity (``max_jobs`` or the cluster's slots); full when a job would be refused."""
        live = self._table.live()
        draining = not self._admitting
        try:
            load = await self._load(admitting=False)
        except AtCapacity:
            return WorkerLoad(load=1.0, full=True, job_count=len(live), draining=draining)
        full = draining or self._capacity_problem(opts, load) is not None
        if load is None:
            capacity = self._settings.max_jobs or (self._cluster.slots if self._cluster.slots_in_use else 0)
            load = len(live) / capacity if capacity else (1.0 if full else 0.0)
        return WorkerLoad(load=min(1.0, max(0.0, load)), full=full, job_count=len(live), draining=draining)

    # -- job endpoints ----------------------------------------------------------------

    @endpoint(ShutdownStarted)
    async def report_shutdown_started(self, report: ShutdownStarted) -> None:
        """A job began shutting down on its own: start its deadline."""
        record = self._table.get(report.job_id)
        if record is not None and record.attempt == report.attempt:
            self._begin_shutdown(record, report.cause, report.reason, error=report.error, notify_actor=False)

    @endpoint(ParticipantsChanged)
    async def report_participants(self, report: ParticipantsChanged) -> None:
        record = self._table.get(report.job_id)
        if (record is not None and not record.is_terminal and record.attempt == report.attempt
                and report.version > record.participants_version):
            record.participants_version = report.version
            record.participants = list(report.identities)
            record.participant_actors = list(report.actors)
            self._persist(record)

    @endpoint(MemoryReport)
    async def report_memory(self, report: MemoryReport) -> None:
        """Warn above ``job_memory_warn_mb``; above ``job_memory_limit_mb`` shut the job down,
        and kill it at once if it is already shutting down for that and still growing."""
        record = self._table.get(report.job_id)
        if (record is None or record.attempt != report.attempt
                or record.state not in (JobState.RUNNING, JobState.SHUTTING_DOWN)):
            return
        opts = self._agents.get(record.agent_name, self._default_agent)
        previous, record.rss_mb = record.rss_mb, report.rss_mb
        limit, warn = opts.job_memory_limit_mb, opts.job_memory_warn_mb
        if limit and report.rss_mb > limit:
            text = f"resident memory {report.rss_mb:.0f} MiB is over job_memory_limit_mb={limit:g}"
            if record.state == JobState.RUNNING:
                self._begin_shutdown(record, Cause.MEMORY_LIMIT, text, notify_actor=True)
            elif previous is not None and report.rss_mb > previous:  # shutting down, yet still growing
                self._kill_attempt(record, Cause.MEMORY_LIMIT, text + " and still growing during shutdown")
        elif warn and report.rss_mb > warn and time.monotonic() - record.last_memory_warning >= opts.memory_warn_interval:
            warned_at = record.rss_mb_at_last_warning
            record.last_memory_warning, record.rss_mb_at_last_warning = time.monotonic(), report.rss_mb
            growth = f"{report.rss_mb - warned_at:+.0f} MiB since the last warning" if warned_at is not None else "first warning"
            logger.warning("job %s uses %.0f MiB (job_memory_warn_mb=%g; %s)", record.id, report.rss_mb, warn, growth,
                           extra={"job_id": record.id, "room": record.spec.room, "rss_mb": round(report.rss_mb, 1)})

    # -- the job lifecycle ----------------------------------------------------------

    def _record(self, job_id: str) -> JobRecord:
        record = self._table.get(job_id)
        if record is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, or dropped from the finished-job history)")
        return record

    async def _run_job(self, record: JobRecord, opts: WorkerOptions, resume: Any = None) -> None:
        """Run attempts until one ends for good; whatever goes wrong, no job is left live
        with nobody driving it. ``resume``: the live actor of a recovered job (or ``_GONE``)."""
        try:
            while True:
                began = now()
                if resume is not None:
                    end, resume = await self._resume_attempt(record, resume, opts), None
                else:
                    end = await self._run_attempt(record, opts)
                record.attempts.append(AttemptInfo(
                    attempt=record.attempt, state=end.state, cause=end.cause, error=end.error,
                    pid=record.pid, node_id=record.node_id, started_at=began, ended_at=now()))
                # A killed or crashed attempt never left its room; take its participant out.
                evict_participant(self._namespace, record.spec.room, record.identity)
                decision = self._restart_decision(record, end, opts)
                if decision is None:
                    self._finish(record, end)
                    return
                if decision is Cause.RESTART_LIMIT:
                    self._finish(record, AttemptEnd(JobState.FAILED, Cause.RESTART_LIMIT, end.reason, (
                        f"{opts.max_restarts} restarts within restart_window={opts.restart_window}s; "
                        f"last attempt ended with {end.cause.value}: {end.error or ''}").strip()))
                    return
                self._restart(record, end)
        except Exception as err:
            logger.exception("driving job %s failed", record.id, extra={"job_id": record.id})
            self._disarm_deadline(record)
            if record.actor is not None:
                record.actor.kill()
            if not record.is_terminal:
                cause = Cause.START_FAILED if record.pid is None else Cause.ACTOR_CRASHED
                self._table.transition(record, JobState.FAILED, cause=cause, error=f"{type(err).__name__}: {err}")
                self._metrics.ended(JobState.FAILED.value, cause.value)
            evict_participant(self._namespace, record.spec.room, record.identity)
        finally:
            self._metrics.active_jobs(len(self._table.live()))

    async def _run_attempt(self, record: JobRecord, opts: WorkerOptions) -> AttemptEnd:
        """One actor's run of the job, from taking an actor to its outcome, death or kill."""
        if record.kill_end is not None:  # killed (deadline passed) before it even had an actor
            return record.kill_end
        if record.state == JobState.PENDING:
            self._table.transition(record, JobState.STARTING)
        start = self._job_start(record, opts)
        claim = (self._pools.take(opts.agent_name)
                 if self._admitting and not record.shutdown_requested.is_set() else None)
        pooled = await self._claimed_actor(record, claim) if claim is not None else None
        while True:
            # A cold start waits for a start slot (a few actors at a time start fast, many at
            # once all start slowly); its initialize_process_timeout runs from its turn.
            cold = pooled is None and not opts.allow_pending
            if cold and not await self._take_start_slot(record):
                # Shut down (or killed) while it waited: it never had an actor, nothing ran.
                return record.kill_end or AttemptEnd(JobState.SUCCEEDED, record.shutdown_trigger or Cause.USER_SHUTDOWN,
                                                     record.reason)
            async with self._start_slot_held(cold):
                handle = pooled or self._new_actor(opts, record.id + (f"-{record.attempt}" if record.attempt > 1 else ""))
                record.actor, record.actor_name = handle, handle.name
                self._persist(record)
                try:
                    if pooled is None and opts.allow_pending:
                        try:
                            await handle.wait_placed(opts.pending_timeout)
                        except asyncio.TimeoutError:
                            handle.kill()
                            return AttemptEnd(JobState.REJECTED, Cause.NO_CAPACITY, error=(
                                f"no node could take the job within pending_timeout={opts.pending_timeout}s"))
                    started = await self._start_unless_shut_down(record, handle, start, opts)
                    if started is None:  # shut down before its entrypoint ran: nothing to wait for
                        handle.kill()
                        return record.kill_end or AttemptEnd(
                            JobState.SUCCEEDED, record.shutdown_trigger or Cause.USER_SHUTDOWN, record.reason)
                    break
                except (ActorGone, StartError, asyncio.TimeoutError) as err:
                    lost_node = (isinstance(err, ActorGone) and pooled is None and record.kill_end is None
                                 and await self._death_cause(record, handle, opts) is Cause.NODE_LOST)
                    handle.kill()
                    if record.kill_end is not None:
                        return record.kill_end
                    if pooled is not None and isinstance(err, ActorGone):
                        pooled = None  # an idle actor that died while waiting: try a cold one
                        continue
                    if lost_node:
                        return AttemptEnd(JobState.FAILED, Cause.NODE_LOST, error=str(err))
                    detail = str(err) or f"did not start within initialize_process_timeout={opts.initialize_process_timeout}s"
                    return AttemptEnd(JobState.FAILED, Cause.START_FAILED, error=detail)
        record.pid, record.node_id = started.pid, started.node_id
        handle.run()
        if record.state == JobState.STARTING:
            self._table.transition(record, JobState.RUNNING)
            self._metrics.job_started(time.monotonic() - record.attempt_began)
        else:
            self._persist(record)  # no transition follows: keep pid and node in the snapshot
        return await self._follow_attempt(record, handle, opts)

    async def _claimed_actor(self, record: JobRecord,
                             claim: "asyncio.Future[JobActorHandle | None]") -> JobActorHandle | None:
        """The warm-pool actor the job took: at once if it was ready, else when its prewarm
        ends. None if that prewarm failed, or if the job is shut down first (the actor then
        goes back to its pool)."""
        await self._unless_shut_down(record, claim)
        return None if claim.cancelled() else claim.result()

    @staticmethod
    async def _unless_shut_down(record: JobRecord, step: asyncio.Future[Any]) -> None:
        """Wait for ``step`` unless the job is shut down first; then (or if the caller is
        cancelled) ``step`` is cancelled. Returns once ``step`` has settled either way."""
        stop = asyncio.ensure_future(record.shutdown_requested.wait())
        try:
            await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not step.done():
                step.cancel()
        await asyncio.gather(step, return_exceptions=True)

    async def _start_unless_shut_down(self, record: JobRecord, handle: JobActorHandle, start: JobStart,
                                      opts: WorkerOptions) -> ActorStarted | None:
        """Start the attempt's actor; None if the job is shut down first. Until ``start``
        returns no entrypoint has run (``run`` comes after), so there is nothing graceful to
        wait for: the caller kills the actor at once instead of letting the budget run out."""
        if record.shutdown_requested.is_set():
            return None
        starting = asyncio.ensure_future(handle.start(start, opts.initialize_process_timeout))
        await self._unless_shut_down(record, starting)
        return None if starting.cancelled() else starting.result()

    async def _take_start_slot(self, record: JobRecord) -> bool:
        """Wait for a start slot; False (holding none) if the job is shut down or killed first."""
        if record.state == JobState.SHUTTING_DOWN or record.kill_end is not None:
            return False
        slot = asyncio.ensure_future(self._start_slots.acquire(job=True))
        await self._unless_shut_down(record, slot)  # a slot handed over meanwhile is passed on by acquire
        if slot.cancelled():
            return False
        if record.state == JobState.SHUTTING_DOWN or record.kill_end is not None:
            self._start_slots.release()
            return False
        return True

    @contextlib.asynccontextmanager
    async def _start_slot_held(self, cold: bool) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if cold:
                self._start_slots.release()

    def _job_start(self, record: JobRecord, opts: WorkerOptions) -> JobStart:
        """The attempt's start record. With LiveKit it carries the url and tokens minted here
        (or the dispatch's own room token), never the API secret."""
        name = record.agent_participant_name or opts.agent_name or record.identity
        url = token = api_token = ""
        credentials = LiveKitCredentials.of(opts)
        if credentials is not None:
            url = record.spec.url or credentials.url
            attributes = {**({"lk.agent.name": opts.agent_name} if opts.agent_name else {}), **record.agent_attributes}
            token = record.spec.token or credentials.room_token(
                room=record.spec.room, identity=record.identity, name=name, attributes=attributes,
                metadata=record.agent_metadata, permissions=opts.permissions, ttl=opts.token_ttl)
            api_token = credentials.api_token(room=record.spec.room, ttl=opts.token_ttl)
        return JobStart(
            job_id=record.id, room=record.spec.room, metadata=record.spec.metadata, agent_name=opts.agent_name,
            dispatch_id=record.spec.dispatch_id, worker_id=self._worker_id, identity=record.identity,
            attempt=record.attempt, name=record.agent_participant_name, attributes=record.agent_attributes,
            participant_metadata=record.agent_metadata, log_format=self._log_format,
            url=url, token=token, api_token=api_token)

    async def _resume_attempt(self, record: JobRecord, handle: Any, opts: WorkerOptions) -> AttemptEnd:
        """Take back the attempt a previous supervisor was driving."""
        if record.kill_end is not None:  # the previous supervisor ended it (the kill may not have landed)
            if handle is not _GONE:
                handle.kill()
            return record.kill_end
        if handle is _GONE:
            return AttemptEnd(JobState.FAILED, await self._death_cause(record, None, opts),
                              error="the job's actor was gone after a supervisor restart")
        record.actor = handle
        try:
            if record.pid is None:  # its start may not have completed: start is idempotent
                started = await handle.start(self._job_start(record, opts), opts.initialize_process_timeout)
                record.pid, record.node_id = started.pid, started.node_id
            handle.run()
            if record.state == JobState.STARTING:
                self._table.transition(record, JobState.RUNNING)
            self._persist(record)
        except (ActorGone, StartError, asyncio.TimeoutError) as err:
            cause = await self._death_cause(record, handle, opts) if isinstance(err, ActorGone) else None
            handle.kill()
            if record.kill_end is not None:
                return record.kill_end
            if cause is not None:
                return AttemptEnd(JobState.FAILED, cause, error=str(err))
            return AttemptEnd(JobState.FAILED, Cause.START_FAILED, error=str(err) or "did not start after recovery")
        try:
            # Reports sent while no supervisor was there are lost: ask where the job stands.
            described = await handle.describe(opts.control_call_timeout)
            if described.shutting_down and record.state == JobState.RUNNING and described.cause is not None:
                self._begin_shutdown(record, described.cause, described.reason, error=described.error,
                                     notify_actor=False)
            elif not described.shutting_down and record.state == JobState.SHUTTING_DOWN:
                # The request may have been lost with the old process: ask again (idempotent).
                handle.request_shutdown(ShutdownRequest(cause=record.shutdown_trigger or Cause.USER_SHUTDOWN,
                                                        reason=record.reason))
        except ActorGone:
            pass  # the attempt's own wait (below) records it
        except asyncio.TimeoutError:
            logger.warning("recovered job %s did not describe itself; pings and deadlines will judge it", record.id)
        return await self._follow_attempt(record, handle, opts)

    async def _death_cause(self, record: JobRecord, handle: JobActorHandle | None, opts: WorkerOptions) -> Cause:
        """``node_lost`` when the attempt died with its node, else ``actor_crashed``.

        Call it before killing ``handle``. A call to an actor on a crashed node fails at once,
        but Ray declares the node dead only once its health checks fail: Ray's verdict on the
        actor is awaited (up to ``death_verdict_timeout``). Without one (no handle, or none in
        time) the node's liveness decides. GCS queries run in a thread: a dead actor must not
        stall the supervisor's loop."""
        if handle is not None:
            fate = await handle.fate(opts.death_verdict_timeout)
            if fate is not ActorFate.UNDECIDED:
                return Cause.NODE_LOST if fate is ActorFate.DIED_WITH_NODE else Cause.ACTOR_CRASHED
            if record.node_id is None:
                record.node_id = await asyncio.to_thread(handle.node_id)
        if record.node_id is None:
            return Cause.ACTOR_CRASHED
        await self._cluster.refresh()  # a fresh read, in a thread (the pools follow a lost node too)
        return Cause.ACTOR_CRASHED if record.node_id in self._cluster.alive_nodes else Cause.NODE_LOST

    async def _follow_attempt(self, record: JobRecord, handle: Any, opts: WorkerOptions) -> AttemptEnd:
        """From RUNNING to the attempt's end: its outcome, its death, or a supervisor kill."""
        health = supervised_task(self._watch_health(record, handle, opts), name=f"health:{record.id}",
                                 logger=logger, tasks=self._tasks)
        done = asyncio.ensure_future(handle.wait_done())
        killed = asyncio.ensure_future(record.killed.wait())
        try:
            await asyncio.wait({done, killed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            health.cancel()
            killed.cancel()
        if record.kill_end is not None:
            done.cancel()
            return record.kill_end
        try:
            outcome = done.result()
        except ActorGone as err:
            cause = await self._death_cause(record, handle, opts)
            handle.kill()  # no restart, whatever Ray would do
            return AttemptEnd(JobState.FAILED, cause, error=str(err))
        record.participant_actors = list(outcome.participant_actors)
        cause = record.shutdown_trigger or outcome.cause
        state = outcome.state
        if cause in ABNORMAL_ENDS and state == JobState.SUCCEEDED:  # a clean shutdown of a sick job
            state = JobState.FAILED
        end = AttemptEnd(state, cause, outcome.reason,
                         outcome.error or (record.reason if state == JobState.FAILED else None))
        self._persist(record, attempt_end=end)  # before the kill: a successor must not take it for a crash
        handle.kill()  # detached actors do not go away by themselves
        return end

    def _restart_decision(self, record: JobRecord, end: AttemptEnd, opts: WorkerOptions) -> Cause | None:
        """See ``restart_policy.restart_decision``."""
        return restart_decision(
            record.restart_policy, EndedAttempt(state=end.state, cause=end.cause, trigger=record.shutdown_trigger),
            admitting=self._admitting, restart_times=record.restart_times, now=time.monotonic(),
            restart_window=opts.restart_window, max_restarts=opts.max_restarts)

    def _restart(self, record: JobRecord, end: AttemptEnd) -> None:
        """Same job id, new attempt on a new actor: it rejoins its room."""
        self._disarm_deadline(record)
        record.restarts += 1
        record.attempt += 1
        record.attempt_began = time.monotonic()
        record.kill_end, record.killed, record.shutdown_requested = None, asyncio.Event(), asyncio.Event()
        record.restart_times.append(time.monotonic())
        record.deadline = record.shutdown_trigger = record.shutdown_began = record.rss_mb = None
        record.cause, record.reason, record.error, record.pid = None, "", None, None
        record.rss_mb_at_last_warning = None
        record.actor = record.node_id = record.actor_name = None
        record.participants, record.participant_actors, record.participants_version = [], [], 0
        self._metrics.restarted(end.cause.value)
        logger.warning("restarting job %s after %s (restart %d)", record.id, end.cause.value, record.restarts,
                       extra={"job_id": record.id, "room": record.spec.room, "cause": end.cause.value})
        self._table.transition(record, JobState.STARTING, reason=f"restart after {end.cause.value}")

    def _finish(self, record: JobRecord, end: AttemptEnd) -> None:
        self._disarm_deadline(record)
        if record.is_terminal:
            return
        if end.state == JobState.SUCCEEDED and record.state != JobState.SHUTTING_DOWN:
            self._table.transition(record, JobState.SHUTTING_DOWN, cause=end.cause, reason=end.reason)
        self._table.transition(record, end.state, cause=end.cause, error=end.error)
        self._metrics.ended(end.state.value, end.cause.value)
        if record.shutdown_began is not None:
            self._metrics.job_shut_down(time.monotonic() - record.shutdown_began)

    def _begin_shutdown(self, record: JobRecord, cause: Cause, reason: str, *,
                        error: str | None = None, notify_actor: bool) -> None:
        """Record SHUTTING_DOWN with its deadline, tell the actor, and arm the kill timer."""
        if record.state not in LIVE_BEFORE_SHUTDOWN:
            return
        if self._livekit.withdraw_offer(record, cause, reason):
            record.shutdown_trigger = cause
            return  # offered to LiveKit, never assigned: nothing runs, so nothing to shut down
        record.deadline = time.monotonic() + record.shutdown_budget
        record.shutdown_trigger, record.shutdown_began = cause, time.monotonic()
        record.shutdown_requested.set()
        self._table.transition(record, JobState.SHUTTING_DOWN, cause=cause, reason=reason, error=error)
        if notify_actor and record.actor is not None:
            record.actor.request_shutdown(ShutdownRequest(cause=cause, reason=reason))
        self._arm_deadline(record)

    def _arm_deadline(self, record: JobRecord) -> None:
        self._disarm_deadline(record)
        record.deadline_task = supervised_task(
            self._enforce_deadline(record, record.attempt), name=f"deadline:{record.id}", logger=logger, tasks=self._tasks)

    @staticmethod
    def _disarm_deadline(record: JobRecord) -> None:
        """The attempt ended before its deadline: its timer must not outlive it (one per job)."""
        if record.deadline_task is not None:
            record.deadline_task.cancel()
            record.deadline_task = None

    async def _enforce_deadline(self, record: JobRecord, attempt: int) -> None:
        """Kill the attempt's actor when its graceful budget is spent, whatever its code does."""
        while record.attempt == attempt and record.deadline is not None and not record.is_terminal:
            remaining = record.deadline - time.monotonic()
            if remaining <= 0:
                self._kill_attempt(record, Cause.SHUTDOWN_TIMEOUT, (
                    f"shutdown did not complete within shutdown_process_timeout={record.shutdown_budget}s; the job's actor was killed"))
                return
            await asyncio.sleep(remaining)

    async def _watch_health(self, record: JobRecord, handle: JobActorHandle, opts: WorkerOptions) -> None:
        """Ping every ``ping_interval``; no answer within ``ping_timeout`` kills the attempt."""
        while record.actor is handle and record.state == JobState.RUNNING:
            await asyncio.sleep(opts.ping_interval * random.uniform(1 - PING_JITTER, 1 + PING_JITTER))
            if record.actor is not handle or record.state != JobState.RUNNING:
                return
            try:
                await handle.ping(opts.ping_timeout)
            except asyncio.TimeoutError:
                if record.actor is handle and record.state == JobState.RUNNING:
                    self._kill_attempt(record, Cause.UNRESPONSIVE,
                                       f"no answer to a ping within ping_timeout={opts.ping_timeout}s")
                return
            except ActorGone:
                return  # the attempt's own wait notices

    def _kill_attempt(self, record: JobRecord, cause: Cause, error: str) -> None:
        """Kill the current attempt's actor (its children die with it) and end the attempt."""
        if record.kill_end is not None or record.is_terminal:
            return
        record.kill_end = AttemptEnd(JobState.KILLED, cause, record.reason, error)
        self._persist(record)  # before the kill (kill_end is in it): a successor must not take it for a crash
        if record.actor is not None:
            record.actor.kill()
        self._metrics.killed(cause.value)
        record.killed.set()
