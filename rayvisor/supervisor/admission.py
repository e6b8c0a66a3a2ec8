"""Admission: whether one more job may run, and the reservation that says it will.

A job is checked (draining, metadata size, capacity: ``max_jobs``, ``load_fnc``, the
cluster's free resources and slots), then reserved (a PENDING record in the table counts
against capacity from that moment, so two admissions cannot take the same room), then
offered to the agent's ``request_fnc``. Plain asyncio: the cluster is read through a
cached view, so tests run it with fakes and no Ray.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Protocol

from ..agents.job import make_job
from ..agents.options import WorkerOptions
from ..agents.request import Answer, JobRequest, LoadInfo
from ..errors import AtCapacity, Draining, DuplicateJob, InvalidJobSpec, JobRejected, MetadataTooLarge
from ..messages import Cause, JobSpec, JobState
from .autoscaler_request import RefusedDemand
from .capacity import Bundle, Demand, job_bundle, shortage
from .cluster_view import SLOT_RESOURCE
from .job_table import JobRecord, JobTable
from .metrics import SupervisorMetrics
from .settings import SupervisorSettings
from .worker_bridge import WorkerLoad

logger = logging.getLogger("rayvisor.supervisor")


class ClusterResources(Protocol):
    """What admission reads of the cluster (``ClusterView``)."""

    @property
    def totals(self) -> Mapping[str, float]: ...

    @property
    def slots_in_use(self) -> bool: ...

    @property
    def slots(self) -> float: ...

    async def refresh(self) -> None: ...


def new_job_id() -> str:
    return "RJ_" + uuid.uuid4().hex[:16]


class Admission:
    """See the module docstring. ``agent_options`` gives a live job's agent options (its
    bundle counts against the cluster); ``idle_actors`` the warm pools' ready actors;
    ``refused`` keeps the submits refused for lack of resources (the autoscaler's cue)."""

    def __init__(self, *, settings: SupervisorSettings, table: JobTable, cluster: ClusterResources,
                 metrics: SupervisorMetrics, agent_options: Callable[[str], WorkerOptions],
                 idle_actors: Callable[[], int], refused: RefusedDemand | None = None) -> None:
        self._settings = settings
        self._table = table
        self._cluster = cluster
        self._metrics = metrics
        self._agent_options = agent_options
        self._idle_actors = idle_actors
        self.refused = refused or RefusedDemand(lambda: settings.refused_demand_timeout)
        self._refusal: str | None = None
        self._demand: tuple[tuple[int, bool], Demand] | None = None
        """The last ``demand()``, with the table version and slot mode it was computed for."""

    # -- admitting or not -----------------------------------------------------------------

    @property
    def admitting(self) -> bool:
        return self._refusal is None

    def stop(self, why: str) -> None:
        """Admit nothing more (``why``: "draining", "stopping")."""
        self._refusal = why

    def check_admitting(self) -> None:
        if self._refusal is not None:
            self._metrics.rejected("draining")
            raise Draining(f"the supervisor is {self._refusal} and admits no new jobs")

    # -- admitting a job ------------------------------------------------------------------

    def existing(self, spec: JobSpec) -> JobRecord | None:
        """The job ``spec.job_id`` names, if any (``DuplicateJob`` if it is another room's or agent's)."""
        record = self._table.get(spec.job_id) if spec.job_id else None
        if record is not None and (record.spec.room != spec.room
                                   or spec.agent_name is not None and record.agent_name != spec.agent_name):
            raise DuplicateJob(f"job id {spec.job_id!r} is already used by a job of agent {record.agent_name!r} "
                               f"in room {record.spec.room!r}")
        return record

    async def reserve(self, spec: JobSpec, opts: WorkerOptions) -> JobRecord:
        """Check the job, then add its PENDING record (from here it counts against capacity)."""
        self.check_admitting()
        size = len(spec.metadata.encode("utf-8"))
        if size > self._settings.max_metadata_bytes:
            raise MetadataTooLarge(
                f"metadata is {size} bytes; the limit is max_metadata_bytes={self._settings.max_metadata_bytes}")
        if (spec.token or spec.url) and not opts.uses_livekit:
            raise InvalidJobSpec(f"a token or url needs agent {opts.agent_name!r} to be configured for LiveKit "
                                 "(ws_url, api_key, api_secret)")
        load = await self.load()
        if self.resource_shortage(opts):
            await self._cluster.refresh()  # a node may have joined since the last read: look before refusing
        self.check_admitting()  # a drain may have begun while load_fnc answered
        problem = self.limit_problem(load)  # no await from here to the reservation: atomic
        short = {} if problem else self.resource_shortage(opts)
        if short:
            self.refused.refused(opts.agent_name, spec.room, self.bundle(opts))
            problem = (f"not enough free Ray resources: {short}; the request to Ray's autoscaler now "
                       "counts this job, so a retry can succeed once the autoscaler has added a node")
        if problem is not None:
            self._metrics.rejected("at_capacity")
            raise AtCapacity(problem)
        if spec.job_id and self._table.get(spec.job_id) is not None:  # admitted meanwhile (the awaits above)
            raise DuplicateJob(f"job {spec.job_id!r} is already being admitted")
        record = JobRecord(id=spec.job_id or new_job_id(), spec=spec, agent_name=opts.agent_name,
                           shutdown_budget=opts.shutdown_process_timeout, restart_policy=spec.restart or opts.restart)
        self._table.add(record)
        self.refused.admitted(opts.agent_name, spec.room)
        self._metrics.active_jobs(self._table.live_count)
        return record

    async def ask(self, record: JobRecord, opts: WorkerOptions) -> None:
        """Run ``request_fnc`` (if the agent has one); a rejection, or no answer in time,
        records REJECTED and raises ``JobRejected``."""
        if opts.request_fnc is not None:
            await self._ask(record, opts)
        self._metrics.admitted(opts.agent_name)

    async def _ask(self, record: JobRecord, opts: WorkerOptions) -> None:
        assert opts.request_fnc is not None
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
        self._metrics.rejected("request_fnc")
        self.reject(record, Cause.REJECTED, reason)
        raise JobRejected(f"job {record.id}: {reason}")

    def reject(self, record: JobRecord, cause: Cause, reason: str) -> None:
        """End a job that never ran (refused, or withdrawn before LiveKit assigned it)."""
        self._table.transition(record, JobState.REJECTED, cause=cause, reason=reason)
        self._metrics.active_jobs(self._table.live_count)

    # -- capacity -------------------------------------------------------------------------

    def agents_changed(self) -> None:
        """An agent was registered again: its jobs' bundles may differ."""
        self._demand = None

    def bundle(self, opts: WorkerOptions) -> Bundle:
        """What one job actor of ``opts`` asks Ray for."""
        return job_bundle(opts.job_resources, slot_resource=SLOT_RESOURCE if self._cluster.slots_in_use else None)

    def demand(self) -> Demand:
        """What the live jobs hold, or will hold once started (see ``capacity``). Computed
        once per change of the table: a burst's admissions and the pools' rebalancing read it
        many times between two changes. Callers must not change it."""
        key = (self._table.version, self._cluster.slots_in_use)
        if self._demand is not None and self._demand[0] == key:
            return self._demand[1]
        demand = Demand()
        for record in self._table.live():
            demand.add_job(record.agent_name, self.bundle(self._agent_options(record.agent_name)),
                           waiting=record.state == JobState.PENDING)
        self._demand = (key, demand)
        return demand

    async def load(self, *, admitting: bool = True) -> float | None:
        """``load_fnc``'s answer, computed in a thread so user code cannot stall the loop; it
        fails closed (an error or no answer in time is ``AtCapacity``). ``admitting``: a
        refusal here turns a job away (and is counted)."""
        settings = self._settings
        if settings.load_fnc is None:
            return None
        info = LoadInfo(active_jobs=self._table.live_count, max_jobs=settings.max_jobs, idle_actors=self._idle_actors())
        try:
            return float(await asyncio.wait_for(asyncio.to_thread(settings.load_fnc, info), settings.load_timeout))
        except asyncio.TimeoutError:
            problem = f"load_fnc did not answer within load_timeout={settings.load_timeout}s"
        except Exception as err:
            logger.exception("load_fnc failed")
            problem = f"load_fnc failed ({type(err).__name__}: {err}); refusing jobs until it works"
        if admitting:
            self._metrics.rejected("at_capacity")
        raise AtCapacity(problem)

    def capacity_problem(self, opts: WorkerOptions, load: float | None) -> str | None:
        """Why one more job of ``opts`` would be over capacity, or None."""
        problem = self.limit_problem(load)
        if problem is not None:
            return problem
        short = self.resource_shortage(opts)
        return f"not enough free Ray resources: {short}" if short else None

    def limit_problem(self, load: float | None) -> str | None:
        """Why one more job would be over the supervisor's own limits (``max_jobs``, the load), or None."""
        settings = self._settings
        live = self._table.live_count
        if settings.max_jobs is not None and live >= settings.max_jobs:
            return f"{live} jobs are running; max_jobs={settings.max_jobs}"
        if load is not None and load >= settings.load_threshold:
            return f"load {load:.2f} is at or above load_threshold={settings.load_threshold}"
        return None

    def resource_shortage(self, opts: WorkerOptions) -> dict[str, str]:
        """What one more job of ``opts`` would lack (nothing for an ``allow_pending`` agent:
        past the resources its job waits for a node, the autoscaler's cue)."""
        if opts.allow_pending:
            return {}
        return shortage(self.bundle(opts), self._cluster.totals, self.demand().held)

    async def worker_load(self, opts: WorkerOptions) -> WorkerLoad:
        """The cluster's load as one LiveKit worker reports it: ``load_fnc`` if given, else
        live jobs over capacity (``max_jobs`` or the cluster's slots); full when a job would
        be refused."""
        live = self._table.live_count
        draining = not self.admitting
        try:
            load = await self.load(admitting=False)
        except AtCapacity:
            return WorkerLoad(load=1.0, full=True, job_count=live, draining=draining)
        full = draining or self.capacity_problem(opts, load) is not None
        if load is None:
            capacity = self._settings.max_jobs or (self._cluster.slots if self._cluster.slots_in_use else 0)
            load = live / capacity if capacity else (1.0 if full else 0.0)
        return WorkerLoad(load=min(1.0, max(0.0, load)), full=full, job_count=live, draining=draining)
