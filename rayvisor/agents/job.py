"""``JobContext`` and ``JobProcess``: what an entrypoint is given, as in livekit-agents."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from livekit import rtc
from livekit.protocol import agent as agent_proto
from livekit.protocol import models as models_proto

from ..errors import ConnectFailed, DuplicateEntrypoint, InvalidAgent, LiveKitNotConfigured, NotConnected, NotSupported
from ..messages import Cause
from ..rooms.base import RoomConnection
from ..rooms.records import ParticipantInfo
from .options import AutoSubscribe
from .room import RemoteParticipant, Room

if TYPE_CHECKING:  # livekit.api (and aiohttp) load on first use of ctx.api: job processes start faster
    from livekit import api

ShutdownCallback = Callable[[], Coroutine[Any, Any, None]] | Callable[[str], Coroutine[Any, Any, None]]
ShutdownHook = Callable[[Cause, str, "str | None"], None]
"""``(cause, reason, error)``: start the job's shutdown protocol."""
ParticipantEntrypointFnc = Callable[[Any, RemoteParticipant], Coroutine[Any, Any, None]]

UNSUPPORTED_CONNECT_OPTIONS = frozenset({"encryption", "e2ee", "rtc_config"})
"""livekit-agents' ``connect`` options rayvisor's rooms cannot honour (refused, not dropped)."""

DEFAULT_PARTICIPANT_KINDS = (
    rtc.ParticipantKind.PARTICIPANT_KIND_SIP,
    rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
)


@dataclass(frozen=True)
class ParticipantEntrypoint:
    """A function registered with ``ctx.add_participant_entrypoint`` and the kinds it is for."""

    fnc: ParticipantEntrypointFnc
    kinds: frozenset[int]
    index: int
    """Registration order: what tells two entrypoints apart (two closures share a name)."""

    @property
    def name(self) -> str:
        return f"{getattr(self.fnc, '__module__', '?')}.{getattr(self.fnc, '__qualname__', repr(self.fnc))}"

    def wants(self, participant: RemoteParticipant) -> bool:
        return participant.kind in self.kinds


@dataclass(frozen=True)
class LiveKitAccess:
    """What a job holds to reach its LiveKit server: the url and a short-lived server API
    token scoped to its room (minted by the supervisor; the API secret never leaves it)."""

    url: str
    api_token: str
    room_token: str = ""
    """The job's room token (livekit-agents' ``RunningJobInfo.token``); empty in participant actors."""


class JobProcess:
    """The process (Ray actor) a job runs in. ``userdata`` is filled by ``prewarm_fnc``."""

    def __init__(self) -> None:
        self.userdata: dict[str, Any] = {}
        self.pid = os.getpid()
        self.user_arguments: Any = None
        """livekit-agents' field; rayvisor passes none."""
        self.http_proxy: str | None = None
        """The proxy ``http_context.http_session()`` uses (livekit-agents' field); none by default."""


class BaseContext:
    """What the job's context and a participant actor's context share: the job, the room,
    the process, the worker id, log fields and shutdown callbacks."""

    def __init__(self, *, job: agent_proto.Job, room: Room, proc: JobProcess, worker_id: str,
                 livekit: LiveKitAccess | None = None, namespace: str = "") -> None:
        self._livekit = livekit
        self._namespace = namespace
        """The rayvisor namespace the job is served in (per-namespace services: inference actors)."""
        self._api: api.LiveKitAPI | None = None
        self._job = job
        self._room = room
        self._proc = proc
        self._worker_id = worker_id
        self._shutdown_callbacks: list[ShutdownCallback] = []
        self._log_context_fields: dict[str, Any] = {}

    @property
    def job(self) -> agent_proto.Job:
        """The job (a ``livekit.protocol.agent.Job``): ``id``, ``metadata``, ``room.name``,
        ``agent_name``, ``dispatch_id``."""
        return self._job

    @property
    def room(self) -> Room:
        return self._room

    @property
    def proc(self) -> JobProcess:
        return self._proc

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def api(self) -> api.LiveKitAPI:
        """A ``livekit.api.LiveKitAPI`` for this job's server (created on first use, closed
        when the job ends). It authenticates with a token scoped to the job's room."""
        if self._livekit is None:
            raise LiveKitNotConfigured(
                "ctx.api needs a LiveKit server (ws_url, api_key, api_secret); this job runs on the local room backend"
            )
        if self._api is None:
            from livekit import api

            self._api = api.LiveKitAPI(self._livekit.url, token=self._livekit.api_token)
        return self._api

    async def _close_api(self) -> None:
        client, self._api = self._api, None
        if client is not None:
            await client.aclose()

    def _task_context(self) -> contextvars.Context | None:
        """The ``contextvars`` context the job's own tasks (entrypoint, shutdown) run in; None:
        the caller's. livekit-agents' context sets its job context and HTTP session here."""
        return None

    def _as_seen_by_user(self, participant: RemoteParticipant) -> Any:
        """The object user code gets for ``participant`` (the facade's; livekit-agents' context
        on the LiveKit backend gives the ``rtc.RemoteParticipant`` of ``ctx.room``)."""
        return participant

    async def _release(self) -> None:
        """Free what the context holds once its shutdown callbacks ran (``ctx.api`` ...)."""
        await self._close_api()

    @property
    def log_context_fields(self) -> dict[str, Any]:
        """Fields added to every log record the job's process writes."""
        return self._log_context_fields

    @log_context_fields.setter
    def log_context_fields(self, fields: dict[str, Any]) -> None:
        self._log_context_fields = dict(fields)

    @property
    def shutdown_callbacks(self) -> list[ShutdownCallback]:
        return list(self._shutdown_callbacks)

    def add_shutdown_callback(self, callback: ShutdownCallback) -> None:
        """Run ``callback()`` or ``callback(reason)`` once, when this context shuts down."""
        if not callable(callback):
            raise InvalidAgent(f"shutdown callback must be callable, got {callback!r}")
        self._shutdown_callbacks.append(callback)


class JobContext(BaseContext):
    """The entrypoint's view of its job: ``ctx.room``, ``ctx.job``, ``ctx.connect()``, ...

    Built by the job actor; ``request_shutdown`` is the actor's hook that starts the
    shutdown protocol (it runs the shutdown callbacks registered here).
    """

    def __init__(
        self,
        *,
        job: agent_proto.Job,
        proc: JobProcess,
        worker_id: str,
        identity: str,
        connection: RoomConnection,
        request_shutdown: ShutdownHook,
        room_poll_timeout: float,
        on_participant_entrypoint: Callable[[ParticipantEntrypoint], None] = lambda entry: None,
        participant_name: str = "",
        participant_attributes: dict[str, str] | None = None,
        participant_metadata: str = "",
        livekit: LiveKitAccess | None = None,
        namespace: str = "",
    ) -> None:
        super().__init__(job=job, room=Room(job.room.name), proc=proc, worker_id=worker_id, livekit=livekit,
                         namespace=namespace)
        self._participant_name = participant_name
        self._participant_attributes = dict(participant_attributes or {})
        self._participant_metadata = participant_metadata
        self._identity = identity
        self._connection = connection
        self._request_shutdown = request_shutdown
        self._room_poll_timeout = room_poll_timeout
        self._auto_subscribe = AutoSubscribe.SUBSCRIBE_ALL
        self._participant_waiters: list[tuple[asyncio.Future[RemoteParticipant], Callable[[RemoteParticipant], bool]]] = []
        self._participant_entrypoints: list[ParticipantEntrypoint] = []
        self._on_participant_entrypoint = on_participant_entrypoint
        self._connect_lock = asyncio.Lock()
        self._room.on("participant_connected", self._on_participant_connected)

    # -- what the entrypoint does -------------------------------------------------

    async def connect(self, *, auto_subscribe: AutoSubscribe = AutoSubscribe.SUBSCRIBE_ALL, **options: Any) -> None:
        """Join the job's room as the agent participant (``agent-<job id>``, kind AGENT); a
        no-op once joined, and concurrent calls join once (AgentSession.start connects too).

        If the room cannot be joined the job ends with cause ``connect_failed`` and this
        raises ``ConnectFailed``. livekit-agents' ``encryption``/``e2ee`` and ``rtc_config``
        are not supported: given, they raise ``NotSupported`` rather than being dropped."""
        unsupported = sorted(name for name, value in options.items()
                             if value is not None and name in UNSUPPORTED_CONNECT_OPTIONS)
        if unsupported:
            raise NotSupported(f"ctx.connect({', '.join(unsupported)}=...) is not supported by rayvisor's rooms")
        async with self._connect_lock:
            if not self._room.isconnected():
                await self._connect_once(AutoSubscribe(auto_subscribe))

    async def _connect_once(self, auto_subscribe: AutoSubscribe) -> None:
        self._auto_subscribe = auto_subscribe
        attributes = {"lk.agent.name": self._job.agent_name} if self._job.agent_name else {}
        local = ParticipantInfo(
            identity=self._identity,
            name=self._participant_name or self._job.agent_name or self._identity,
            kind=rtc.ParticipantKind.PARTICIPANT_KIND_AGENT,
            attributes={**attributes, **self._participant_attributes},
            metadata=self._participant_metadata,
        )
        try:
            await self._room._connect(self._connection, local, self._room_poll_timeout,
                                      auto_subscribe=self._auto_subscribe.value)
        except ConnectFailed as err:
            self._request_shutdown(Cause.CONNECT_FAILED, "could not join the room", str(err))
            raise

    async def wait_for_participant(
        self, *, identity: str | None = None,
        kind: list[int] | int = DEFAULT_PARTICIPANT_KINDS,
    ) -> RemoteParticipant:
        """The first remote participant matching ``identity`` and ``kind`` (waits for one to join)."""
        if not self._room.isconnected():
            raise NotConnected("the room is not connected: await ctx.connect() first")
        kinds = {kind} if isinstance(kind, int) else set(kind)

        def matches(p: RemoteParticipant) -> bool:
            return (identity is None or p.identity == identity) and p.kind in kinds

        for participant in self._room.remote_participants.values():
            if matches(participant):
                return participant
        future: asyncio.Future[RemoteParticipant] = asyncio.get_running_loop().create_future()
        self._participant_waiters.append((future, matches))
        try:
            return await future
        finally:
            self._participant_waiters = [w for w in self._participant_waiters if w[0] is not future]

    def _on_participant_connected(self, participant: RemoteParticipant) -> None:
        for future, matches in list(self._participant_waiters):
            if not future.done() and matches(participant):
                future.set_result(participant)

    def add_participant_entrypoint(
        self, entrypoint_fnc: ParticipantEntrypointFnc, *_: Any,
        kind: list[int] | int = DEFAULT_PARTICIPANT_KINDS,
    ) -> None:
        """Run ``await entrypoint_fnc(ctx, participant)`` for every participant of ``kind`` in
        the room, now and as they join. With ``isolate_participants`` (the default) each runs
        in its own child actor, so one that crashes cannot take the job down."""
        if any(entry.fnc is entrypoint_fnc for entry in self._participant_entrypoints):
            raise DuplicateEntrypoint(f"{entrypoint_fnc!r} was already added: entrypoints cannot be added more than once")
        if not inspect.iscoroutinefunction(entrypoint_fnc):
            raise InvalidAgent(f"a participant entrypoint must be an `async def (ctx, participant)`, got {entrypoint_fnc!r}")
        kinds = frozenset({kind} if isinstance(kind, int) else kind)
        known = {value for _, value in rtc.ParticipantKind.items()}
        if not kinds or not kinds <= known:
            raise InvalidAgent(f"kind must be rtc.ParticipantKind values, got {kind!r}")
        entry = ParticipantEntrypoint(fnc=entrypoint_fnc, kinds=kinds, index=len(self._participant_entrypoints))
        self._participant_entrypoints.append(entry)
        self._on_participant_entrypoint(entry)

    @property
    def participant_entrypoints(self) -> list[ParticipantEntrypoint]:
        return list(self._participant_entrypoints)

    def shutdown(self, reason: str = "") -> None:
        """End the job: the shutdown protocol starts in its own task, once."""
        self._request_shutdown(Cause.USER_SHUTDOWN, reason, None)

    async def delete_room(self) -> None:
        """End the session for everyone: delete the room (the job ends with ``room_deleted``)."""
        await self._room._delete()


def job_context_class(livekit_agents: bool) -> type[JobContext]:
    """rayvisor's ``JobContext``, or (``WorkerOptions.livekit_agents_context``) livekit-agents'
    flavour of it, imported only then: livekit-agents costs about a second and 45 MB per process."""
    if livekit_agents:
        from .livekit_agents_context import AgentsJobContext

        return AgentsJobContext
    return JobContext


def make_job(*, job_id: str, room: str, metadata: str, agent_name: str, dispatch_id: str) -> agent_proto.Job:
    """The ``ctx.job`` record, a real ``livekit.protocol.agent.Job`` as in livekit-agents."""
    return agent_proto.Job(
        id=job_id,
        dispatch_id=dispatch_id,
        type=agent_proto.JobType.JT_ROOM,
        room=models_proto.Room(name=room),
        agent_name=agent_name,
        metadata=metadata,
    )
