"""The LiveKit worker bridge: one agent worker registration fronting the whole cluster.

It speaks LiveKit's agent worker protocol (a websocket on ``<url>/agent``, bearer JWT with
the agent grant, binary protobuf ``WorkerMessage``/``ServerMessage``) on behalf of the
supervisor it lives in: it registers the agent, answers each ``AvailabilityRequest`` by
asking the supervisor (capacity, then ``request_fnc``), turns each ``JobAssignment`` into
a job, reports ``UpdateJobStatus`` as jobs move and ``UpdateWorkerStatus`` on an
interval, hands ``JobTermination`` to the shutdown protocol, and reconnects with backoff,
reporting still-running jobs with ``MigrateJobRequest``. Load is the cluster's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol

import aiohttp
from google.protobuf.message import DecodeError
from livekit.protocol import agent as agent_proto
from livekit.protocol import models as models_proto

from ..agents.options import WorkerOptions
from ..aio import supervised_task
from ..messages import BridgeState, JobState, WorkerBridgeStatus
from .credentials import LiveKitCredentials

logger = logging.getLogger("rayvisor.worker")

RECONNECT_JITTER = 0.2
"""Reconnect delays are spread by +-20% so a fleet does not reconnect in lockstep."""
REFUSED_STATUSES = frozenset({401, 403})


def _version() -> str:
    try:
        return metadata.version("rayvisor")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def agent_url(ws_url: str) -> str:
    """``<url>/agent`` with an http(s) scheme turned into ws(s), as livekit-agents does."""
    url = ws_url.rstrip("/")
    if url.startswith("http"):
        url = "ws" + url[len("http"):]
    return url + "/agent"


@dataclass(frozen=True)
class Offer:
    """The supervisor's answer to an ``AvailabilityRequest``."""

    available: bool
    identity: str = ""
    name: str = ""
    metadata: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    reason: str = ""


@dataclass(frozen=True)
class WorkerLoad:
    load: float
    full: bool
    job_count: int
    draining: bool


class WorkerHost(Protocol):
    """What the bridge needs from the supervisor."""

    async def offer_job(self, opts: WorkerOptions, job: agent_proto.Job) -> Offer: ...

    def assign_job(self, job_id: str, url: str, token: str) -> str | None:
        """Start an offered job; returns an error message if it cannot be started."""

    def terminate_job(self, job_id: str) -> None: ...

    async def worker_load(self, opts: WorkerOptions) -> WorkerLoad: ...

    def dispatched_jobs(self, agent_name: str) -> list[str]:
        """Ids of this agent's live jobs that a LiveKit server dispatched."""


def job_status(state: JobState) -> int | None:
    """The ``UpdateJobStatus`` a job state is reported as (None: not reported)."""
    if state == JobState.RUNNING:
        return agent_proto.JobStatus.JS_RUNNING
    if state == JobState.SUCCEEDED:
        return agent_proto.JobStatus.JS_SUCCESS
    if state in (JobState.FAILED, JobState.KILLED, JobState.REJECTED):
        return agent_proto.JobStatus.JS_FAILED
    return None


class WorkerBridge:
    """See the module docstring. Runs as a supervised task in the supervisor's loop."""

    def __init__(self, opts: WorkerOptions, credentials: LiveKitCredentials, host: WorkerHost) -> None:
        self._opts = opts
        self._credentials = credentials
        self._host = host
        self._url = agent_url(credentials.url)
        self._state = BridgeState.CONNECTING
        self._worker_id = ""
        self._registrations = 0
        self._failures = 0
        self._last_error = ""
        self._draining = False
        self._job_updates: deque[agent_proto.UpdateJobStatus] = deque()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[Any] | None = None

    @property
    def agent_name(self) -> str:
        return self._opts.agent_name

    def start(self) -> None:
        if self._main is None:
            self._main = supervised_task(self._run(), name=f"worker-bridge:{self.agent_name}", logger=logger,
                                         tasks=self._tasks)

    async def close(self, flush_timeout: float) -> None:
        """Send what is queued (bounded by ``flush_timeout``), then leave the server."""
        deadline = time.monotonic() + flush_timeout
        while self._job_updates and self._state == BridgeState.REGISTERED and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.02)
        self._state = BridgeState.CLOSED
        for task in list(self._tasks):
            task.cancel()

    def status(self) -> WorkerBridgeStatus:
        return WorkerBridgeStatus(
            agent_name=self.agent_name, url=self._url, state=self._state, worker_id=self._worker_id,
            registrations=self._registrations, failures=self._failures, last_error=self._last_error,
            draining=self._draining)

    # -- told by the supervisor ----------------------------------------------------

    def job_changed(self, job_id: str, state: JobState, error: str | None) -> None:
        """Queue the job's ``UpdateJobStatus`` (sent now, or after a reconnect)."""
        status = job_status(state)
        if status is None:
            return
        self._job_updates.append(agent_proto.UpdateJobStatus(job_id=job_id, status=status, error=error or ""))
        self._wake.set()

    def set_draining(self) -> None:
        """Report ``draining`` (and full) from now on, at once."""
        self._draining = True
        self._wake.set()

    # -- the connection -------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._opts.reconnect_initial_delay
        connect_timeout = aiohttp.ClientTimeout(total=None, connect=self._opts.control_call_timeout,
                                                sock_connect=self._opts.control_call_timeout)
        async with aiohttp.ClientSession(timeout=connect_timeout) as session:
            while self._state != BridgeState.CLOSED:
                registered_before, began = self._registrations, time.monotonic()
                try:
                    await self._session(session)
                    self._last_error = "the server closed the connection"
                    self._state = BridgeState.DISCONNECTED
                except asyncio.CancelledError:
                    raise
                except aiohttp.WSServerHandshakeError as err:
                    self._failures += 1
                    if err.status in REFUSED_STATUSES:
                        self._state = BridgeState.REFUSED
                        self._last_error = (f"LiveKit refused the worker registration at {self._url} "
                                            f"(HTTP {err.status}): check api_key and api_secret")
                    else:
                        self._state = BridgeState.DISCONNECTED
                        self._last_error = f"registration at {self._url} failed: HTTP {err.status} {err.message}"
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError, WorkerProtocolError) as err:
                    self._failures += 1
                    self._state = BridgeState.DISCONNECTED
                    self._last_error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                except Exception as err:  # a bug here must cost a reconnect, not the registration
                    logger.exception("LiveKit worker connection failed unexpectedly")
                    self._failures += 1
                    self._state = BridgeState.DISCONNECTED
                    self._last_error = f"{type(err).__name__}: {err}"
                stable = time.monotonic() - began >= self._opts.reconnect_max_delay
                if self._registrations > registered_before and stable:
                    delay = self._opts.reconnect_initial_delay  # it worked for a while: start over
                logger.warning("LiveKit worker connection: %s; reconnecting in %.1fs", self._last_error, delay)
                await asyncio.sleep(delay * random.uniform(1 - RECONNECT_JITTER, 1 + RECONNECT_JITTER))
                delay = min(delay * 2, self._opts.reconnect_max_delay)

    async def _session(self, session: aiohttp.ClientSession) -> None:
        """One websocket: register, migrate live jobs, then serve until it closes."""
        self._state = BridgeState.CONNECTING
        headers = {"Authorization": f"Bearer {self._credentials.worker_token()}"}
        timeout = self._opts.control_call_timeout
        async with session.ws_connect(self._url, headers=headers, heartbeat=self._opts.worker_heartbeat_interval,
                                      timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=timeout)) as ws:
            await asyncio.wait_for(ws.send_bytes(self._register_message().SerializeToString()), timeout)
            reply = await asyncio.wait_for(self._receive(ws), timeout)
            if reply is None or reply.WhichOneof("message") != "register":
                raise WorkerProtocolError("the server did not answer the registration")
            self._worker_id = reply.register.worker_id
            self._registrations += 1
            self._state = BridgeState.REGISTERED
            logger.info("registered with LiveKit at %s as worker %s (agent %r)", self._url, self._worker_id,
                        self.agent_name)
            live = self._host.dispatched_jobs(self.agent_name)
            if live:  # after a reconnect or a supervisor restart: these jobs are still ours
                await ws.send_bytes(agent_proto.WorkerMessage(
                    migrate_job=agent_proto.MigrateJobRequest(job_ids=live)).SerializeToString())
            # Reading and sending live and die together: if either stops, the socket is
            # done with and ``_run`` reconnects (a sender that failed must not leave a
            # worker that hears the server but never reports).
            loops = {asyncio.ensure_future(self._read_loop(ws)), asyncio.ensure_future(self._send_loop(ws))}
            try:
                done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for loop in loops:
                    loop.cancel()
            for loop in done:
                loop.result()  # re-raise a failure, so it is counted and logged

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            message = await self._receive(ws)
            if message is None:
                return
            self._handle(ws, message)

    def _register_message(self) -> agent_proto.WorkerMessage:
        permissions = self._opts.permissions
        return agent_proto.WorkerMessage(register=agent_proto.RegisterWorkerRequest(
            type=agent_proto.JobType.JT_ROOM, agent_name=self.agent_name, version=_version(),
            allowed_permissions=models_proto.ParticipantPermission(
                can_publish=permissions.can_publish, can_subscribe=permissions.can_subscribe,
                can_publish_data=permissions.can_publish_data, can_update_metadata=permissions.can_update_metadata,
                hidden=permissions.hidden, agent=True,
                can_publish_sources=[getattr(models_proto.TrackSource, s.upper(), 0)
                                     for s in permissions.can_publish_sources],
            ),
        ))

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> agent_proto.ServerMessage | None:
        """The next server message; None when the socket closed. Frames that are not a
        ``ServerMessage`` are logged and skipped: garbage from the wire never ends the bridge."""
        while True:
            frame = await ws.receive()
            if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                              aiohttp.WSMsgType.ERROR):
                return None
            if frame.type != aiohttp.WSMsgType.BINARY:
                logger.warning("ignoring a non-binary frame from the LiveKit server (%s)", frame.type.name)
                continue
            message = agent_proto.ServerMessage()
            try:
                message.ParseFromString(frame.data)
            except DecodeError as err:
                logger.error("ignoring an undecodable message from the LiveKit server (%d bytes): %s",
                             len(frame.data), err)
                continue
            return message

    def _handle(self, ws: aiohttp.ClientWebSocketResponse, message: agent_proto.ServerMessage) -> None:
        kind = message.WhichOneof("message")
        if kind == "availability":
            self._spawn(self._answer_availability(ws, message.availability.job), "availability")
        elif kind == "assignment":
            assignment = message.assignment
            error = self._host.assign_job(assignment.job.id, assignment.url or self._credentials.url, assignment.token)
            if error is not None:
                logger.warning("cannot run assigned job %s: %s", assignment.job.id, error)
                self._job_updates.append(agent_proto.UpdateJobStatus(
                    job_id=assignment.job.id, status=agent_proto.JobStatus.JS_FAILED, error=error))
                self._wake.set()
        elif kind == "termination":
            self._host.terminate_job(message.termination.job_id)
        elif kind == "go_away":
            logger.info("the LiveKit server asked this worker to go away; it will reconnect when it closes")
        elif kind not in ("pong", "register"):
            logger.debug("ignoring server message %r", kind)

    async def _answer_availability(self, ws: aiohttp.ClientWebSocketResponse, job: agent_proto.Job) -> None:
        offer = await self._host.offer_job(self._opts, job)
        if not offer.available:
            logger.info("not available for job %s: %s", job.id, offer.reason)
        response = agent_proto.AvailabilityResponse(
            job_id=job.id, available=offer.available, participant_identity=offer.identity,
            participant_name=offer.name, participant_metadata=offer.metadata,
            participant_attributes=offer.attributes)
        await asyncio.wait_for(ws.send_bytes(agent_proto.WorkerMessage(availability=response).SerializeToString()),
                               self._opts.control_call_timeout)

    async def _send_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Job updates as they come; worker status every ``worker_status_interval`` and at
        once when draining starts."""
        next_status = 0.0
        reported_draining = False
        while True:
            self._wake.clear()  # before draining: an update queued during the sends below wakes us again
            while self._job_updates:
                await asyncio.wait_for(ws.send_bytes(agent_proto.WorkerMessage(
                    update_job=self._job_updates[0]).SerializeToString()), self._opts.control_call_timeout)
                self._job_updates.popleft()  # only once it was handed to the socket
            if time.monotonic() >= next_status or self._draining != reported_draining:
                load = await self._host.worker_load(self._opts)
                reported_draining = load.draining
                status = agent_proto.WorkerStatus.WS_FULL if load.full or load.draining else agent_proto.WorkerStatus.WS_AVAILABLE
                await asyncio.wait_for(ws.send_bytes(agent_proto.WorkerMessage(update_worker=agent_proto.UpdateWorkerStatus(
                    status=status, load=load.load, job_count=load.job_count, draining=load.draining,
                )).SerializeToString()), self._opts.control_call_timeout)
                next_status = time.monotonic() + self._opts.worker_status_interval
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_status - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        supervised_task(coro, name=f"worker-bridge-{name}", logger=logger, tasks=self._tasks)


class WorkerProtocolError(Exception):
    """The server broke the worker protocol (e.g. no answer to the registration)."""
