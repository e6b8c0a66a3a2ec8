"""A protocol-faithful local LiveKit server for tests.

``LocalLiveKitServer`` is an aiohttp app on 127.0.0.1 serving, from a background thread with its
own event loop:

* ``GET /agent``: the agent worker protocol (binary protobuf ``WorkerMessage`` / ``ServerMessage``
  frames), authenticated like LiveKit with a bearer JWT carrying the ``video.agent`` grant;
* ``POST /twirp/livekit.<Service>/<Method>``: the subset of the Twirp API a job and its tests use,
  protobuf (what ``livekit.api.LiveKitAPI`` sends) or JSON bodies, errors as Twirp JSON;
* ``GET /rtc-standin``: a JSON websocket channel standing in for LiveKit's media/signalling (which
  cannot be served locally), spoken by ``tests/rtc_stand_in.StandInRoom``.

Every public method is safe to call from any thread but the server's own: observations return
copies under a lock, actions run on the server loop and wait for it. From a coroutine, call the
actions (and ``stop``) through ``asyncio.to_thread`` so that clients living on that coroutine's loop
can keep answering (e.g. finish a close handshake) meanwhile. Refusals the server answers rather
than raises (a stand-in lacking a grant, a message before ``register``...) are recorded in
``protocol_errors()``.

The stand-in channel (JSON text frames). ``P`` is a participant:
``{"identity", "sid", "name", "kind", "attributes", "metadata"}`` with ``kind`` a
``models.ParticipantInfo.Kind`` value (the server's numbering, which differs from
``rtc.ParticipantKind`` for CONNECTOR/BRIDGE; the client maps it).

server -> client::

    {"type": "joined", "room": {"name", "sid", "metadata"}, "local": P, "participants": [P, ...]}
    {"type": "participant_connected", "participant": P}
    {"type": "participant_disconnected", "participant": P, "reason": int}
    {"type": "participant_attributes_changed", "participant": P, "changed": {...}}
    {"type": "participant_metadata_changed", "participant": P, "old": str, "new": str}
    {"type": "participant_name_changed", "participant": P, "old": str, "new": str}
    {"type": "room_metadata_changed", "old": str, "new": str}
    {"type": "data_received", "participant": P, "topic": str, "data_b64": str, "reliable": bool}
    {"type": "text_received", "participant": P, "topic": str, "text": str, "stream_id": str,
     "attributes": {...}, "timestamp": int}
    {"type": "disconnected", "reason": int}          # models.DisconnectReason; the socket closes next
    {"type": "ack", "id": int, "error"?: str}       # answers a request that carried an "id"

client -> server (each may carry an ``"id"``, answered by an ``ack`` after the fan-out)::

    {"type": "set_attributes", "attributes": {...}}  # merged; an empty value deletes the key
    {"type": "set_metadata", "metadata": str}
    {"type": "set_name", "name": str}
    {"type": "publish_data", "topic": str, "data_b64": str, "destination_identities": [...],
     "reliable": bool}
    {"type": "send_text", "topic": str, "text": str, "destination_identities": [...],
     "stream_id"?: str, "attributes"?: {...}, "timestamp"?: int (ms)}

Closing the socket leaves the room.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from livekit import api
from livekit.protocol import agent, agent_dispatch, models
from livekit.protocol import room as room_pb

logger = logging.getLogger("tests.livekit_server")

T = TypeVar("T")

SERVER_VERSION = "1.9.0"
SERVER_PROTOCOL = 16
_CLOSE_TIMEOUT = 2.0  # how long a server-side close waits for the peer's close frame
_ACTION_TIMEOUT = 10.0  # how long a test-thread action waits for the server loop

# Twirp error codes -> HTTP status (https://twitchtv.github.io/twirp/docs/spec_v7.html)
_TWIRP_STATUS = {
    "canceled": 408,
    "unknown": 500,
    "invalid_argument": 400,
    "malformed": 400,
    "deadline_exceeded": 408,
    "not_found": 404,
    "bad_route": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "unauthenticated": 401,
    "resource_exhausted": 429,
    "failed_precondition": 412,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "dataloss": 500,
}

# AccessToken.with_kind strings -> models.ParticipantInfo.Kind
_TOKEN_KINDS = {
    "": models.ParticipantInfo.Kind.STANDARD,
    "standard": models.ParticipantInfo.Kind.STANDARD,
    "ingress": models.ParticipantInfo.Kind.INGRESS,
    "egress": models.ParticipantInfo.Kind.EGRESS,
    "sip": models.ParticipantInfo.Kind.SIP,
    "agent": models.ParticipantInfo.Kind.AGENT,
    "connector": models.ParticipantInfo.Kind.CONNECTOR,
    "bridge": models.ParticipantInfo.Kind.BRIDGE,
}

_TERMINAL_JOB_STATUSES = (agent.JobStatus.JS_SUCCESS, agent.JobStatus.JS_FAILED, agent.JobStatus.JS_CANCELLED)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _copy(msg: Any) -> Any:
    """A deep copy of a protobuf message."""
    clone = type(msg)()
    clone.CopyFrom(msg)
    return clone


@dataclass
class WorkerView:
    """Snapshot of an agent worker that registered on ``/agent``."""

    worker_id: str
    agent_name: str
    job_type: int
    version: str
    permissions: models.ParticipantPermission
    connected: bool
    status_updates: list[agent.UpdateWorkerStatus]


class _TwirpError(Exception):
    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


class _ProtocolViolation(Exception):
    """The peer broke the protocol: record it and close its socket with ``close_code``."""

    def __init__(self, msg: str, close_code: int = WSCloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(msg)
        self.close_code = close_code


@dataclass(eq=False)
class _Worker:
    """An ``/agent`` connection; registered once ``register`` is set."""

    ws: web.WebSocketResponse
    remote: str
    register: agent.RegisterWorkerRequest | None = None
    worker_id: str = ""
    connected: bool = True
    status_updates: list[agent.UpdateWorkerStatus] = field(default_factory=list)
    pending: dict[str, asyncio.Future[agent.AvailabilityResponse]] = field(default_factory=dict)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def view(self) -> WorkerView:
        reg = self.register or agent.RegisterWorkerRequest()
        return WorkerView(
            worker_id=self.worker_id,
            agent_name=reg.agent_name,
            job_type=int(reg.type),
            version=reg.version,
            permissions=_copy(reg.allowed_permissions),
            connected=self.connected,
            status_updates=[_copy(u) for u in self.status_updates],
        )


@dataclass(frozen=True)
class _Close:
    """Outbox sentinel: close the stand-in socket."""

    code: int = WSCloseCode.OK


@dataclass(eq=False)
class _Member:
    """A participant of a room: a stand-in connection (``outbox`` set) or one added by the test."""

    info: models.ParticipantInfo
    can_update_metadata: bool = True
    can_publish_data: bool = True
    outbox: asyncio.Queue[dict[str, Any] | _Close] | None = None
    token: str = ""
    """The room token a stand-in joined with (empty for participants added by the test)."""

    def push(self, message: dict[str, Any]) -> None:
        if self.outbox is not None:
            self.outbox.put_nowait(message)

    def kick(self, reason: int, code: int = WSCloseCode.OK) -> None:
        """Tell a stand-in it was disconnected, then close its socket."""
        if self.outbox is not None:
            self.outbox.put_nowait({"type": "disconnected", "reason": int(reason)})
            self.outbox.put_nowait(_Close(code))


@dataclass(eq=False)
class _Room:
    name: str
    sid: str = field(default_factory=lambda: _new_id("RM"))
    metadata: str = ""
    created_ms: int = field(default_factory=_now_ms)
    members: dict[str, _Member] = field(default_factory=dict)

    def proto(self) -> models.Room:
        return models.Room(
            sid=self.sid,
            name=self.name,
            metadata=self.metadata,
            creation_time=self.created_ms // 1000,
            creation_time_ms=self.created_ms,
            num_participants=len(self.members),
        )

    def broadcast(self, message: dict[str, Any], *, exclude: _Member | None = None) -> None:
        for member in list(self.members.values()):
            if member is not exclude:
                member.push(message)


@dataclass(eq=False)
class _Dispatch:
    info: agent_dispatch.AgentDispatch  # state.jobs left empty; filled from the job table on read
    job_ids: list[str] = field(default_factory=list)


def _participant_json(info: models.ParticipantInfo) -> dict[str, Any]:
    return {
        "identity": info.identity,
        "sid": info.sid,
        "name": info.name,
        "kind": int(info.kind),
        "attributes": dict(info.attributes),
        "metadata": info.metadata,
    }


def _bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[len("bearer ") :].strip() or None
    return None


class LocalLiveKitServer:
    """A local LiveKit server (agent protocol, Twirp API, rtc stand-in channel) for tests."""

    def __init__(
        self,
        api_key: str = "devkey",
        api_secret: str = "devsecret-devsecret-devsecret-0123456789",
        *,
        availability_timeout: float = 5.0,
    ) -> None:
        self.api_key = api_key
        self.api_secret = api_secret
        self.availability_timeout = availability_timeout
        self._verifier = api.TokenVerifier(api_key, api_secret)

        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._stopped = False

        # all state below is mutated on the server loop, under self._lock
        self._sockets: list[_Worker] = []  # every open /agent connection
        self._workers: list[_Worker] = []  # registered workers, in registration order
        self._refused = 0
        self._accepting_workers = True
        self._assignment_tokens: dict[str, str] = {}
        self._job_statuses: dict[str, list[tuple[int, str]]] = {}
        self._migrations: list[list[str]] = []
        self._jobs: dict[str, agent.Job] = {}
        self._job_owner: dict[str, _Worker] = {}
        self._dispatches: dict[str, _Dispatch] = {}
        self._availability: dict[str, agent.AvailabilityResponse] = {}
        self._rooms: dict[str, _Room] = {}
        self._deleted_rooms: list[str] = []
        self._protocol_errors: list[str] = []
        self._round_robin: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

        self._twirp: dict[tuple[str, str], tuple[type[Message], Callable[[api.Claims, Any], Message]]] = {
            ("AgentDispatchService", "CreateDispatch"): (agent_dispatch.CreateAgentDispatchRequest, self._create_dispatch),
            ("AgentDispatchService", "ListDispatch"): (agent_dispatch.ListAgentDispatchRequest, self._list_dispatch),
            ("AgentDispatchService", "DeleteDispatch"): (agent_dispatch.DeleteAgentDispatchRequest, self._delete_dispatch),
            ("RoomService", "CreateRoom"): (room_pb.CreateRoomRequest, self._create_room),
            ("RoomService", "ListRooms"): (room_pb.ListRoomsRequest, self._list_rooms),
            ("RoomService", "DeleteRoom"): (room_pb.DeleteRoomRequest, self._delete_room),
            ("RoomService", "UpdateRoomMetadata"): (room_pb.UpdateRoomMetadataRequest, self._update_room_metadata),
            ("RoomService", "ListParticipants"): (room_pb.ListParticipantsRequest, self._list_participants),
            ("RoomService", "GetParticipant"): (room_pb.RoomParticipantIdentity, self._get_participant),
            ("RoomService", "RemoveParticipant"): (room_pb.RoomParticipantIdentity, self._remove_participant),
            ("RoomService", "UpdateParticipant"): (room_pb.UpdateParticipantRequest, self._update_participant),
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalLiveKitServer:
        """Start listening on a random free port of 127.0.0.1; blocks until it is."""
        if self._thread is not None:
            raise RuntimeError("LocalLiveKitServer already started")
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="local-livekit-server", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            raise RuntimeError("LocalLiveKitServer failed to start") from failure[0]
        return self

    def stop(self) -> None:
        """Close every websocket, stop the HTTP server and the loop thread. Idempotent."""
        if self._thread is None or self._stopped or self._loop is None:
            return
        self._stopped = True
        loop = self._loop
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=30)
            except Exception:  # noqa: BLE001 - stop must not raise in teardown
                logger.exception("LocalLiveKitServer shutdown failed")
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> LocalLiveKitServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("LocalLiveKitServer is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: what ``livekit.api.LiveKitAPI`` takes."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:PORT``: what agent workers and rooms connect to."""
        return f"ws://127.0.0.1:{self.port}"

    async def _startup(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._health)
        app.router.add_get("/agent", self._agent_ws)
        app.router.add_get("/rtc-standin", self._standin_ws)
        app.router.add_route("*", "/twirp/{route:.*}", self._twirp_handler)
        self._runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def _shutdown(self) -> None:
        with self._lock:
            workers = list(self._sockets)
            members = [m for r in self._rooms.values() for m in r.members.values()]
            for worker in workers:
                self._worker_gone(worker)
            for member in members:
                member.kick(models.DisconnectReason.SERVER_SHUTDOWN, WSCloseCode.GOING_AWAY)
        closing = [w.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for w in workers]
        await asyncio.gather(*closing, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` on the server loop and wait for its result (from another thread)."""
        loop = self._loop
        if loop is None or self._stopped or not loop.is_running():
            raise RuntimeError("LocalLiveKitServer is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking LocalLiveKitServer action called from the server's own loop")
        return asyncio.run_coroutine_threadsafe(fn(), loop).result(_ACTION_TIMEOUT)  # type: ignore[arg-type]

    def _protocol_error(self, message: str) -> None:
        logger.warning("protocol error: %s", message)
        with self._lock:
            self._protocol_errors.append(message)

    # ------------------------------------------------------------------ observations

    def workers(self) -> list[WorkerView]:
        """Workers currently or previously registered, in registration order."""
        with self._lock:
            return [w.view() for w in self._workers]

    def refused_registrations(self) -> int:
        """``/agent`` upgrades refused for bad auth."""
        with self._lock:
            return self._refused

    def job_statuses(self, job_id: str) -> list[tuple[int, str]]:
        """``(agent.JobStatus, error)`` of each UpdateJobStatus received for ``job_id``, in order."""
        with self._lock:
            return list(self._job_statuses.get(job_id, []))

    def migrations(self) -> list[list[str]]:
        """The job ids of each MigrateJobRequest received."""
        with self._lock:
            return [list(ids) for ids in self._migrations]

    def dispatch_jobs(self, dispatch_id: str) -> list[agent.Job]:
        """The jobs created for a dispatch (their ``state`` follows the workers' updates)."""
        with self._lock:
            dispatch = self._dispatches.get(dispatch_id)
            return [_copy(self._jobs[j]) for j in dispatch.job_ids] if dispatch else []

    def availability(self, job_id: str) -> agent.AvailabilityResponse | None:
        """The last AvailabilityResponse received for ``job_id``."""
        with self._lock:
            resp = self._availability.get(job_id)
            return _copy(resp) if resp is not None else None

    def deleted_rooms(self) -> list[str]:
        with self._lock:
            return list(self._deleted_rooms)

    def participants(self, room: str) -> list[models.ParticipantInfo]:
        """The room's participants (added by the test or connected as stand-ins), in join order."""
        with self._lock:
            r = self._rooms.get(room)
            return [_copy(m.info) for m in r.members.values()] if r else []

    def assignment_token(self, job_id: str) -> str | None:
        """The room token sent in ``job_id``'s JobAssignment."""
        with self._lock:
            return self._assignment_tokens.get(job_id)

    def joined_with(self, room: str, identity: str) -> str | None:
        """The room token the stand-in ``identity`` joined ``room`` with."""
        with self._lock:
            r = self._rooms.get(room)
            member = r.members.get(identity) if r else None
            return member.token if member is not None else None

    def accept_workers(self, accepting: bool) -> None:
        """While False, ``/agent`` answers 503 (a server restarting): workers cannot register."""
        with self._lock:
            self._accepting_workers = accepting

    def protocol_errors(self) -> list[str]:
        with self._lock:
            return list(self._protocol_errors)

    # ------------------------------------------------------------------ actions

    def terminate(self, job_id: str) -> None:
        """Send ``ServerMessage(termination=JobTermination(job_id))`` to the worker holding the job."""

        async def run() -> None:
            with self._lock:
                owner = self._job_owner.get(job_id)
            if owner is None:
                raise KeyError(f"no worker holds job {job_id}")
            if not owner.connected:
                raise RuntimeError(f"worker {owner.worker_id} holding job {job_id} is not connected")
            await self._send(owner, agent.ServerMessage(termination=agent.JobTermination(job_id=job_id)))

        self._call(run)

    def send_raw(self, agent_name: str, frame: bytes | str) -> int:
        """Send ``frame`` as it is (garbage, or a text frame) to every connected worker of
        ``agent_name``; returns how many got it."""

        async def run() -> int:
            with self._lock:
                targets = [w for w in self._sockets if w.connected and w.register is not None
                           and w.register.agent_name == agent_name]
            for worker in targets:
                async with worker.send_lock:
                    if isinstance(frame, str):
                        await worker.ws.send_str(frame)
                    else:
                        await worker.ws.send_bytes(frame)
            return len(targets)

        return self._call(run)

    def drop_workers(self) -> None:
        """Close every ``/agent`` websocket (a server restart / network cut).

        Returns once the workers are marked disconnected; the close handshake finishes in the
        background, and messages still arriving on a dropped socket are ignored.
        """

        async def run() -> None:
            with self._lock:
                workers = list(self._sockets)
                for worker in workers:
                    self._worker_gone(worker)
            for worker in workers:
                self._spawn(worker.ws.close(code=WSCloseCode.GOING_AWAY, message=b"dropped by test"))

        self._call(run)

    def add_participant(
        self,
        room: str,
        identity: str,
        *,
        kind: int = models.ParticipantInfo.Kind.STANDARD,
        name: str = "",
        attributes: dict[str, str] | None = None,
        metadata: str = "",
    ) -> None:
        """Add a (socket-less) participant to ``room``; stand-ins there see it connect."""
        info = models.ParticipantInfo(
            sid=_new_id("PA"),
            identity=identity,
            name=name,
            kind=kind,  # type: ignore[arg-type]
            attributes=attributes or {},
            metadata=metadata,
            state=models.ParticipantInfo.State.ACTIVE,
            joined_at=int(time.time()),
            joined_at_ms=_now_ms(),
        )

        async def run() -> None:
            with self._lock:
                self._join(self._room(room), _Member(info=info))

        self._call(run)

    def remove_participant(self, room: str, identity: str) -> None:
        """Remove a participant; a stand-in is disconnected with PARTICIPANT_REMOVED."""

        async def run() -> None:
            with self._lock:
                self._kick(self._member(room, identity), self._rooms[room], models.DisconnectReason.PARTICIPANT_REMOVED)

        self._call(run)

    def publish_data(
        self,
        room: str,
        identity: str,
        payload: bytes | str,
        *,
        topic: str = "",
        destination_identities: Iterable[str] = (),
    ) -> None:
        """Deliver data from participant ``identity`` (e.g. one added with add_participant)."""
        data = payload.encode() if isinstance(payload, str) else payload

        async def run() -> None:
            with self._lock:
                r = self._rooms[room]
                self._fan_out_data(r, self._member(room, identity), topic, data, list(destination_identities), True)

        self._call(run)

    def send_text(
        self,
        room: str,
        identity: str,
        text: str,
        *,
        topic: str = "",
        destination_identities: Iterable[str] = (),
        attributes: dict[str, str] | None = None,
    ) -> str:
        """Send a text stream from participant ``identity``; returns the stream id."""
        stream_id = _new_id("TS")

        async def run() -> None:
            with self._lock:
                r = self._rooms[room]
                self._fan_out_text(
                    r, self._member(room, identity), topic, text, list(destination_identities), stream_id, attributes or {},
                    _now_ms(),
                )

        self._call(run)
        return stream_id

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
        """Poll ``predicate`` until it returns something truthy (returned); AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                what = getattr(predicate, "__qualname__", repr(predicate))
                raise AssertionError(
                    f"condition {what} not met within {timeout}s (protocol errors: {self.protocol_errors()})"
                )
            time.sleep(interval)

    # ------------------------------------------------------------------ auth

    def _verify(self, token: str | None) -> api.Claims:
        if not token:
            raise _TwirpError("unauthenticated", "no authorization token")
        try:
            return self._verifier.verify(token)
        except Exception as exc:  # jwt raises a family of errors; any of them means "not authenticated"
            raise _TwirpError("unauthenticated", f"invalid token: {exc}") from exc

    @staticmethod
    def _unauthorized(msg: str) -> web.Response:
        return web.json_response({"code": "unauthenticated", "msg": msg}, status=401)

    @staticmethod
    def _require(claims: api.Claims, grant: str, room: str | None = None) -> None:
        """LiveKit's permission checks: ``grant`` must be set, and for room admin the room must match."""
        video = claims.video or api.VideoGrants()
        if not getattr(video, grant):
            raise _TwirpError("permission_denied", f"token lacks the {grant} grant")
        if room is not None and video.room != room:
            raise _TwirpError("permission_denied", f"token is not valid for room {room!r}")

    # ------------------------------------------------------------------ /agent

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _agent_ws(self, request: web.Request) -> web.StreamResponse:
        if not self._accepting_workers:
            return web.json_response({"code": "unavailable", "msg": "not accepting workers"}, status=503)
        try:
            claims = self._verify(_bearer(request.headers.get("Authorization")))
            if not (claims.video and claims.video.agent):
                raise _TwirpError("unauthenticated", "token lacks the agent grant")
        except _TwirpError as exc:
            with self._lock:
                self._refused += 1
            return self._unauthorized(exc.msg)

        ws = web.WebSocketResponse(timeout=_CLOSE_TIMEOUT)
        await ws.prepare(request)
        worker = _Worker(ws=ws, remote=str(request.remote))
        with self._lock:
            self._sockets.append(worker)
        try:
            async for frame in ws:
                if frame.type == WSMsgType.ERROR:
                    break
                try:
                    if frame.type != WSMsgType.BINARY:
                        raise _ProtocolViolation(f"/agent: unexpected {frame.type.name} frame", WSCloseCode.UNSUPPORTED_DATA)
                    try:
                        message = agent.WorkerMessage.FromString(frame.data)
                    except DecodeError as exc:
                        raise _ProtocolViolation(
                            f"/agent: undecodable WorkerMessage ({len(frame.data)} bytes): {exc}",
                            WSCloseCode.UNSUPPORTED_DATA,
                        ) from exc
                    if worker.connected:  # a dropped worker's in-flight messages are lost
                        await self._on_worker_message(worker, message)
                except _ProtocolViolation as exc:
                    self._protocol_error(str(exc))
                    await ws.close(code=exc.close_code, message=str(exc).encode()[:120])
                    break
        except ConnectionError:
            pass  # the socket went away while we answered
        except Exception as exc:  # the server must survive whatever a worker does
            logger.exception("/agent handler failed")
            self._protocol_error(f"/agent: internal error: {exc!r}")
        finally:
            with self._lock:
                self._worker_gone(worker)
                if worker in self._sockets:
                    self._sockets.remove(worker)
        return ws

    def _worker_gone(self, worker: _Worker) -> None:
        """Mark a worker disconnected and fail its pending availability requests."""
        worker.connected = False
        for fut in worker.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"worker {worker.worker_id} disconnected"))
        worker.pending.clear()

    async def _send(self, worker: _Worker, message: agent.ServerMessage) -> None:
        async with worker.send_lock:
            if not worker.connected or worker.ws.closed:
                raise ConnectionError(f"worker {worker.worker_id} is not connected")
            await worker.ws.send_bytes(message.SerializeToString())

    async def _on_worker_message(self, worker: _Worker, message: agent.WorkerMessage) -> None:
        which = message.WhichOneof("message")
        if which is None:
            self._protocol_error(f"/agent: empty WorkerMessage from {worker.worker_id or worker.remote}")
            return
        if worker.register is None and which != "register":
            raise _ProtocolViolation(f"/agent: {which} before register")

        if which == "register":
            if worker.register is not None:
                self._protocol_error(f"/agent: worker {worker.worker_id} registered twice")
                return
            with self._lock:
                worker.register = _copy(message.register)
                worker.worker_id = _new_id("AW")
                self._workers.append(worker)
            info = models.ServerInfo(
                edition=models.ServerInfo.Edition.Standard,
                version=SERVER_VERSION,
                protocol=SERVER_PROTOCOL,
                region="local",
                node_id="ND_local",
            )
            await self._send(
                worker,
                agent.ServerMessage(register=agent.RegisterWorkerResponse(worker_id=worker.worker_id, server_info=info)),
            )
        elif which == "availability":
            resp = message.availability
            fut = worker.pending.pop(resp.job_id, None)
            if fut is None or fut.done():
                self._protocol_error(f"/agent: unexpected AvailabilityResponse for job {resp.job_id!r}")
            else:
                fut.set_result(_copy(resp))
        elif which == "update_job":
            update = message.update_job
            with self._lock:
                self._job_statuses.setdefault(update.job_id, []).append((int(update.status), update.error))
                job = self._jobs.get(update.job_id)
                if job is not None:
                    job.state.status = update.status
                    job.state.error = update.error
                    job.state.updated_at = time.time_ns()
                    if update.status == agent.JobStatus.JS_RUNNING and not job.state.started_at:
                        job.state.started_at = time.time_ns()
                    if update.status in _TERMINAL_JOB_STATUSES:
                        job.state.ended_at = time.time_ns()
        elif which == "update_worker":
            with self._lock:
                worker.status_updates.append(_copy(message.update_worker))
        elif which == "ping":
            pong = agent.WorkerPong(last_timestamp=message.ping.timestamp, timestamp=_now_ms())
            await self._send(worker, agent.ServerMessage(pong=pong))
        elif which == "migrate_job":
            job_ids = list(message.migrate_job.job_ids)
            with self._lock:
                self._migrations.append(job_ids)
                for job_id in job_ids:  # the migrating worker now holds the job
                    self._job_owner[job_id] = worker
                    job = self._jobs.get(job_id)
                    if job is not None:
                        job.state.worker_id = worker.worker_id
        else:  # simulate_job and anything newer: accepted, not acted upon
            logger.info("/agent: ignoring %s from %s", which, worker.worker_id)

    # ------------------------------------------------------------------ dispatching

    async def _run_dispatch(self, job: agent.Job) -> None:
        """Offer ``job`` to each matching worker (round robin, each once) until one accepts."""
        with self._lock:
            candidates = [
                w
                for w in self._workers
                if w.connected and w.register is not None and w.register.agent_name == job.agent_name
            ]
            if candidates:
                start = self._round_robin.get(job.agent_name, 0) % len(candidates)
                self._round_robin[job.agent_name] = start + 1
                candidates = candidates[start:] + candidates[:start]
            request = agent.ServerMessage(availability=agent.AvailabilityRequest(job=_copy(job)))

        loop = asyncio.get_running_loop()
        for worker in candidates:
            fut: asyncio.Future[agent.AvailabilityResponse] = loop.create_future()
            with self._lock:
                if not worker.connected:
                    continue
                worker.pending[job.id] = fut
            try:
                await self._send(worker, request)
                resp = await asyncio.wait_for(fut, self.availability_timeout)
            except (ConnectionError, asyncio.TimeoutError) as exc:
                logger.info("job %s: worker %s did not answer: %r", job.id, worker.worker_id, exc)
                continue
            finally:
                worker.pending.pop(job.id, None)
                if fut.done() and not fut.cancelled():
                    fut.exception()  # retrieved: a disconnect racing the send must not warn at GC
            with self._lock:
                self._availability[job.id] = resp
            if not resp.available:
                continue

            identity = resp.participant_identity or f"agent-{job.id}"
            token = (
                api.AccessToken(self.api_key, self.api_secret)
                .with_identity(identity)
                .with_name(resp.participant_name)
                .with_metadata(resp.participant_metadata)
                .with_attributes(dict(resp.participant_attributes))
                .with_kind("agent")
                .with_grants(
                    api.VideoGrants(
                        room_join=True,
                        room=job.room.name,
                        agent=True,
                        can_publish=True,
                        can_subscribe=True,
                        can_publish_data=True,
                        can_update_own_metadata=True,
                    )
                )
                .to_jwt()
            )
            with self._lock:
                current = self._jobs[job.id]
                current.state.worker_id = worker.worker_id
                current.state.participant_identity = identity
                current.state.updated_at = time.time_ns()
                self._job_owner[job.id] = worker
                self._assignment_tokens[job.id] = token
                assigned = _copy(current)
            try:
                await self._send(worker, agent.ServerMessage(assignment=agent.JobAssignment(job=assigned, token=token)))
            except ConnectionError:
                with self._lock:
                    self._job_owner.pop(job.id, None)
                continue
            return

        with self._lock:
            current = self._jobs[job.id]
            current.state.status = agent.JobStatus.JS_FAILED
            current.state.error = "no worker accepted the job"
            current.state.reason = agent.JobStateReason.JSR_NO_CAPACITY
            current.state.updated_at = time.time_ns()
        logger.info("job %s (%s): no worker accepted it", job.id, job.agent_name)

    # ------------------------------------------------------------------ twirp

    async def _twirp_handler(self, request: web.Request) -> web.Response:
        route = request.match_info["route"]
        try:
            pkg_service, _, method = route.partition("/")
            pkg, _, service = pkg_service.partition(".")
            entry = self._twirp.get((service, method)) if pkg == "livekit" else None
            if entry is None or request.method != "POST":
                raise _TwirpError("bad_route", f"no handler for {request.method} {request.path}")
            request_cls, handler = entry
            claims = self._verify(_bearer(request.headers.get("Authorization")))
            body = await request.read()
            is_json = request.content_type == "application/json"
            try:
                if is_json:
                    req = json_format.Parse(body or b"{}", request_cls(), ignore_unknown_fields=True)
                else:
                    req = request_cls.FromString(body)
            except (DecodeError, json_format.ParseError) as exc:
                raise _TwirpError("malformed", f"could not decode {request_cls.__name__}: {exc}") from exc
            with self._lock:
                response = handler(claims, req)
            if is_json:
                return web.json_response(json_format.MessageToDict(response, preserving_proto_field_name=True))
            return web.Response(body=response.SerializeToString(), content_type="application/protobuf")
        except _TwirpError as exc:
            return web.json_response({"code": exc.code, "msg": exc.msg}, status=_TWIRP_STATUS[exc.code])
        except Exception as exc:  # noqa: BLE001 - a handler bug is an internal error, not a crash
            logger.exception("twirp %s failed", route)
            return web.json_response({"code": "internal", "msg": repr(exc)}, status=500)

    def _room(self, name: str) -> _Room:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = _Room(name=name)
        return room

    def _existing_room(self, name: str) -> _Room:
        room = self._rooms.get(name)
        if room is None:
            raise _TwirpError("not_found", "requested room does not exist")
        return room

    def _member(self, room: str, identity: str) -> _Member:
        r = self._rooms.get(room)
        member = r.members.get(identity) if r else None
        if member is None:
            raise KeyError(f"no participant {identity!r} in room {room!r}")
        return member

    def _dispatch_proto(self, dispatch: _Dispatch) -> agent_dispatch.AgentDispatch:
        out = _copy(dispatch.info)
        out.state.jobs.extend(_copy(self._jobs[j]) for j in dispatch.job_ids)
        return out

    def _new_dispatch(self, room: _Room, agent_name: str, metadata: str, attributes: dict[str, str]) -> _Dispatch:
        info = agent_dispatch.AgentDispatch(
            id=_new_id("AD"),
            agent_name=agent_name,
            room=room.name,
            metadata=metadata,
            attributes=attributes,
            state=agent_dispatch.AgentDispatchState(created_at=time.time_ns()),
        )
        dispatch = self._dispatches[info.id] = _Dispatch(info=info)
        job = agent.Job(
            id=_new_id("AJ"),
            dispatch_id=info.id,
            type=agent.JobType.JT_ROOM,
            room=room.proto(),
            agent_name=agent_name,
            metadata=metadata,
            attributes=attributes,
            state=agent.JobState(status=agent.JobStatus.JS_PENDING, updated_at=time.time_ns()),
        )
        self._jobs[job.id] = job
        dispatch.job_ids.append(job.id)
        self._spawn(self._run_dispatch(_copy(job)))
        return dispatch

    def _create_dispatch(self, claims: api.Claims, req: agent_dispatch.CreateAgentDispatchRequest) -> Message:
        self._require(claims, "room_admin", req.room)
        if not req.room:
            raise _TwirpError("invalid_argument", "room is required")
        dispatch = self._new_dispatch(self._room(req.room), req.agent_name, req.metadata, dict(req.attributes))
        return _copy(dispatch.info)

    def _list_dispatch(self, claims: api.Claims, req: agent_dispatch.ListAgentDispatchRequest) -> Message:
        self._require(claims, "room_admin", req.room)
        found = [
            self._dispatch_proto(d)
            for d in self._dispatches.values()
            if d.info.room == req.room and (not req.dispatch_id or d.info.id == req.dispatch_id)
        ]
        return agent_dispatch.ListAgentDispatchResponse(agent_dispatches=found)

    def _delete_dispatch(self, claims: api.Claims, req: agent_dispatch.DeleteAgentDispatchRequest) -> Message:
        self._require(claims, "room_admin", req.room)
        dispatch = self._dispatches.get(req.dispatch_id)
        if dispatch is None or dispatch.info.room != req.room:
            raise _TwirpError("not_found", "dispatch not found")
        del self._dispatches[req.dispatch_id]
        dispatch.info.state.deleted_at = time.time_ns()
        return self._dispatch_proto(dispatch)

    def _create_room(self, claims: api.Claims, req: room_pb.CreateRoomRequest) -> Message:
        self._require(claims, "room_create")
        if not req.name:
            raise _TwirpError("invalid_argument", "room name is required")
        existed = req.name in self._rooms
        room = self._room(req.name)
        if not existed:
            room.metadata = req.metadata
            for spec in req.agents:
                self._new_dispatch(room, spec.agent_name, spec.metadata, dict(spec.attributes))
        return room.proto()

    def _list_rooms(self, claims: api.Claims, req: room_pb.ListRoomsRequest) -> Message:
        self._require(claims, "room_list")
        names = set(req.names)
        rooms = [r.proto() for r in self._rooms.values() if not names or r.name in names]
        return room_pb.ListRoomsResponse(rooms=rooms)

    def _delete_room(self, claims: api.Claims, req: room_pb.DeleteRoomRequest) -> Message:
        self._require(claims, "room_create")
        room = self._existing_room(req.room)
        del self._rooms[req.room]
        self._deleted_rooms.append(req.room)
        for member in room.members.values():
            member.kick(models.DisconnectReason.ROOM_DELETED)
        room.members.clear()
        return room_pb.DeleteRoomResponse()

    def _update_room_metadata(self, claims: api.Claims, req: room_pb.UpdateRoomMetadataRequest) -> Message:
        self._require(claims, "room_admin", req.room)
        room = self._existing_room(req.room)
        old, room.metadata = room.metadata, req.metadata
        if old != req.metadata:
            room.broadcast({"type": "room_metadata_changed", "old": old, "new": req.metadata})
        return room.proto()

    def _list_participants(self, claims: api.Claims, req: room_pb.ListParticipantsRequest) -> Message:
        self._require(claims, "room_admin", req.room)
        room = self._rooms.get(req.room)
        infos = [_copy(m.info) for m in room.members.values()] if room else []
        return room_pb.ListParticipantsResponse(participants=infos)

    def _twirp_member(self, room: str, identity: str) -> _Member:
        try:
            return self._member(room, identity)
        except KeyError:
            raise _TwirpError("not_found", "participant does not exist") from None

    def _get_participant(self, claims: api.Claims, req: room_pb.RoomParticipantIdentity) -> Message:
        self._require(claims, "room_admin", req.room)
        return _copy(self._twirp_member(req.room, req.identity).info)

    def _remove_participant(self, claims: api.Claims, req: room_pb.RoomParticipantIdentity) -> Message:
        self._require(claims, "room_admin", req.room)
        member = self._twirp_member(req.room, req.identity)
        self._kick(member, self._rooms[req.room], models.DisconnectReason.PARTICIPANT_REMOVED)
        return room_pb.RemoveParticipantResponse()

    def _update_participant(self, claims: api.Claims, req: room_pb.UpdateParticipantRequest) -> Message:
        self._require(claims, "room_admin", req.room)
        room = self._existing_room(req.room)
        member = self._twirp_member(req.room, req.identity)
        if req.name:
            self._set_name(room, member, req.name)
        if req.metadata:
            self._set_metadata(room, member, req.metadata)
        if req.attributes:
            self._set_attributes(room, member, dict(req.attributes))
        if req.HasField("permission"):
            member.info.permission.CopyFrom(req.permission)
            member.can_update_metadata = req.permission.can_update_metadata
            member.can_publish_data = req.permission.can_publish_data
        return _copy(member.info)

    # ------------------------------------------------------------------ rooms (loop thread, under lock)

    def _join(self, room: _Room, member: _Member) -> None:
        previous = room.members.get(member.info.identity)
        if previous is not None:
            self._kick(previous, room, models.DisconnectReason.DUPLICATE_IDENTITY)
        room.members[member.info.identity] = member
        member.push(
            {
                "type": "joined",
                "room": {"name": room.name, "sid": room.sid, "metadata": room.metadata},
                "local": _participant_json(member.info),
                "participants": [_participant_json(m.info) for m in room.members.values() if m is not member],
            }
        )
        room.broadcast({"type": "participant_connected", "participant": _participant_json(member.info)}, exclude=member)

    def _leave(self, room: _Room, member: _Member, reason: int) -> None:
        """Remove ``member`` if it is still in ``room`` and tell the others."""
        if room.members.get(member.info.identity) is not member:
            return
        del room.members[member.info.identity]
        member.info.state = models.ParticipantInfo.State.DISCONNECTED
        member.info.disconnect_reason = reason  # type: ignore[assignment]
        room.broadcast(
            {"type": "participant_disconnected", "participant": _participant_json(member.info), "reason": int(reason)}
        )

    def _kick(self, member: _Member, room: _Room, reason: int) -> None:
        self._leave(room, member, reason)
        member.kick(reason)

    def _set_attributes(self, room: _Room, member: _Member, attributes: dict[str, str]) -> None:
        changed: dict[str, str] = {}
        for key, value in attributes.items():
            current = member.info.attributes.get(key)
            if value == "":
                if current is not None:
                    del member.info.attributes[key]
                    changed[key] = ""
            elif current != value:
                member.info.attributes[key] = value
                changed[key] = value
        if changed:
            room.broadcast(
                {"type": "participant_attributes_changed", "participant": _participant_json(member.info), "changed": changed}
            )

    def _set_metadata(self, room: _Room, member: _Member, metadata: str) -> None:
        old = member.info.metadata
        if old != metadata:
            member.info.metadata = metadata
            room.broadcast(
                {"type": "participant_metadata_changed", "participant": _participant_json(member.info), "old": old, "new": metadata}
            )

    def _set_name(self, room: _Room, member: _Member, name: str) -> None:
        old = member.info.name
        if old != name:
            member.info.name = name
            room.broadcast(
                {"type": "participant_name_changed", "participant": _participant_json(member.info), "old": old, "new": name}
            )

    @staticmethod
    def _recipients(room: _Room, sender: _Member, destinations: list[str]) -> list[_Member]:
        return [
            m
            for m in room.members.values()
            if m is not sender and (not destinations or m.info.identity in destinations)
        ]

    def _fan_out_data(
        self, room: _Room, sender: _Member, topic: str, data: bytes, destinations: list[str], reliable: bool
    ) -> None:
        message = {
            "type": "data_received",
            "participant": _participant_json(sender.info),
            "topic": topic,
            "data_b64": base64.b64encode(data).decode(),
            "reliable": reliable,
        }
        for member in self._recipients(room, sender, destinations):
            member.push(message)

    def _fan_out_text(
        self,
        room: _Room,
        sender: _Member,
        topic: str,
        text: str,
        destinations: list[str],
        stream_id: str,
        attributes: dict[str, str],
        timestamp: int,
    ) -> None:
        message = {
            "type": "text_received",
            "participant": _participant_json(sender.info),
            "topic": topic,
            "text": text,
            "stream_id": stream_id,
            "attributes": attributes,
            "timestamp": timestamp,
        }
        for member in self._recipients(room, sender, destinations):
            member.push(message)

    # ------------------------------------------------------------------ /rtc-standin

    async def _standin_ws(self, request: web.Request) -> web.StreamResponse:
        token = _bearer(request.headers.get("Authorization")) or request.query.get("access_token")
        try:
            claims = self._verify(token)
        except _TwirpError as exc:
            return self._unauthorized(exc.msg)
        video = claims.video
        if not (video and video.room_join and video.room and claims.identity):
            return self._unauthorized("token lacks room_join for a room, or an identity")

        ws = web.WebSocketResponse(timeout=_CLOSE_TIMEOUT)
        await ws.prepare(request)
        outbox: asyncio.Queue[dict[str, Any] | _Close] = asyncio.Queue()
        writer = asyncio.ensure_future(self._standin_writer(ws, outbox))
        info = models.ParticipantInfo(
            sid=_new_id("PA"),
            identity=claims.identity,
            name=claims.name,
            kind=_TOKEN_KINDS.get(claims.kind, models.ParticipantInfo.Kind.STANDARD),
            attributes=claims.attributes or {},
            metadata=claims.metadata,
            state=models.ParticipantInfo.State.ACTIVE,
            joined_at=int(time.time()),
            joined_at_ms=_now_ms(),
            permission=models.ParticipantPermission(
                can_subscribe=video.can_subscribe,
                can_publish=video.can_publish,
                can_publish_data=video.can_publish_data,
                can_update_metadata=bool(video.can_update_own_metadata),
                agent=bool(video.agent),
            ),
        )
        member = _Member(
            info=info,
            can_update_metadata=bool(video.can_update_own_metadata),
            can_publish_data=bool(video.can_publish_data),
            outbox=outbox,
            token=token or "",
        )
        with self._lock:
            room = self._room(video.room)
            self._join(room, member)
        close_code = WSCloseCode.OK
        try:
            async for frame in ws:
                if frame.type == WSMsgType.ERROR:
                    break
                try:
                    if frame.type != WSMsgType.TEXT:
                        raise _ProtocolViolation(f"/rtc-standin: unexpected {frame.type.name} frame", WSCloseCode.UNSUPPORTED_DATA)
                    try:
                        message = json.loads(frame.data)
                    except ValueError as exc:
                        raise _ProtocolViolation(f"/rtc-standin: undecodable JSON: {exc}", WSCloseCode.UNSUPPORTED_DATA) from exc
                    if not isinstance(message, dict):
                        raise _ProtocolViolation("/rtc-standin: message is not an object", WSCloseCode.UNSUPPORTED_DATA)
                    with self._lock:
                        error = self._on_standin_message(room, member, message)
                        if "id" in message:
                            ack: dict[str, Any] = {"type": "ack", "id": message["id"]}
                            if error:
                                ack["error"] = error
                            member.push(ack)
                except _ProtocolViolation as exc:
                    self._protocol_error(str(exc))
                    close_code = exc.close_code
                    break
        except Exception as exc:  # noqa: BLE001
            logger.exception("/rtc-standin handler failed")
            self._protocol_error(f"/rtc-standin: internal error: {exc!r}")
        finally:
            with self._lock:
                current = self._rooms.get(room.name)
                if current is room:
                    self._leave(room, member, models.DisconnectReason.CLIENT_INITIATED)
            outbox.put_nowait(_Close(close_code))
            try:
                await asyncio.wait_for(writer, _CLOSE_TIMEOUT * 2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                writer.cancel()
        return ws

    @staticmethod
    async def _standin_writer(ws: web.WebSocketResponse, outbox: asyncio.Queue[dict[str, Any] | _Close]) -> None:
        while True:
            item = await outbox.get()
            if isinstance(item, _Close):
                await ws.close(code=item.code)
                return
            if ws.closed:
                continue
            try:
                await ws.send_str(json.dumps(item))
            except (ConnectionError, RuntimeError):
                continue

    def _on_standin_message(self, room: _Room, member: _Member, message: dict[str, Any]) -> str | None:
        """Apply a client request; returns an error for the ack (None on success)."""
        if room.members.get(member.info.identity) is not member:
            return "not connected to the room"
        kind = message.get("type")
        who = f"{member.info.identity}@{room.name}"
        try:
            if kind in ("set_attributes", "set_metadata", "set_name"):
                if not member.can_update_metadata:
                    error = f"{who}: {kind} needs the can_update_own_metadata grant"
                    self._protocol_error(f"/rtc-standin: {error}")
                    return error
                if kind == "set_attributes":
                    attributes = message["attributes"]
                    if not isinstance(attributes, dict):
                        raise TypeError("attributes must be an object")
                    self._set_attributes(room, member, {str(k): str(v) for k, v in attributes.items()})
                elif kind == "set_metadata":
                    self._set_metadata(room, member, str(message["metadata"]))
                else:
                    self._set_name(room, member, str(message["name"]))
            elif kind in ("publish_data", "send_text"):
                if not member.can_publish_data:
                    error = f"{who}: {kind} needs the can_publish_data grant"
                    self._protocol_error(f"/rtc-standin: {error}")
                    return error
                destinations = [str(d) for d in message.get("destination_identities") or []]
                topic = str(message.get("topic") or "")
                if kind == "publish_data":
                    data = base64.b64decode(message["data_b64"], validate=True)
                    self._fan_out_data(room, member, topic, data, destinations, bool(message.get("reliable", True)))
                else:
                    self._fan_out_text(
                        room,
                        member,
                        topic,
                        str(message["text"]),
                        destinations,
                        str(message.get("stream_id") or _new_id("TS")),
                        {str(k): str(v) for k, v in (message.get("attributes") or {}).items()},
                        int(message.get("timestamp") or _now_ms()),  # the sender's stream timestamp
                    )
            else:
                error = f"unknown message type {kind!r}"
                self._protocol_error(f"/rtc-standin: {who}: {error}")
                return error
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            error = f"malformed {kind}: {exc!r}"
            self._protocol_error(f"/rtc-standin: {who}: {error}")
            return error
        return None
