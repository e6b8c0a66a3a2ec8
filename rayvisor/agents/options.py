"""``WorkerOptions``: what an agent author configures, with livekit-agents' field names."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import inspect
import math
import os
import types
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidAgent
from ..messages import RestartPolicy

if TYPE_CHECKING:
    from .job import JobContext, JobProcess
    from .request import JobRequest, LoadInfo


class AutoSubscribe(str, enum.Enum):
    """Which tracks ``ctx.connect`` subscribes to (livekit-agents' values)."""

    SUBSCRIBE_ALL = "subscribe_all"
    SUBSCRIBE_NONE = "subscribe_none"
    AUDIO_ONLY = "audio_only"
    VIDEO_ONLY = "video_only"


MAX_TOKEN_TTL = 366 * 24 * 3600.0
"""Longest ``token_ttl`` accepted (a JWT's expiry must stay a representable date)."""

START_HTTP_PORT = 8081
"""``rayvisor start``'s health endpoint port when ``port`` is None (LiveKit Agents' production default)."""
DEV_HTTP_PORT = 0
"""``rayvisor dev``'s: a free port, so several dev runs never collide (LiveKit Agents' dev default)."""
MAX_PORT = 65535


def _finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite as a float (huge ints are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


@dataclass(frozen=True, kw_only=True)
class WorkerPermissions:
    """What the agent participant may do in its room (livekit-agents' ``WorkerPermissions``):
    sent when the worker registers and put into the room tokens rayvisor mints."""

    can_publish: bool = True
    can_subscribe: bool = True
    can_publish_data: bool = True
    can_update_metadata: bool = True
    can_publish_sources: list[str] = field(default_factory=list)
    hidden: bool = False


LIVEKIT_ENV = {"ws_url": "LIVEKIT_URL", "api_key": "LIVEKIT_API_KEY", "api_secret": "LIVEKIT_API_SECRET"}
"""Where each LiveKit setting is read from when it is not given (read where the options are built)."""


SECRET_ENV = LIVEKIT_ENV["api_secret"]


@contextmanager
def secret_hidden_from_children() -> Iterator[None]:
    """Without ``LIVEKIT_API_SECRET`` in this process's environment for the duration, so
    processes started meanwhile (a local Ray's raylet, hence every Ray worker) lack it."""
    secret = os.environ.pop(SECRET_ENV, None)
    try:
        yield
    finally:
        if secret is not None:
            os.environ[SECRET_ENV] = secret


def forget_secret() -> None:
    """Drop ``LIVEKIT_API_SECRET`` from a job process's environment (a cluster whose nodes
    were started with it exported would otherwise hand it to every job)."""
    os.environ.pop(SECRET_ENV, None)


LIVEKIT_AGENTS_MODULES = ("livekit.agents", "livekit.plugins")


def uses_livekit_agents(fnc: Callable[..., Any]) -> bool:
    """Whether the module that defines ``fnc`` uses livekit-agents: one of its globals is a
    module, class or function from ``livekit.agents`` or ``livekit.plugins``."""
    for value in list(getattr(fnc, "__globals__", {}).values()):
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and name.startswith(LIVEKIT_AGENTS_MODULES):
            return True
    return False


def _from_env(name: str) -> Callable[[], str]:
    return lambda: os.environ.get(LIVEKIT_ENV[name], "")


JOB_SLOTS_ENV = "RAYVISOR_JOB_SLOTS"
"""Environment variable giving ``job_slots``' default: ``on`` / ``off`` / ``auto`` (unset: auto)."""
_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
           "off": False, "": None, "auto": None}


def job_slots_from_env() -> bool | None:
    """``job_slots``' default, from ``RAYVISOR_JOB_SLOTS`` (a deployment sets it where the
    autoscaler's config is out of the supervisor's sight, e.g. a KubeRay sidecar)."""
    value = os.environ.get(JOB_SLOTS_ENV, "").strip().lower()
    if value not in _SWITCH:
        raise InvalidAgent(f"{JOB_SLOTS_ENV}={value!r}: use on, off or auto")
    return _SWITCH[value]


class EndWhen(str, enum.Enum):
    """When a job ends on its own, besides an explicit shutdown or the room's deletion."""

    ROOM_EMPTY = "room_empty"
    """When every STANDARD and SIP participant has left (after at least one joined)."""
    NEVER = "never"
    """Only on ``ctx.shutdown``, ``client.shutdown`` or the room being deleted."""


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """An agent and how its jobs are run. Validated on construction (fail fast)."""

    entrypoint_fnc: Callable[["JobContext"], Awaitable[None]]
    """``async def entrypoint(ctx: JobContext)``: the job's main function."""
    prewarm_fnc: Callable[["JobProcess"], Any] | None = None
    """``def prewarm(proc: JobProcess)``: runs once in the job's process before the entrypoint."""
    agent_name: str = ""
    """Name jobs are dispatched to (``JobSpec.agent_name``, LiveKit explicit dispatch)."""

    shutdown_process_timeout: float = 60.0
    """One budget (seconds) for the whole shutdown: cancel the entrypoint, run shutdown
    callbacks, disconnect. When it is spent the job's actor is killed."""
    initialize_process_timeout: float = 10.0
    """Bound (seconds) on creating the job's actor, loading the agent and running ``prewarm_fnc``."""
    failover_outcome_grace: float = 1.0
    """A restarted supervisor finds a job whose shutdown deadline passed while no supervisor
    watched: the job gets this long (seconds) to hand over an outcome it may already hold
    (its shutdown finished in time) before it is killed with ``shutdown_timeout``."""
    death_verdict_timeout: float = 30.0
    """A job actor's calls fail at once when its node crashes, but Ray declares the node dead
    only once its health checks fail (about 15 s with Ray's defaults). The job is recorded
    ``actor_crashed`` at once; the supervisor waits this long (seconds) for Ray's verdict and
    corrects it to ``node_lost`` if the node died with the actor."""
    snapshot_before_kill_timeout: float = 0.1
    """Seconds a kill waits for the job's snapshot that tells a successor supervisor why the
    job ended (then it kills anyway: the shutdown bound comes first)."""
    end_when: EndWhen = EndWhen.ROOM_EMPTY
    """Which room condition ends a job on its own (see ``EndWhen``)."""

    request_fnc: Callable[["JobRequest"], Awaitable[None]] | None = None
    """``async def request_fnc(req: JobRequest)``: ``await req.accept()`` or ``await req.reject()``
    each job before it starts (runs in the supervisor). Default: accept."""
    request_timeout: float = 10.0
    """Bound (seconds) on ``request_fnc``; a request neither accepted nor rejected in time is rejected."""
    max_jobs: int | None = None
    """Jobs this supervisor runs at once; beyond it a submit fails with ``AtCapacity``."""
    load_fnc: Callable[["LoadInfo"], float] | None = None
    """``def load_fnc(info: LoadInfo) -> float`` in [0, 1], run in a thread at each submit."""
    load_threshold: float = 0.75
    """Load at or above which a submit fails with ``AtCapacity`` (only with a ``load_fnc``)."""
    load_timeout: float = 1.0
    """Bound (seconds) on ``load_fnc``, which runs in a thread; no answer in time is ``AtCapacity``."""
    allow_pending: bool = False
    """When no ``rayvisor_slot`` is free, admit the job anyway and let it wait for a node (the
    autoscaler's cue) instead of ``AtCapacity``; see ``pending_timeout``."""
    pending_timeout: float = 300.0
    """A pending job not placed within this many seconds is REJECTED, cause ``no_capacity``."""
    job_slots: bool | None = field(default_factory=job_slots_from_env)
    """Whether each job actor asks Ray for one ``rayvisor_slot`` (a supervisor-wide setting;
    default from ``RAYVISOR_JOB_SLOTS``). None: yes once the cluster declares the resource, in
    the autoscaler's config (a node type advertises it) or on any node, alive or gone; never
    inferred from which nodes happen to be alive. With slots and none free, a job pends
    (``allow_pending``) or gets ``AtCapacity`` naming ``rayvisor_slot``: it never runs on a
    node without slots (the head)."""
    min_free_slots: int = 0
    """Headroom (a supervisor-wide setting): the supervisor asks Ray's autoscaler
    (``ray.autoscaler.sdk.request_resources``) for room for every live job, pending ones
    included, plus this many free job bundles (a slot each), which the warm pool's actors may
    fill; so a node is added before the slots run out. 0: no headroom."""
    refused_demand_timeout: float = 300.0
    """A submit refused for lack of resources still counts in the autoscaler request for this
    long (seconds, a supervisor-wide setting), so the next caller finds room: one per room,
    taken back as soon as a job of that agent and room is admitted."""
    autoscaler_request_interval: float = 0.5
    """Least time (seconds) between two updates of the request to Ray's autoscaler (a
    supervisor-wide setting); a burst of admissions makes one update."""
    drain_timeout: float = 1800.0
    """``rayvisor start`` on SIGTERM, and ``client.drain()`` by default: how long running jobs
    may keep going before they are shut down (cause ``drained``)."""

    restart: RestartPolicy = RestartPolicy.TEMPORARY
    """Job restart type (``JobSpec.restart`` overrides it per job)."""
    ping_interval: float = 2.5
    """How often the supervisor pings each running job actor."""
    ping_timeout: float = 15.0
    """A job whose actor has not answered a ping for this long is killed (cause ``unresponsive``)."""
    memory_check_interval: float = 5.0
    """How often a job actor reports its resident memory."""
    job_memory_warn_mb: float = 500.0
    """Above this RSS the supervisor logs a (rate-limited) warning."""
    job_memory_limit_mb: float = 0.0
    """Above this RSS the job is shut down (cause ``memory_limit``); 0 disables the limit."""
    memory_warn_interval: float = 30.0
    """Least time between two memory warnings for one job."""

    num_idle_actors: int = 1
    """Job actors kept created and prewarmed ahead of demand (the warm pool's floor)."""
    max_idle_actors: int = 4
    """The warm pool's ceiling; between the two it follows the recent arrival rate."""
    pool_rate_window: float = 60.0
    """Window (seconds) over which the warm pool measures the arrival rate."""
    pool_backoff_initial: float = 0.5
    """First delay before replacing an idle actor whose prewarm failed; doubles each failure."""
    pool_backoff_max: float = 30.0

    livekit_agents_context: bool | None = None
    """Give jobs livekit-agents' own ``JobContext`` (``get_job_context()``, the per-job
    ``http_context.http_session()``, AgentSession's hooks). None: yes when the module that
    defines ``entrypoint_fnc`` uses ``livekit.agents`` or ``livekit.plugins`` (decided here,
    where the agent is defined; job processes of other agents never import livekit-agents)."""

    isolate_participants: bool = True
    """Run each participant entrypoint in its own child actor (crash isolation); False runs
    them as tasks in the job's process, as LiveKit Agents does."""
    participant_restart: RestartPolicy = RestartPolicy.TEMPORARY
    """Restart a participant entrypoint's child actor after it crashed or raised
    (``transient``) while the participant is still in the room, or never (``temporary``)."""
    participant_shutdown_timeout: float = 10.0
    """Budget (seconds) for a participant actor's shutdown callbacks when its participant
    leaves; it is killed after that. During a job's shutdown the job's budget also bounds it."""
    participant_ping_interval: float = 2.5
    """How often a job actor pings each of its running participant actors (liveness)."""
    participant_ping_timeout: float = 15.0
    """A participant actor that has not answered a ping within this long (its event loop is
    blocked, e.g. by a ``time.sleep`` in the entrypoint) is killed and ends FAILED with cause
    ``unresponsive``; ``participant_restart`` treats it as a crash: ``participant_restart`` decides what follows."""
    max_restarts: int = 3
    """Restart intensity: at most this many restarts within ``restart_window`` seconds."""
    restart_window: float = 60.0

    max_concurrent_starts: int = 0
    """Job actors the supervisor starts at once (a supervisor-wide setting); more wait,
    STARTING, and their ``initialize_process_timeout`` begins with their turn; jobs go before
    warm-pool refills. 0: the cluster's CPU count, re-read every ``cluster_view_interval`` (a
    start is a fresh interpreter: CPU-bound). Jobs of an ``allow_pending`` agent do not wait for a slot."""
    pool_refill_delay: float = 0.25
    """Seconds without a job start before warm pools refill (a supervisor-wide setting):
    a refill starts an interpreter, CPU-bound, and would slow the burst it refills after,
    even one of jobs submitted one by one. Under a steady stream of starts a refill waits at
    most 4 times this."""
    job_resources: dict[str, float] = field(default_factory=dict)
    """Ray resources each job actor asks for (e.g. ``{"GPU": 1}`` or a custom resource);
    without ``"CPU"`` here, job actors reserve no CPU (``num_cpus=0``)."""
    max_metadata_bytes: int = 64 * 1024
    """Largest job metadata (UTF-8 bytes) the supervisor accepts."""
    finished_job_history: int = 10_000
    """Finished job records the supervisor keeps for ``status``; the oldest are dropped."""
    event_history: int = 10_000
    """State transitions kept for ``client.events`` / the lifecycle printed by ``dev``."""
    cluster_view_interval: float = 1.0
    """How often (seconds) the supervisor re-reads the cluster's nodes and resources (a
    supervisor-wide setting): a node that joins is used, and the warm pool's actors on a lost
    node stop counting, within this long."""
    control_call_timeout: float = 10.0
    """Bound (seconds) on any control call that should answer at once (room operations,
    client calls to the supervisor)."""
    room_poll_timeout: float = 5.0
    """How long one long-poll for room events waits before it is re-issued."""

    ws_url: str = field(default_factory=_from_env("ws_url"))
    """LiveKit server url (default: ``LIVEKIT_URL``). With ``api_key`` and ``api_secret`` set
    too, jobs join real LiveKit rooms and ``dev``/``start`` register a worker; with none of
    the three, jobs use the local room backend."""
    api_key: str = field(default_factory=_from_env("api_key"))
    """LiveKit API key (default: ``LIVEKIT_API_KEY``)."""
    api_secret: str = field(default_factory=_from_env("api_secret"), repr=False)
    """LiveKit API secret (default: ``LIVEKIT_API_SECRET``). Stays in the supervisor: job
    actors get tokens minted with it, never the secret."""
    permissions: WorkerPermissions = field(default_factory=WorkerPermissions)
    """The agent participant's permissions (registration and minted room tokens)."""
    token_ttl: float = 6 * 3600.0
    """Lifetime (seconds) of the room and API tokens the supervisor mints for a job."""
    room_connect_timeout: float = 10.0
    """Bound (seconds) on ``ctx.connect()`` to a LiveKit room; past it the job fails (``connect_failed``)."""
    worker_status_interval: float = 2.5
    """How often the worker bridge sends ``UpdateWorkerStatus`` (load, job count) to LiveKit."""
    assignment_timeout: float = 7.5
    """How long capacity promised in an ``AvailabilityResponse`` is held for the ``JobAssignment``."""
    reconnect_initial_delay: float = 0.5
    """First wait before the worker bridge reconnects to LiveKit; doubles per failure."""
    reconnect_max_delay: float = 30.0
    """Ceiling of the worker bridge's reconnect backoff (it starts over after a connection
    that lasted at least this long)."""
    worker_heartbeat_interval: float = 15.0
    """Websocket ping interval of the worker bridge; a server that stops answering is
    reconnected to, even if it never closed the connection."""

    host: str = ""
    """Interface ``dev``/``start`` serve their HTTP health endpoint on (``GET /``, ``GET /worker``),
    as LiveKit Agents' ``host``: "" is every interface."""
    port: int | None = None
    """Port of that endpoint, as LiveKit Agents' ``port``; 0 is a free port. None: the mode's
    default, ``START_HTTP_PORT`` (8081) for ``start`` and ``DEV_HTTP_PORT`` (0) for ``dev``,
    LiveKit Agents' ``ServerEnvOption`` defaults."""
    health_check_timeout: float = 2.0
    """Bound (seconds) on the supervisor's answer to one health probe; past it, ``GET /`` answers 503."""

    def __post_init__(self) -> None:
        if not inspect.iscoroutinefunction(self.entrypoint_fnc):
            raise InvalidAgent(
                f"entrypoint_fnc must be an `async def` function taking a JobContext, got {self.entrypoint_fnc!r}"
            )
        if self.prewarm_fnc is not None and (
            not callable(self.prewarm_fnc) or inspect.iscoroutinefunction(self.prewarm_fnc)
        ):
            raise InvalidAgent("prewarm_fnc must be a plain (non-async) function taking a JobProcess")
        if not isinstance(self.agent_name, str):
            raise InvalidAgent(f"agent_name must be a string, got {type(self.agent_name).__name__}")
        for name in ("shutdown_process_timeout", "initialize_process_timeout", "control_call_timeout",
                     "room_poll_timeout", "participant_shutdown_timeout", "participant_ping_interval",
                     "participant_ping_timeout", "restart_window", "request_timeout",
                     "load_timeout", "pending_timeout",
                     "drain_timeout", "ping_interval", "ping_timeout", "memory_check_interval",
                     "memory_warn_interval", "pool_rate_window", "pool_backoff_initial", "pool_backoff_max",
                     "token_ttl", "room_connect_timeout", "worker_status_interval", "assignment_timeout",
                     "reconnect_initial_delay", "reconnect_max_delay", "worker_heartbeat_interval",
                     "failover_outcome_grace", "death_verdict_timeout", "cluster_view_interval",
                     "pool_refill_delay", "snapshot_before_kill_timeout", "refused_demand_timeout",
                     "autoscaler_request_interval", "health_check_timeout"):
            value = getattr(self, name)
            if not _finite_number(value) or value <= 0:
                raise InvalidAgent(f"{name} must be a positive number of seconds, got {value!r}")
        if self.token_ttl > MAX_TOKEN_TTL:
            raise InvalidAgent(f"token_ttl must be at most {MAX_TOKEN_TTL:g} s (a year), got {self.token_ttl!r}")
        if self.job_slots is not None and not isinstance(self.job_slots, bool):
            raise InvalidAgent(f"job_slots must be True, False or None (decided by the cluster), got {self.job_slots!r}")
        if not isinstance(self.min_free_slots, int) or isinstance(self.min_free_slots, bool) or self.min_free_slots < 0:
            raise InvalidAgent(f"min_free_slots must be a non-negative integer, got {self.min_free_slots!r}")
        if not isinstance(self.max_concurrent_starts, int) or self.max_concurrent_starts < 0:
            raise InvalidAgent(f"max_concurrent_starts must be a non-negative integer, got {self.max_concurrent_starts!r}")
        for name in ("max_metadata_bytes", "finished_job_history", "event_history"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidAgent(f"{name} must be a positive integer, got {value!r}")
        for name, kind in (("end_when", EndWhen), ("participant_restart", RestartPolicy),
                           ("restart", RestartPolicy)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise InvalidAgent(f"{name} must be one of {[e.value for e in kind]}") from None
        if self.participant_restart == RestartPolicy.PERMANENT:
            raise InvalidAgent("participant_restart must be temporary or transient")
        if self.request_fnc is not None and not inspect.iscoroutinefunction(self.request_fnc):
            raise InvalidAgent("request_fnc must be an `async def request_fnc(req: JobRequest)`")
        if self.load_fnc is not None and not callable(self.load_fnc):
            raise InvalidAgent("load_fnc must be a function returning a load in [0, 1]")
        if not isinstance(self.load_threshold, (int, float)) or not 0 < self.load_threshold <= 1:
            raise InvalidAgent(f"load_threshold must be in (0, 1], got {self.load_threshold!r}")
        if self.max_jobs is not None and (not isinstance(self.max_jobs, int) or self.max_jobs < 1):
            raise InvalidAgent(f"max_jobs must be a positive integer or None, got {self.max_jobs!r}")
        for name in ("job_memory_warn_mb", "job_memory_limit_mb"):
            value = getattr(self, name)
            if not _finite_number(value) or value < 0:
                raise InvalidAgent(f"{name} must be a non-negative number of MiB, got {value!r}")
        if not (isinstance(self.num_idle_actors, int) and isinstance(self.max_idle_actors, int)
                and 0 <= self.num_idle_actors <= self.max_idle_actors):
            raise InvalidAgent("need 0 <= num_idle_actors <= max_idle_actors (integers)")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise InvalidAgent(f"max_restarts must be a non-negative integer, got {self.max_restarts!r}")
        if not isinstance(self.job_resources, dict) or not all(
                isinstance(k, str) and _finite_number(v) and v >= 0 for k, v in self.job_resources.items()):
            raise InvalidAgent("job_resources must map resource names to non-negative amounts")
        self._validate_livekit()
        self._validate_http()
        if self.livekit_agents_context is None:
            object.__setattr__(self, "livekit_agents_context", uses_livekit_agents(self.entrypoint_fnc))
        elif not isinstance(self.livekit_agents_context, bool):
            raise InvalidAgent(f"livekit_agents_context must be a bool or None, got {self.livekit_agents_context!r}")
        if self.livekit_agents_context and importlib.util.find_spec("livekit.agents") is None:
            raise InvalidAgent("livekit_agents_context needs livekit-agents: pip install 'rayvisor[agents]'")

    def _validate_livekit(self) -> None:
        given = {name: getattr(self, name) for name in LIVEKIT_ENV}
        if not all(isinstance(value, str) for value in given.values()):
            raise InvalidAgent("ws_url, api_key and api_secret must be strings")
        missing = [f"{name} ({LIVEKIT_ENV[name]})" for name, value in given.items() if not value]
        if 0 < len(missing) < len(given):
            raise InvalidAgent("LiveKit needs ws_url, api_key and api_secret together; missing: " + ", ".join(missing))
        if self.ws_url and not self.ws_url.startswith(("ws://", "wss://", "http://", "https://")):
            raise InvalidAgent(f"ws_url must be a ws://, wss://, http:// or https:// url, got {self.ws_url!r}")
        if not isinstance(self.permissions, WorkerPermissions):
            raise InvalidAgent("permissions must be a rayvisor.WorkerPermissions")

    def _validate_http(self) -> None:
        if not isinstance(self.host, str):
            raise InvalidAgent(f"host must be a string (\"\": every interface), got {self.host!r}")
        if self.port is not None and (isinstance(self.port, bool) or not isinstance(self.port, int)
                                      or not 0 <= self.port <= MAX_PORT):
            raise InvalidAgent(f"port must be an integer in 0..{MAX_PORT} (0: a free port) or None, got {self.port!r}")

    def http_port(self, *, devmode: bool) -> int:
        """The health endpoint's port: ``port``, or the mode's default when it is None."""
        if self.port is not None:
            return self.port
        return DEV_HTTP_PORT if devmode else START_HTTP_PORT

    @property
    def uses_livekit(self) -> bool:
        """Whether jobs join LiveKit rooms (all three LiveKit settings are given)."""
        return bool(self.ws_url)

    def without_credentials(self) -> "WorkerOptions":
        """These options as a job actor gets them: no LiveKit url, key or secret (its tokens
        come with each job's start record)."""
        return dataclasses.replace(self, ws_url="", api_key="", api_secret="")
