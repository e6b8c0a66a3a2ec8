"""The job actor: one Ray actor per job, running the user's ``entrypoint(ctx)``.

``JobRunner`` is the job in plain asyncio: its end conditions, and its steps of the
lifecycle it shares with participant actors (``lifecycle.RunnerLifecycle``: one state
enum, one shutdown sequence); ``JobActor`` is the thin Ray actor around it that speaks
msgpack records with the supervisor. The graceful budget is enforced from outside by the
supervisor, which kills this actor when it is spent: nothing here has to be trusted to finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

import ray
from livekit import rtc

from ..agents.job import JobProcess, LiveKitAccess, job_context_class, make_job
from ..agents.options import EndWhen, WorkerOptions, forget_secret
from ..agents.room import RemoteParticipant
from ..logs import JsonFormatter, ReadableFormatter, install_record_fields
from ..messages import (
    Ack,
    Cause,
    JobOutcome,
    JobStart,
    JobDescription,
    ActorStarted,
    JobState,
    MemoryReport,
    ParticipantsChanged,
    ShutdownRequest,
    ShutdownStarted,
    decode,
    encode,
    endpoint,
)
from ..rooms.base import RoomConnection
from ..errors import ConnectFailed, NotConnected
from ..rooms.livekit import LiveKitRoomConnection
from ..rooms.local import LocalRoomConnection
from ..rooms.records import RelayAction, RelayRequest
from .memory import MemoryMonitor
from .participants import ParticipantManager
from .lifecycle import RunnerLifecycle, RunnerState, describe_exception
from . import main_thread_registries

logger = logging.getLogger("rayvisor.job")

main_thread_registries.install_in_ray_workers()  # agents' livekit plugins load on actor threads

ROOM_ENDING_KINDS = frozenset({
    rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
    rtc.ParticipantKind.PARTICIPANT_KIND_SIP,
})
"""Participants whose presence keeps a job alive under ``EndWhen.ROOM_EMPTY``."""


class JobReporter(Protocol):
    """How a job tells its supervisor what it decided on its own."""

    def shutdown_started(self, record: ShutdownStarted) -> None: ...

    def participants_changed(self, record: ParticipantsChanged) -> None: ...


class JobRunner:
    """Runs one job: entrypoint, end conditions, and the shutdown sequence, once."""

    def __init__(self, opts: WorkerOptions, start: JobStart, proc: JobProcess,
                 connection: RoomConnection, reporter: JobReporter,
                 job_actor: Callable[[], Any] = lambda: None, livekit: LiveKitAccess | None = None,
                 namespace: str = "") -> None:
        self._opts = opts
        self._start = start
        self._reporter = reporter
        self._reports = 0
        self._life: RunnerLifecycle[Cause, JobOutcome] = RunnerLifecycle(
            self, name="job", logger=logger, step_timeout=opts.control_call_timeout,
            task_context=lambda: self.ctx._task_context())
        self.ctx = job_context_class(bool(opts.livekit_agents_context))(
            job=make_job(job_id=start.job_id, room=start.room, metadata=start.metadata,
                         agent_name=start.agent_name, dispatch_id=start.dispatch_id),
            proc=proc,
            worker_id=start.worker_id,
            identity=start.identity,
            connection=connection,
            request_shutdown=lambda cause, reason, error: self.request_shutdown(cause, reason, error),
            room_poll_timeout=opts.room_poll_timeout,
            on_participant_entrypoint=lambda entry: self.participants.on_entrypoint(entry),
            participant_name=start.name,
            participant_attributes=start.attributes,
            participant_metadata=start.participant_metadata,
            livekit=livekit,
            namespace=namespace,
        )
        self.participants = ParticipantManager(
            ctx=self.ctx, opts=opts, start=start, job_actor=job_actor, on_change=self._on_participants_changed)
        room = self.ctx._room
        room.on("connected", self._on_participants_changed)
        room.on("connected", self.participants.on_connected)
        room._listen_records(self.participants.on_record)
        room.on("participant_connected", self._on_participants_changed)
        room.on("participant_disconnected", self._on_participant_disconnected)
        room.on("disconnected", self._on_disconnected)

    # -- lifecycle (the shared ``RunnerLifecycle``) -------------------------------------

    def start(self) -> None:
        """Start the entrypoint in its own task. Returning from it does not end the job."""
        self._life.start(lambda: self._opts.entrypoint_fnc(self.ctx))

    def request_shutdown(self, cause: Cause, reason: str = "", error: str | None = None,
                         *, from_supervisor: bool = False) -> None:
        """Start the shutdown sequence in its own task; later requests are ignored."""
        if not self._life.begin_shutdown(cause, reason, error):
            return
        if not from_supervisor:
            # Sent synchronously so the supervisor starts the deadline even if the
            # shutdown task never gets to run (a blocked or hostile loop).
            self._reporter.shutdown_started(ShutdownStarted(
                job_id=self._start.job_id, attempt=self._start.attempt, cause=cause, reason=reason, error=error))
        # Children start stopping now, alongside the entrypoint's cancellation, within their share.
        self.participants.begin_stop_all(self._opts.shutdown_process_timeout)

    @property
    def state(self) -> RunnerState:
        return self._life.state

    @property
    def job_id(self) -> str:
        return self._start.job_id

    @property
    def cause(self) -> Cause | None:
        return self._life.cause

    @property
    def reason(self) -> str:
        return self._life.reason

    @property
    def first_error(self) -> str | None:
        return self._life.first_error

    async def wait_done(self) -> JobOutcome:
        return await self._life.wait_done()

    # -- the job's steps of the shared shutdown sequence (``ShutdownSteps``) --------------

    def entrypoint_failed(self, err: Exception) -> None:
        if isinstance(err, ConnectFailed):
            if self._life.cause != Cause.CONNECT_FAILED:  # else already recorded by ctx.connect
                self.request_shutdown(Cause.CONNECT_FAILED, "could not join the room", str(err))
            return
        logger.error("entrypoint raised", exc_info=err)
        self.request_shutdown(Cause.ENTRYPOINT_ERROR, error=describe_exception(err))

    async def stop_children(self) -> None:
        await self.participants.wait_stopped()

    def shutdown_callbacks(self) -> list[Callable[..., Any]]:
        return self.ctx.shutdown_callbacks

    async def leave_room(self) -> None:
        await self.ctx._room._disconnect()

    async def release(self) -> None:
        await self.ctx._release()

    def outcome(self) -> JobOutcome:
        assert self._life.cause is not None
        return JobOutcome(
            state=JobState.FAILED if self._life.errors else JobState.SUCCEEDED,
            cause=self._life.cause, reason=self._life.reason, error=self._life.error,
            participant_actors=self.participants.infos(),
        )

    # -- end conditions from the room ----------------------------------------------

    def _on_participants_changed(self, _participant: RemoteParticipant | None = None) -> None:
        self._reports += 1
        self._reporter.participants_changed(ParticipantsChanged(
            job_id=self._start.job_id, attempt=self._start.attempt, version=self._reports, identities=sorted(self.ctx._room.remote_participants),
            actors=self.participants.infos()))

    async def relay(self, request: RelayRequest) -> None:
        """Act on the room for a participant actor (it has no connection of its own)."""
        if request.action == RelayAction.SHUTDOWN:
            self.ctx.shutdown(request.reason)
        elif request.action == RelayAction.DELETE_ROOM:
            await self.ctx.delete_room()
        else:
            local = self.ctx._room.local_participant
            if request.action == RelayAction.SEND and request.text is not None:
                await local.send_text(request.text, topic=request.topic,
                                      destination_identities=request.destination_identities)
            elif request.action == RelayAction.SEND:
                await local.publish_data(request.data or b"", topic=request.topic,
                                         destination_identities=request.destination_identities)
            elif request.action == RelayAction.SET_ATTRIBUTES:
                await local.set_attributes(request.attributes)
            elif request.action == RelayAction.SET_METADATA:
                await local.set_metadata(request.metadata)

    def _on_participant_disconnected(self, participant: RemoteParticipant) -> None:
        self._on_participants_changed()
        if self._opts.end_when != EndWhen.ROOM_EMPTY or participant.kind not in ROOM_ENDING_KINDS:
            return
        if not any(p.kind in ROOM_ENDING_KINDS for p in self.ctx._room.remote_participants.values()):
            self.request_shutdown(Cause.ROOM_EMPTY, "all standard and SIP participants left")

    def _on_disconnected(self, reason: int) -> None:
        if reason == rtc.DisconnectReason.ROOM_DELETED:
            self.request_shutdown(Cause.ROOM_DELETED, "room deleted")
        else:
            name = rtc.DisconnectReason.Name(reason) if reason in dict(rtc.DisconnectReason.items()).values() else reason
            self.request_shutdown(Cause.ROOM_DISCONNECTED, f"disconnected from the room: {name}")


def after_this_reply(callback: Callable[[], Any]) -> None:
    """Call ``callback`` once the running actor method's reply has gone to Ray.

    Ray resolves an async actor call in a done-callback of the method's task, scheduled
    when the method returns. A callback scheduled from inside the method would run before
    it; rescheduled once more, it runs after it."""
    loop = asyncio.get_running_loop()
    loop.call_soon(loop.call_soon, callback)


class _SupervisorReporter:
    """Fire-and-forget reports to the supervisor (never awaited: the job must not block on it)."""

    def __init__(self, supervisor: Any) -> None:
        self._supervisor = supervisor

    def shutdown_started(self, record: ShutdownStarted) -> None:
        if self._supervisor is not None:
            self._supervisor.report_shutdown_started.remote(encode(record))

    def participants_changed(self, record: ParticipantsChanged) -> None:
        if self._supervisor is not None:
            self._supervisor.report_participants.remote(encode(record))


@ray.remote(num_cpus=0, max_restarts=0)
class JobActor:
    """One job's process. All calls take and return msgpack records."""

    def __init__(self, opts: WorkerOptions, supervisor: Any, namespace: str) -> None:
        forget_secret()
        self._opts = opts
        self._supervisor = supervisor
        self._namespace = namespace
        self._proc = JobProcess()
        self._prewarmed = False
        self._runner: JobRunner | None = None
        self._runner_ready = asyncio.Event()
        self._early_shutdown: ShutdownRequest | None = None
        self._memory: MemoryMonitor | None = None

    def _prewarm(self) -> None:
        if not self._prewarmed and self._opts.prewarm_fnc is not None:
            self._opts.prewarm_fnc(self._proc)
        self._prewarmed = True

    async def prewarm(self) -> bytes:
        """Run ``prewarm_fnc`` now (a warm-pool actor), so a job taking this actor starts at
        once; returns where the actor runs (the pool follows its node)."""
        self._prewarm()
        return encode(ActorStarted(pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id()))

    def _configure_logging(self, start: JobStart) -> None:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if start.log_format == "json" else ReadableFormatter())
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger().setLevel(logging.INFO)
        install_record_fields(lambda: {
            "job_id": start.job_id, "room": start.room, **(self._runner.ctx.log_context_fields if self._runner else {})
        })

    async def start(self, data: bytes) -> bytes:
        """Prewarm if needed and prepare the job; returns where it runs. With ``start.run``
        the entrypoint starts right after this reply has been handed to Ray (so an entrypoint
        that blocks the loop from its first line cannot hold the reply back); otherwise a
        separate ``run`` call starts it.
        """
        start = decode(data, JobStart)
        if self._runner is not None:  # a restarted supervisor asking again: same answer
            return encode(ActorStarted(pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id()))
        self._configure_logging(start)
        self._prewarm()
        connection: RoomConnection
        livekit = LiveKitAccess(url=start.url, api_token=start.api_token, room_token=start.token) if start.url else None
        if livekit is not None:
            connection = LiveKitRoomConnection(
                start.url, start.token, connect_timeout=self._opts.room_connect_timeout,
                call_timeout=self._opts.control_call_timeout, room_api=lambda: runner.ctx.api)
        else:
            connection = LocalRoomConnection(self._namespace, call_timeout=self._opts.control_call_timeout)
        runner = self._runner = JobRunner(
            self._opts, start, self._proc, connection, _SupervisorReporter(self._supervisor),
            job_actor=lambda: ray.get_runtime_context().current_actor, livekit=livekit, namespace=self._namespace)
        self._runner_ready.set()
        self._memory = MemoryMonitor(
            interval=self._opts.memory_check_interval,
            report=lambda rss_mb: self._supervisor.report_memory.remote(
                encode(MemoryReport(job_id=start.job_id, attempt=start.attempt, rss_mb=rss_mb)))
            if self._supervisor is not None else None,
        )
        self._memory.start()
        if self._early_shutdown is not None:
            self._runner.request_shutdown(self._early_shutdown.cause, self._early_shutdown.reason, from_supervisor=True)
        if start.run:
            after_this_reply(runner.start)
        return encode(ActorStarted(pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id()))

    async def run(self) -> bytes:
        """Start the entrypoint (a no-op if the job is already shutting down)."""
        if self._runner is not None:
            self._runner.start()
        return encode(Ack())

    async def wait_done(self) -> bytes:
        """Resolves when the shutdown sequence has completed (the job's outcome)."""
        await self._runner_ready.wait()
        assert self._runner is not None
        outcome = await self._runner.wait_done()
        if self._memory is not None:
            self._memory.stop()
        return encode(outcome)

    async def shutdown(self, data: bytes) -> bytes:
        """Begin the shutdown protocol (returns at once; the supervisor holds the deadline)."""
        request = decode(data, ShutdownRequest)
        if self._runner is None:
            self._early_shutdown = self._early_shutdown or request
        else:
            self._runner.request_shutdown(request.cause, request.reason, from_supervisor=True)
        return encode(Ack())

    async def ping(self) -> bytes:
        return encode(Ack())

    async def describe(self) -> bytes:
        """Where the job stands, for a supervisor that restarted and lost reports meanwhile."""
        runner = self._runner
        if runner is None:
            raise NotConnected("the job has not started")
        return encode(JobDescription(
            job_id=runner.job_id, shutting_down=runner.state in (RunnerState.SHUTTING_DOWN, RunnerState.DONE),
            cause=runner.cause, reason=runner.reason, error=runner.first_error))

    @endpoint(RelayRequest)
    async def relay(self, request: RelayRequest) -> None:
        """A participant actor's room action, performed on this job's connection."""
        if self._runner is None:
            raise NotConnected("the job has not started")
        await self._runner.relay(request)
