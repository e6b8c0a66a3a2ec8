"""The supervisor's parts, wired together: what the ``Supervisor`` actor's endpoints use.

``SupervisorCore`` is a plain object: its hooks (what LiveKit dispatch, the job table and
the cluster view call back) are methods here, not on the actor class, so no caller can
reach them remotely. It holds the agents the supervisor serves, with their warm pools.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import warnings
from typing import Any

import ray

from ..agents.options import WorkerOptions
from ..errors import JobNotFound, UnknownAgent
from ..messages import Cause, JobSpec, JobStart
from ..rooms.local import evict_participant
from .admission import Admission
from .attempt import AttemptEnd
from .autoscaler_request import AutoscalerRequest, RefusedDemand, autoscaler_bundles, headroom
from .cluster_view import SLOT_RESOURCE, ClusterSnapshot, ClusterView
from .credentials import LiveKitCredentials
from .job_driver import DriverServices, JobDrivers
from .job_handle import JOB_ACTOR_PREFIX, JobActorHandle
from .job_table import JobRecord, JobTable
from .livekit_dispatch import LiveKitDispatch
from .metrics import SupervisorMetrics
from .pool import WarmPools
from .recovery import Recovery, kill_strays, snapshot_of
from .settings import SupervisorSettings
from .start_slots import StartSlots
from .snapshot_writer import SnapshotWriter
from .store import SupervisorStore
from .worker_bridge import WorkerLoad

logger = logging.getLogger("rayvisor.supervisor")


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


class SupervisorCore:
    """See the module docstring. Built once per supervisor incarnation, inside the actor."""

    def __init__(self, opts: WorkerOptions, *, namespace: str, log_format: str,
                 settings: SupervisorSettings | None) -> None:
        self.settings = settings or SupervisorSettings.from_options(opts)  # set once, for every agent
        self.namespace = namespace
        self.worker_id = "RW_" + uuid.uuid4().hex[:12]
        self._log_format = log_format
        self._default_agent = opts
        self.agents: dict[str, WorkerOptions] = {opts.agent_name: opts}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.metrics = SupervisorMetrics(self.worker_id)
        self.store = SupervisorStore(namespace)
        self.snapshots = SnapshotWriter(self.store, self.tasks)
        self.table = JobTable(finished_job_history=self.settings.finished_job_history,
                              event_history=self.settings.event_history,
                              on_change=self._job_changed, on_evict=self.snapshots.delete)
        self.cluster = ClusterView(interval=self.settings.cluster_view_interval, on_change=self._cluster_changed,
                                   tasks=self.tasks, job_slots=self.settings.job_slots)
        refused = RefusedDemand(lambda: self.settings.refused_demand_timeout,
                                on_change=lambda: self.autoscaler_request.changed())
        self.admission = Admission(settings=self.settings, table=self.table, cluster=self.cluster,
                                   metrics=self.metrics, agent_options=self.options_of,
                                   idle_actors=lambda: self.pools.idle, refused=refused)
        self.start_slots = StartSlots(lambda: self.settings.max_concurrent_starts or self.cluster.cpu_count,
                                      refill_delay=lambda: self.settings.pool_refill_delay)
        self.pools = WarmPools(demand=self.admission.demand, totals=lambda: self.cluster.totals,
                               lost_nodes=lambda: self.cluster.lost_nodes, max_jobs=lambda: self.settings.max_jobs,
                               metrics=self.metrics, start_slots=self.start_slots)
        self._pools_take_slots = self.cluster.slots_in_use
        self.autoscaler_request = AutoscalerRequest(
            compute=self._autoscaler_bundles, interval=lambda: self.settings.autoscaler_request_interval,
            tasks=self.tasks, on_sent=lambda bundles: self.metrics.autoscaler_requested(len(bundles)))
        self.livekit = LiveKitDispatch(self, self.store, self.tasks)  # this object is its DispatchHost
        self.drivers = JobDrivers(DriverServices(
            table=self.table, metrics=self.metrics, pools=self.pools, start_slots=self.start_slots,
            cluster=self.cluster, new_actor=self._new_actor, job_start=self._job_start, persist=self._persist,
            flush=self.snapshots.flush,
            admitting=lambda: self.admission.admitting, withdraw_offer=self.livekit.withdraw_offer,
            evict=lambda record: evict_participant(namespace, record.spec.room, record.identity), tasks=self.tasks))
        if restarted_by_ray():
            # Ray restarted us (max_restarts=-1): take the jobs of the previous incarnation back.
            for agent in self.store.agents():
                self.agents[agent.agent_name] = agent
            self.livekit.resume()  # first, so what recovery changes is reported to LiveKit
            Recovery(store=self.store, table=self.table, drivers=self.drivers, namespace=namespace,
                     agent_options=self.agents.get).adopt()
            self.metrics.active_jobs(self.table.live_count)
            for agent in self.agents.values():
                self.start_pool(agent)
        else:  # a new supervisor: whatever an earlier one left in this namespace is not ours
            self.store.clear()
            kill_strays(namespace, keep=set())

    # -- agents and their pools -----------------------------------------------------------

    def register(self, opts: WorkerOptions) -> None:
        """Register (or replace, for new jobs) the agent named ``opts.agent_name``."""
        self.pools.stop(opts.agent_name)
        self.agents[opts.agent_name] = opts
        self.admission.agents_changed()
        self.store.put_agent(opts)
        self.start_pool(opts)

    def start_pool(self, opts: WorkerOptions) -> None:
        if self.admission.admitting:
            self.pools.start(opts, create=lambda: self._new_actor(opts, "idle-" + uuid.uuid4().hex[:12]),
                             bundle=lambda: self.admission.bundle(opts))

    def resolve(self, name: str | None) -> WorkerOptions:
        """The agent a request names (the only one, when it names none)."""
        if name is None:
            if len(self.agents) == 1:
                return next(iter(self.agents.values()))
            raise UnknownAgent(f"several agents are registered ({sorted(self.agents)}); set JobSpec.agent_name")
        opts = self.agents.get(name)
        if opts is None:
            raise UnknownAgent(f"no agent named {name!r} is registered; registered: {sorted(self.agents)}")
        return opts

    @property
    def default_agent(self) -> WorkerOptions:
        """The first agent (its options stand in where no agent is named)."""
        return self._default_agent

    def options_of(self, agent_name: str) -> WorkerOptions:
        """A job's agent options (the first agent's, for a job whose agent is gone)."""
        return self.agents.get(agent_name, self._default_agent)

    def stop_admitting(self, why: str) -> list[JobRecord]:
        """Refuse new jobs from now on; returns the live jobs."""
        self.admission.stop(why)
        self.admission.refused.clear()  # no retry will be admitted
        self.pools.close()
        self.livekit.set_draining()
        return self.table.live()

    # -- jobs -----------------------------------------------------------------------------

    async def admit(self, spec: JobSpec, opts: WorkerOptions) -> JobRecord:
        """Capacity, then ``request_fnc``: a PENDING record with its driver, or a typed error."""
        record = await self.admission.reserve(spec, opts)
        self.drivers.add(record, opts)  # from here a shutdown reaches it, even while request_fnc decides
        await self.admission.ask(record, opts)
        return record

    def record(self, job_id: str) -> JobRecord:
        record = self.table.get(job_id)
        if record is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, or dropped from the finished-job history)")
        return record

    def _new_actor(self, opts: WorkerOptions, suffix: str) -> JobActorHandle:
        return JobActorHandle.create(name=JOB_ACTOR_PREFIX + suffix, opts=opts,
                                     supervisor=ray.get_runtime_context().current_actor, namespace=self.namespace,
                                     slot=self.cluster.slots_in_use)

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
            dispatch_id=record.spec.dispatch_id, worker_id=self.worker_id, identity=record.identity,
            attempt=record.attempt, name=record.agent_participant_name, attributes=record.agent_attributes,
            participant_metadata=record.agent_metadata, log_format=self._log_format,
            url=url, token=token, api_token=api_token)

    def _persist(self, record: JobRecord, attempt_end: AttemptEnd | None = None) -> None:
        self.snapshots.put(snapshot_of(record, attempt_end))

    def _job_changed(self, record: JobRecord) -> None:
        """Every transition: snapshot it, tell the LiveKit server about dispatched jobs, let
        an ended job's driver go, and let the pools follow what jobs now hold."""
        self._persist(record)
        self.livekit.job_changed(record)
        self.drivers.job_changed(record)
        self.pools.rebalance_soon()
        self.autoscaler_request.changed()

    def _autoscaler_bundles(self) -> list[dict[str, float]]:
        """What Ray's autoscaler is asked to make room for (see ``autoscaler_request``): no
        headroom while no job is admitted, and none past ``max_jobs``."""
        ledger = self.pools.ledger()
        spare = [holding.bundle for holding in ledger.pools for _ in range(ledger.spare(holding))]
        free = headroom(self.settings.min_free_slots, admitting=self.admission.admitting,
                        max_jobs=self.settings.max_jobs, live_jobs=ledger.demand.jobs)
        default_agent = self.agents.get(self._default_agent.agent_name, self._default_agent)  # as registered now
        return autoscaler_bundles(jobs=ledger.demand.bundles, pool_spare=spare, headroom=free,
                                  headroom_bundle=self.admission.bundle(default_agent),
                                  refused=self.admission.refused.bundles())

    def _cluster_changed(self, snapshot: ClusterSnapshot) -> None:
        """A node joined or was lost: the pools follow (lost idle actors stop counting, new
        room may be prewarmed)."""
        logger.info("the cluster changed: %d live nodes, %s", len(snapshot.alive_nodes),
                    {k: v for k, v in snapshot.totals.items() if k in (SLOT_RESOURCE, "CPU", "GPU")})
        if self.cluster.slots_in_use and not self._pools_take_slots:
            # The first slot node: idle actors created before it hold no slot (and may sit on
            # the head); pools start afresh with actors that take one.
            self._pools_take_slots = True
            for opts in self.agents.values():
                self.start_pool(opts)
        self.pools.nodes_changed()
        self.autoscaler_request.changed()

    # -- DispatchHost: what LiveKit dispatch asks of the supervisor -------------------------

    @property
    def admitting(self) -> bool:
        return self.admission.admitting

    @property
    def jobs(self) -> JobTable:
        return self.table

    def agent_options(self, agent_name: str) -> WorkerOptions:
        return self.resolve(agent_name)

    def existing_job(self, spec: JobSpec) -> JobRecord | None:
        return self.admission.existing(spec)

    def run_job(self, record: JobRecord, opts: WorkerOptions) -> None:
        self._persist(record)  # its token, before anything can go wrong
        driver = self.drivers.get(record.id) or self.drivers.add(record, opts)
        driver.start()

    def reject(self, record: JobRecord, cause: Cause, reason: str) -> None:
        self.admission.reject(record, cause, reason)

    def begin_shutdown(self, record: JobRecord, cause: Cause, reason: str) -> None:
        self.drivers.begin_shutdown(record, cause, reason)

    async def worker_load(self, opts: WorkerOptions) -> WorkerLoad:
        return await self.admission.worker_load(opts)
