"""The supervisor actor: admits jobs, runs one actor per job, and holds every deadline.

One detached, named async actor per namespace, pinned to the node of the driver that
served it. It never awaits a job actor without a deadline: status comes from its own
table, shutdown requests are fire-and-forget, and a per-job timer kills any job whose
graceful budget is spent.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import ray

from ..agents.options import WorkerOptions
from ..aio import supervised_task
from ..errors import Draining, JobNotFound, MetadataTooLarge, UnknownAgent, WaitTimeout
from ..logs import configure as configure_logging
from ..messages import (
    Ack,
    Cause,
    EventsRequest,
    JobIdRequest,
    JobInfo,
    JobList,
    JobOutcome,
    JobSpec,
    JobStart,
    JobState,
    ParticipantsChanged,
    ShutdownJobRequest,
    ShutdownRequest,
    ShutdownStarted,
    TransitionList,
    WaitRequest,
    encode,
    endpoint,
)
from ..rooms.local import evict_participant
from .job_handle import ActorGone, JobActorHandle, StartError
from .job_table import JobRecord, JobTable

logger = logging.getLogger("rayvisor.supervisor")

SUPERVISOR_NAME = "rayvisor-supervisor"
LIVE_BEFORE_SHUTDOWN = (JobState.PENDING, JobState.STARTING, JobState.RUNNING)


def new_job_id() -> str:
    return "RJ_" + uuid.uuid4().hex[:16]


@ray.remote(num_cpus=0, max_restarts=-1)
class Supervisor:
    """See the module docstring. Every public method takes and returns msgpack records."""

    def __init__(self, opts: WorkerOptions, namespace: str) -> None:
        configure_logging("start")
        self._settings = opts  # supervisor-wide limits come from the agent that created it
        self._agents: dict[str, WorkerOptions] = {opts.agent_name: opts}
        self._namespace = namespace
        self._worker_id = "RW_" + uuid.uuid4().hex[:12]
        self._table = JobTable(
            finished_job_history=opts.finished_job_history, event_history=opts.event_history
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # -- agents ----------------------------------------------------------------------

    async def register_agent(self, opts: WorkerOptions) -> bytes:
        """Register (or replace, for new jobs) the agent named ``opts.agent_name``."""
        self._agents[opts.agent_name] = opts
        return encode(Ack())

    def _resolve_agent(self, name: str | None) -> WorkerOptions:
        if name is None:
            if len(self._agents) == 1:
                return next(iter(self._agents.values()))
            raise UnknownAgent(f"several agents are registered ({sorted(self._agents)}); set JobSpec.agent_name")
        opts = self._agents.get(name)
        if opts is None:
            raise UnknownAgent(f"no agent named {name!r} is registered; registered: {sorted(self._agents)}")
        return opts

    # -- client endpoints -------------------------------------------------------------

    @endpoint(JobSpec)
    async def submit(self, spec: JobSpec) -> JobInfo:
        """Validate and admit a job; it starts in the background. Returns its PENDING record."""
        opts = self._resolve_agent(spec.agent_name)
        size = len(spec.metadata.encode("utf-8"))
        if size > self._settings.max_metadata_bytes:
            raise MetadataTooLarge(
                f"metadata is {size} bytes; the limit is max_metadata_bytes={self._settings.max_metadata_bytes}"
            )
        if self._stopping:
            raise Draining("the supervisor is stopping and admits no new jobs")
        record = JobRecord(id=new_job_id(), spec=spec, agent_name=opts.agent_name,
                           shutdown_budget=opts.shutdown_process_timeout)
        self._table.add(record)
        supervised_task(self._run_job(record, opts), name=f"job:{record.id}", logger=logger, tasks=self._tasks)
        return record.info()

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
            raise WaitTimeout(
                f"job {record.id} is still {record.state.value} after {request.timeout}s"
            ) from None
        return record.info()

    @endpoint(EventsRequest)
    async def events(self, request: EventsRequest) -> TransitionList:
        """State transitions after ``after_seq`` (long-poll up to ``timeout``)."""
        return TransitionList(events=await self._table.events_after(request.after_seq, request.timeout))

    @endpoint(JobIdRequest)
    async def stop(self, request: JobIdRequest) -> Ack:
        """Refuse new jobs, shut every live job down through the protocol, wait for them all."""
        self._stopping = True
        live = self._table.live()
        for record in live:
            self._begin_shutdown(record, Cause.SUPERVISOR_STOPPED, "supervisor stopping", notify_actor=True)
        if live:
            await asyncio.wait([asyncio.ensure_future(r.finished.wait()) for r in live])
        return Ack()

    async def ping(self) -> str:
        return self._worker_id

    # -- job endpoints ----------------------------------------------------------------

    @endpoint(ShutdownStarted)
    async def report_shutdown_started(self, report: ShutdownStarted) -> None:
        """A job began shutting down on its own: start its deadline."""
        record = self._table.get(report.job_id)
        if record is not None:
            self._begin_shutdown(record, report.cause, report.reason, error=report.error, notify_actor=False)

    @endpoint(ParticipantsChanged)
    async def report_participants(self, report: ParticipantsChanged) -> None:
        record = self._table.get(report.job_id)
        if record is not None and not record.is_terminal and report.version > record.participants_version:
            record.participants_version = report.version
            record.participants = list(report.identities)
            record.participant_actors = list(report.actors)

    # -- the job lifecycle ----------------------------------------------------------

    def _record(self, job_id: str) -> JobRecord:
        record = self._table.get(job_id)
        if record is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, or dropped from the finished-job history)")
        return record

    def _self_handle(self) -> Any:
        return ray.get_runtime_context().current_actor

    async def _run_job(self, record: JobRecord, opts: WorkerOptions) -> None:
        """Drive one job to its end; whatever goes wrong, no job is left live with nobody driving it."""
        try:
            await self._drive_job(record, opts)
        except Exception as err:
            logger.exception("driving job %s failed", record.id, extra={"job_id": record.id})
            if record.actor is not None:
                record.actor.kill()
            if not record.is_terminal:
                cause = Cause.START_FAILED if record.pid is None else Cause.ACTOR_CRASHED
                self._table.transition(record, JobState.FAILED, cause=cause, error=f"{type(err).__name__}: {err}")
        finally:
            # A killed or crashed job never left its room; take its participant out (idempotent).
            evict_participant(self._namespace, record.spec.room, record.identity)

    async def _drive_job(self, record: JobRecord, opts: WorkerOptions) -> None:
        """Create the job's actor, start it, and wait for its outcome or its death."""
        handle = JobActorHandle.create(
            job_id=record.id, opts=opts, supervisor=self._self_handle(), namespace=self._namespace
        )
        record.actor = handle
        if record.state == JobState.PENDING:
            self._table.transition(record, JobState.STARTING)
        else:  # shut down before it even started: the actor runs the protocol with no entrypoint
            handle.request_shutdown(ShutdownRequest(cause=record.cause or Cause.USER_SHUTDOWN, reason=record.reason))
        start = JobStart(
            job_id=record.id, room=record.spec.room, metadata=record.spec.metadata,
            agent_name=opts.agent_name, dispatch_id=record.spec.dispatch_id,
            worker_id=self._worker_id, identity=record.identity,
        )
        try:
            started = await handle.start(start, opts.initialize_process_timeout)
        except (ActorGone, StartError, asyncio.TimeoutError) as err:
            handle.kill()
            if not record.is_terminal:
                detail = str(err) or f"did not start within initialize_process_timeout={opts.initialize_process_timeout}s"
                self._table.transition(record, JobState.FAILED, cause=Cause.START_FAILED, error=detail)
            return
        record.pid, record.node_id = started.pid, started.node_id
        handle.run()
        if record.state == JobState.STARTING:
            self._table.transition(record, JobState.RUNNING)
        try:
            outcome = await handle.wait_done()
        except ActorGone as err:
            handle.kill()  # unreachable is not necessarily dead: make sure it is
            if not record.is_terminal:
                self._table.transition(record, JobState.FAILED, cause=Cause.ACTOR_CRASHED, error=str(err))
            return
        handle.kill()  # detached actors do not go away by themselves
        self._finish(record, outcome)

    def _finish(self, record: JobRecord, outcome: JobOutcome) -> None:
        if record.is_terminal:  # killed at the deadline while the outcome was in flight
            return
        if record.state != JobState.SHUTTING_DOWN:  # the job's own report has not arrived yet
            self._table.transition(record, JobState.SHUTTING_DOWN, cause=outcome.cause, reason=outcome.reason)
        record.participant_actors = list(outcome.participant_actors)
        self._table.transition(record, outcome.state, error=outcome.error)

    def _begin_shutdown(self, record: JobRecord, cause: Cause, reason: str, *,
                        error: str | None = None, notify_actor: bool) -> None:
        """Record SHUTTING_DOWN with its deadline, tell the actor, and arm the kill timer."""
        if record.state not in LIVE_BEFORE_SHUTDOWN:
            return
        budget = record.shutdown_budget
        record.deadline = time.monotonic() + budget
        self._table.transition(record, JobState.SHUTTING_DOWN, cause=cause, reason=reason, error=error)
        if notify_actor and record.actor is not None:
            record.actor.request_shutdown(ShutdownRequest(cause=cause, reason=reason))
        supervised_task(self._enforce_deadline(record, budget), name=f"deadline:{record.id}",
                        logger=logger, tasks=self._tasks)

    async def _enforce_deadline(self, record: JobRecord, budget: float) -> None:
        """Kill the job's actor when its graceful budget is spent, whatever its code does."""
        while record.deadline is not None and not record.is_terminal:
            remaining = record.deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(remaining)
        if record.is_terminal or record.deadline is None:
            return
        if record.actor is not None:
            record.actor.kill()
        self._table.transition(
            record, JobState.KILLED, cause=Cause.SHUTDOWN_TIMEOUT,
            error=f"shutdown did not complete within shutdown_process_timeout={budget}s; the job's actor was killed",
        )
