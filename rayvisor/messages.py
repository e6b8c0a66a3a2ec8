"""Versioned msgpack records: the only thing that crosses the control plane.

Every message is an envelope ``{"v": PROTOCOL_VERSION, "type": <record name>, "body": {...}}``
packed with msgpack. Records are pydantic models in strict mode, so a decoded message is
validated field by field at the boundary; anything else is a typed ``MessageError``.
User objects are never pickled onto the control plane.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Any, ClassVar, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import (
    InternalError,
    InvalidJobSpec,
    MessageError,
    RayvisorError,
    UnsupportedVersion,
    error_from_code,
)

_logger = logging.getLogger("rayvisor.messages")

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Hard ceiling for any control-plane message; larger input is refused before decoding."""

MAX_ROOM_NAME_CHARS = 256
MAX_IDENTITY_CHARS = 256
MAX_JOB_ID_CHARS = 128
MAX_TOKEN_CHARS = 16 * 1024


class Record(BaseModel):
    """Base of every control-plane record: immutable, strict, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    invalid_error: ClassVar[type[RayvisorError]] = MessageError

    @classmethod
    def build(cls, /, **fields: Any) -> "Record":
        """Construct and validate, raising the record's typed error instead of pydantic's."""
        try:
            return cls(**fields)
        except ValidationError as err:
            raise cls.invalid_error(_describe(cls, err)) from None


R = TypeVar("R", bound=Record)
_REGISTRY: dict[str, type[Record]] = {}


def register(cls: type[R]) -> type[R]:
    """Make a record type decodable from the wire."""
    _REGISTRY[cls.__name__] = cls
    return cls


def _describe(cls: type[Record], err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(record)"
        parts.append(f"{where}: {item['msg']}")
    return f"invalid {cls.__name__}: " + "; ".join(parts)


def encode(record: Record) -> bytes:
    """Pack a record into a versioned msgpack envelope."""
    body = record.model_dump(mode="python")
    try:
        return msgpack.packb(
            {"v": PROTOCOL_VERSION, "type": type(record).__name__, "body": body},
            default=_pack_default,
            use_bin_type=True,
        )
    except (TypeError, ValueError, UnicodeEncodeError) as err:
        raise record.invalid_error(f"cannot encode {type(record).__name__}: {err}") from None


def _pack_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"cannot pack {type(value).__name__}")


def decode(data: Any, *expected: type[R]) -> R:
    """Unpack and validate one envelope; its type must be one of ``expected``.

    Raises ``MessageError`` (or the record's own ``invalid_error``) for anything that is
    not a well-formed record of an expected type, ``UnsupportedVersion`` for other versions.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"expected msgpack bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES)
    except Exception as err:  # msgpack raises several unrelated types for garbage
        raise MessageError(f"not a msgpack message: {type(err).__name__}: {err}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"v", "type", "body"}:
        raise MessageError("not a rayvisor envelope (expected keys v, type, body)")
    if type(envelope["v"]) is not int or envelope["v"] != PROTOCOL_VERSION:  # not True, not 1.0
        raise UnsupportedVersion(
            f"message version {envelope['v']!r} is not supported (this build speaks {PROTOCOL_VERSION})"
        )
    cls = _REGISTRY.get(envelope["type"]) if isinstance(envelope["type"], str) else None
    if cls is None or (expected and cls not in expected):
        names = ", ".join(c.__name__ for c in expected) or "a known record"
        raise MessageError(f"unexpected message type {envelope['type']!r}; expected {names}")
    if not isinstance(envelope["body"], dict):
        raise MessageError(f"{cls.__name__} body must be a map")
    try:
        return cls.model_validate(envelope["body"])  # type: ignore[return-value]
    except ValidationError as err:
        raise cls.invalid_error(_describe(cls, err)) from None


# --------------------------------------------------------------------------- errors


@register
class ErrorRecord(Record):
    """A typed error travelling back to a caller."""

    code: str
    message: str

    @classmethod
    def of(cls, err: RayvisorError) -> "ErrorRecord":
        return cls(code=err.code, message=err.message)

    def to_exception(self) -> RayvisorError:
        return error_from_code(self.code, self.message)


def decode_reply(data: Any, *expected: type[R]) -> R:
    """Decode a reply that is either one of ``expected`` or an ``ErrorRecord`` (re-raised)."""
    record = decode(data, ErrorRecord, *(expected or (Ack,)))
    if isinstance(record, ErrorRecord):
        raise record.to_exception()
    return record  # type: ignore[return-value]


# --------------------------------------------------------------------------- jobs


class JobState(str, enum.Enum):
    """The job state machine of DESIGN.md."""

    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    REJECTED = "REJECTED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.KILLED, JobState.REJECTED})


class JobOrigin(str, enum.Enum):
    """Who asked for a job."""

    CLIENT = "client"
    """``client.submit`` or ``rayvisor submit``."""
    LIVEKIT = "livekit"
    """A LiveKit server's dispatch, through the worker bridge (which reports its status back)."""


class RestartPolicy(str, enum.Enum):
    """OTP restart types."""

    TEMPORARY = "temporary"
    """Never restarted."""
    TRANSIENT = "transient"
    """Restarted after an abnormal end (a crash, an error, unresponsive, over its memory limit)."""
    PERMANENT = "permanent"
    """Restarted after any end but an explicit shutdown or the room's deletion (jobs only)."""


class Cause(str, enum.Enum):
    """Why a job ended (or is ending)."""

    USER_SHUTDOWN = "user_shutdown"
    ROOM_EMPTY = "room_empty"
    ROOM_DELETED = "room_deleted"
    ROOM_DISCONNECTED = "room_disconnected"
    ENTRYPOINT_ERROR = "entrypoint_error"
    SHUTDOWN_TIMEOUT = "shutdown_timeout"
    START_FAILED = "start_failed"
    ACTOR_CRASHED = "actor_crashed"
    SUPERVISOR_STOPPED = "supervisor_stopped"
    UNRESPONSIVE = "unresponsive"
    MEMORY_LIMIT = "memory_limit"
    RESTART_LIMIT = "restart_limit"
    DRAINED = "drained"
    REJECTED = "rejected"
    NODE_LOST = "node_lost"
    NO_CAPACITY = "no_capacity"
    CONNECT_FAILED = "connect_failed"
    TERMINATED = "terminated"
    """The LiveKit server ended the job (``JobTermination``)."""



@register
class JobSpec(Record):
    """What to run: an agent in a room. ``rayvisor.JobSpec(room=..., metadata=...)``."""

    invalid_error: ClassVar[type[RayvisorError]] = InvalidJobSpec

    room: str = Field(min_length=1, max_length=MAX_ROOM_NAME_CHARS)
    metadata: str = ""
    agent_name: str | None = None
    dispatch_id: str = ""
    restart: RestartPolicy | None = Field(default=None, strict=False)
    """Overrides the agent's ``WorkerOptions.restart`` for this job."""
    job_id: str | None = Field(default=None, min_length=1, max_length=MAX_JOB_ID_CHARS, pattern=r"^[A-Za-z0-9_.-]+$")
    """The job's id (default: a new ``RJ_...`` id). Submitting again with the id of a job for
    the same room and agent returns that job instead of starting a second one."""
    url: str = Field(default="", max_length=2048)
    """LiveKit only: the server url to join (default: the agent's ``ws_url``)."""
    token: str = Field(default="", max_length=MAX_TOKEN_CHARS)
    """LiveKit only: the room token to join with (default: one the supervisor mints)."""
    origin: JobOrigin = Field(default=JobOrigin.CLIENT, strict=False)

    def __init__(self, /, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as err:
            raise InvalidJobSpec(_describe(type(self), err)) from None

    @field_validator("room", "metadata", "agent_name", "dispatch_id")
    @classmethod
    def _utf8(cls, value: str | None) -> str | None:
        if value is not None:
            value.encode("utf-8")  # lone surrogates cannot travel: a clear error here, not in msgpack
        return value


@register
class JobStart(Record):
    """Supervisor -> job actor: start this job."""

    job_id: str
    room: str
    metadata: str
    agent_name: str
    dispatch_id: str
    worker_id: str
    identity: str
    attempt: int = 1
    name: str = ""
    """The agent participant's name (``JobRequest.accept(name=...)``)."""
    attributes: dict[str, str] = {}
    participant_metadata: str = ""
    log_format: str = "json"
    url: str = ""
    """LiveKit backend: the server to join; empty means the local room backend."""
    token: str = ""
    """LiveKit backend: the job's room token."""
    api_token: str = ""
    """LiveKit backend: a short-lived server API token for ``ctx.api`` (the job never holds the secret)."""
    run: bool = False
    """Start the entrypoint as soon as the job is prepared: a start in one message (the
    reply still goes out first, so an entrypoint that blocks its loop cannot hold it back)."""


@register
class MemoryReport(Record):
    """Job actor -> supervisor, every ``memory_check_interval``: its resident memory."""

    job_id: str
    attempt: int = 1
    """Which attempt (actor) of the job sent it: reports from an earlier attempt are dropped."""
    rss_mb: float


@register
class ActorStarted(Record):
    """A job or participant actor -> its caller: the work is set up in this process."""

    pid: int
    node_id: str


@register
class ShutdownRequest(Record):
    """Supervisor -> job actor: begin the shutdown protocol."""

    cause: Cause = Field(strict=False)
    reason: str = ""


@register
class ShutdownStarted(Record):
    """Job actor -> supervisor: the job began shutting down on its own (ctx.shutdown,
    room empty or deleted, entrypoint error); the supervisor starts the deadline."""

    job_id: str
    attempt: int = 1
    """Which attempt (actor) of the job sent it: reports from an earlier attempt are dropped."""
    cause: Cause = Field(strict=False)
    reason: str = ""
    error: str | None = None


class ParticipantActorState(str, enum.Enum):
    """Lifecycle of one participant entrypoint's child actor."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    KILLED = "KILLED"


class ParticipantCause(str, enum.Enum):
    """Why a participant actor ended."""

    PARTICIPANT_LEFT = "participant_left"
    JOB_ENDED = "job_ended"
    ENTRYPOINT_ERROR = "entrypoint_error"
    ACTOR_CRASHED = "actor_crashed"
    UNRESPONSIVE = "unresponsive"
    """A liveness ping went unanswered (its event loop is blocked); the actor was killed."""
    START_FAILED = "start_failed"
    SHUTDOWN_TIMEOUT = "shutdown_timeout"


@register
class ParticipantActorInfo(Record):
    """One participant entrypoint's child actor, as ``status`` shows it."""

    identity: str
    entrypoint: str
    state: ParticipantActorState = Field(strict=False)
    pid: int | None = None
    node_id: str | None = None
    restarts: int = 0
    cause: ParticipantCause | None = Field(default=None, strict=False)
    error: str | None = None


@register
class ParticipantsChanged(Record):
    """Job actor -> supervisor: who the job sees, and its participant actors."""

    job_id: str
    attempt: int = 1
    """Which attempt (actor) of the job sent it: reports from an earlier attempt are dropped."""
    version: int = 0
    """Increases with every report: reports may arrive out of order, older ones are ignored."""
    identities: list[str]
    actors: list[ParticipantActorInfo] = []


@register
class JobDescription(Record):
    """Job actor -> a (restarted) supervisor: where the job's own lifecycle stands."""

    job_id: str
    shutting_down: bool
    cause: Cause | None = Field(default=None, strict=False)
    reason: str = ""
    error: str | None = None


@register
class JobOutcome(Record):
    """Job actor -> supervisor: the shutdown protocol completed."""

    state: JobState = Field(strict=False)
    cause: Cause = Field(strict=False)
    reason: str = ""
    error: str | None = None
    participant_actors: list["ParticipantActorInfo"] = []
    """How every participant actor ended (the last word, whatever reports were in flight)."""


@register
class AttemptInfo(Record):
    """One run of a job (a restarted job has several)."""

    attempt: int
    state: JobState = Field(strict=False)
    cause: Cause | None = Field(default=None, strict=False)
    error: str | None = None
    pid: int | None = None
    node_id: str | None = None
    started_at: float
    ended_at: float


@register
class JobInfo(Record):
    """A job's record as the supervisor keeps it. Returned by status, list and wait."""

    id: str
    state: JobState = Field(strict=False)
    room: str
    agent_name: str
    metadata: str = ""
    cause: Cause | None = Field(default=None, strict=False)
    reason: str = ""
    error: str | None = None
    pid: int | None = None
    node_id: str | None = None
    restarts: int = 0
    attempts: list[AttemptInfo] = []
    """Every attempt that ended, in order, each with its cause (the last is the job's own end)."""
    participants: list[str] = []
    participant_actors: list[ParticipantActorInfo] = []
    """Child actors of participant entrypoints, current and ended (crashes keep their error)."""
    timestamps: dict[str, float] = {}
    """Wall-clock time (``time.time()``) at which the job entered each state, by state name."""

    def entered(self, state: JobState) -> float | None:
        """When the job entered ``state``, or None if it never did."""
        return self.timestamps.get(state.value)


@register
class JobList(Record):
    jobs: list[JobInfo]


@register
class JobIdRequest(Record):
    job_id: str


@register
class ShutdownJobRequest(Record):
    job_id: str
    reason: str = ""


@register
class WaitRequest(Record):
    job_id: str
    timeout: float = Field(ge=0)


@register
class Transition(Record):
    """One state transition, as streamed to ``rayvisor dev`` and ``client.events``."""

    seq: int
    job_id: str
    state: JobState = Field(strict=False)
    room: str
    at: float
    cause: Cause | None = Field(default=None, strict=False)
    reason: str = ""
    error: str | None = None
    node_id: str | None = None
    pid: int | None = None


@register
class EventsRequest(Record):
    after_seq: int = Field(ge=-1)
    timeout: float = Field(ge=0)


@register
class TransitionList(Record):
    events: list[Transition]


@register
class DrainRequest(Record):
    timeout: float = Field(ge=0)


@register
class DrainStarted(Record):
    """The drain began; ``bound`` is the longest it can take (``timeout`` + the longest budget)."""

    bound: float
    live_jobs: int


@register
class DrainResult(Record):
    ended_on_their_own: int
    shut_down: int


@register
class HistogramSummary(Record):
    count: int
    total: float
    max: float


@register
class MetricsSnapshot(Record):
    """What the supervisor's Ray metrics have counted, as numbers a test or a CLI can read."""

    counters: dict[str, float]
    gauges: dict[str, float]
    histograms: dict[str, HistogramSummary]


@register
class Ack(Record):
    """An empty successful reply."""


@register
class AgentRegistered(Record):
    """Supervisor -> ``serve``: the agent is registered. ``conflicts``: the supervisor-wide
    settings it asked for that the running supervisor keeps otherwise (see ``SupervisorSettings``)."""

    agent_name: str
    conflicts: list[str] = []


def now() -> float:
    """Wall-clock timestamp used in every record."""
    return time.time()



def endpoint(request_type: type[R]):
    """Decorate an async actor method ``(self, request: R) -> Record`` to speak bytes.

    The wire method takes encoded bytes and returns encoded bytes: malformed input and
    every ``RayvisorError`` the handler raises come back as an ``ErrorRecord``, so a bad
    caller can never crash the actor or see a ``RayTaskError``.
    """

    def wrap(handler):
        async def method(self, data: bytes) -> bytes:
            try:
                request = decode(data, request_type)
                reply = await handler(self, request)
                return encode(reply if reply is not None else Ack())
            except RayvisorError as err:
                return encode(ErrorRecord.of(err))
            except Exception as err:  # a bug, not the caller's fault: log it, answer with a typed error
                _logger.exception("%s failed", handler.__qualname__)
                return encode(ErrorRecord(code=InternalError.code, message=f"{type(err).__name__}: {err}"))

        method.__name__ = handler.__name__
        method.__qualname__ = handler.__qualname__
        method.__doc__ = handler.__doc__
        method.request_type = request_type  # marks it as an endpoint
        return method

    return wrap


class BridgeState(str, enum.Enum):
    """Where a LiveKit worker registration stands."""

    CONNECTING = "connecting"
    REGISTERED = "registered"
    REFUSED = "refused"
    """The server refused the registration (bad credentials); retried with backoff."""
    DISCONNECTED = "disconnected"
    """Lost the server; reconnecting with backoff."""
    CLOSED = "closed"


@register
class AgentNameRequest(Record):
    agent_name: str | None = Field(default=None, max_length=MAX_IDENTITY_CHARS)
    """None: the only registered agent."""


@register
class WorkerBridgeStatus(Record):
    """The LiveKit worker registration of one agent (``client.worker_status``)."""

    agent_name: str
    url: str
    state: BridgeState = Field(strict=False)
    worker_id: str = ""
    registrations: int = 0
    """Successful registrations so far (more than one: it reconnected)."""
    failures: int = 0
    """Connection or registration attempts that failed."""
    last_error: str = ""
    draining: bool = False


@register
class HealthRequest(Record):
    """A health probe's question to the supervisor (``client.health``)."""

    agent_name: str | None = Field(default=None, max_length=MAX_IDENTITY_CHARS)
    """None: the only registered agent."""
    with_load: bool = False
    """Also compute the load reported to LiveKit (runs ``load_fnc``, bounded by ``load_timeout``);
    False keeps the answer free of user code, for liveness probes."""


@register
class SupervisorHealth(Record):
    """The supervisor's cheap self-report, behind ``rayvisor start``'s HTTP health endpoint."""

    agent_name: str
    active_jobs: int
    """Jobs not yet in a terminal state, supervisor-wide (the job count reported to LiveKit)."""
    draining: bool
    """The supervisor admits no new jobs (draining or stopping)."""
    worker_load: float | None = None
    """The load the worker bridge reports to LiveKit, in [0, 1] (only ``with_load``)."""
    full: bool = False
    """One more job would be refused (only ``with_load``)."""
    livekit_state: BridgeState | None = Field(default=None, strict=False)
    """The agent's LiveKit worker registration, None when it has none."""
    worker_id: str = ""
    """The LiveKit worker id of the registration ("" without one)."""
