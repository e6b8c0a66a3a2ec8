"""The operator side: ``rayvisor.serve``, ``rayvisor.connect`` and the ``Client``.

Client methods are synchronous and bounded; errors come back as ``rayvisor.errors``
types, never as ``RayTaskError``.
"""

from __future__ import annotations

import logging
import sys
import sysconfig
import time
from typing import Any

import ray
from ray import cloudpickle
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..actors.inference import stop_inference_actors
from ..agents.livekit_agents_options import as_rayvisor_options
from ..agents.options import WorkerOptions, secret_hidden_from_children
from ..errors import InternalError, SupervisorNotFound, SupervisorUnavailable, WaitTimeout
from ..messages import (
    Ack,
    AgentRegistered,
    AgentNameRequest,
    DrainRequest,
    DrainResult,
    DrainStarted,
    MetricsSnapshot,
    EventsRequest,
    HealthRequest,
    JobIdRequest,
    JobInfo,
    JobList,
    JobSpec,
    Record,
    ShutdownJobRequest,
    SupervisorHealth,
    Transition,
    TransitionList,
    WaitRequest,
    WorkerBridgeStatus,
    decode_reply,
    encode,
)
from ..rooms.local import DEFAULT_NAMESPACE, ROOM_SERVER_NAME, LocalRooms, room_server
from .autoscaler_request import withdraw_request
from .job_handle import JOB_ACTOR_PREFIX
from .settings import SupervisorSettings
from .supervisor import SUPERVISOR_NAME, Supervisor

logger = logging.getLogger("rayvisor.client")

DEFAULT_CALL_TIMEOUT = 10.0
RETRY_INITIAL_DELAY = 0.05
RETRY_MAX_DELAY = 0.25
"""Backoff between retries of an idempotent call while the supervisor restarts."""


def ensure_ray(address: str | None, **init_kwargs: Any) -> None:
    """Attach to Ray at ``address`` (or start a local Ray when None) unless already connected."""
    if ray.is_initialized():
        return
    init_kwargs.setdefault("include_dashboard", False)
    init_kwargs.setdefault("logging_level", logging.WARNING)
    with secret_hidden_from_children():  # a Ray started here must not pass the secret on to jobs
        ray.init(address=address, **init_kwargs)


def ship_agent_code(opts: WorkerOptions) -> None:
    """Make the agent's own module travel by value to job actors on any node.

    Functions from an installed package (or rayvisor) travel by reference; the module that
    defines the entrypoint (an ``agent.py`` file) is registered with cloudpickle's
    pickle-by-value, so a single-file agent needs nothing installed on worker nodes.
    Modules *it* imports must be installed there or shipped with ``runtime_env``.
    """
    installed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for fn in (opts.entrypoint_fnc, opts.prewarm_fnc):
        if fn is None:
            continue
        module = sys.modules.get(getattr(fn, "__module__", "") or "")
        if module is None or module.__name__ == "__main__" or module.__name__.split(".")[0] == "rayvisor":
            continue
        path = getattr(module, "__file__", None) or ""
        if any(path.startswith(prefix) for prefix in installed):
            continue
        cloudpickle.register_pickle_by_value(module)


def serve(opts: WorkerOptions | Any, *, address: str | None = None, namespace: str = DEFAULT_NAMESPACE,
          call_timeout: float = DEFAULT_CALL_TIMEOUT, log_format: str = "json", register_worker: bool = False,
          settings: SupervisorSettings | None = None, **ray_init_kwargs: Any) -> "Client":
    """Start (or attach to) the namespace's supervisor and register ``opts``' agent.

    ``opts``: rayvisor ``WorkerOptions``, or livekit-agents' ``WorkerOptions``/``ServerOptions``
    or ``AgentServer`` (converted by ``as_rayvisor_options``; ``InvalidAgent`` otherwise).
    With no ``address`` and no Ray running, Ray is started inside this driver, so
    ``ray.shutdown()`` here removes everything. The supervisor and the local room
    server are pinned to this driver's node. ``register_worker``: also register the agent
    as a worker with its LiveKit server (what ``rayvisor dev``/``start`` do when LiveKit
    is configured), so the server's dispatches reach this cluster. ``settings``: the
    supervisor-wide ``SupervisorSettings`` (default: from ``opts``); they are set once, by
    the call that starts the supervisor: a later call asking for others is logged as a
    warning naming each field the supervisor keeps.
    """
    opts = as_rayvisor_options(opts)
    ensure_ray(address, **ray_init_kwargs)
    ship_agent_code(opts)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    room_server(namespace, create=True)
    handle = Supervisor.options(
        name=SUPERVISOR_NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
        scheduling_strategy=here, max_concurrency=10_000,
    ).remote(opts, namespace, log_format, settings)
    client = Client(handle, namespace, call_timeout=call_timeout)
    client.register_agent(opts, settings)
    if register_worker:
        client.start_worker(opts.agent_name)
    return client


def connect(address: str | None = "auto", *, namespace: str = DEFAULT_NAMESPACE,
            call_timeout: float = DEFAULT_CALL_TIMEOUT, **ray_init_kwargs: Any) -> "Client":
    """A client for the supervisor already serving ``namespace`` on the cluster at ``address``."""
    ensure_ray(address, **ray_init_kwargs)
    try:
        handle = ray.get_actor(SUPERVISOR_NAME, namespace=namespace)
    except ValueError:
        raise SupervisorNotFound(
            f"no rayvisor supervisor in namespace {namespace!r}; start one with rayvisor.serve() or `rayvisor start`"
        ) from None
    return Client(handle, namespace, call_timeout=call_timeout)


def local_rooms(address: str | None = "auto", *, namespace: str = DEFAULT_NAMESPACE,
                call_timeout: float = DEFAULT_CALL_TIMEOUT, **ray_init_kwargs: Any) -> LocalRooms:
    """Driver-side access to the local room backend (created on this node if missing)."""
    ensure_ray(address, **ray_init_kwargs)
    return LocalRooms(namespace, call_timeout=call_timeout)


class Client:
    """Submit, inspect and end jobs. Every call is bounded by ``call_timeout``."""

    def __init__(self, handle: Any, namespace: str, *, call_timeout: float = DEFAULT_CALL_TIMEOUT) -> None:
        self._handle = handle
        self.namespace = namespace
        self.call_timeout = call_timeout

    def _call_raw(self, ref: Any, *reply: type[Record], timeout: float | None = None) -> Any:
        try:
            data = ray.get(ref, timeout=timeout if timeout is not None else self.call_timeout)
        except GetTimeoutError:
            raise SupervisorUnavailable(f"the supervisor did not answer within {timeout or self.call_timeout}s") from None
        except RayActorError as err:
            raise SupervisorUnavailable(f"the supervisor is unavailable: {err}") from None
        except RayTaskError as err:  # e.g. options that cannot be unpickled in the supervisor
            raise InternalError(f"the supervisor could not run the call: {err.cause or err}") from None
        return decode_reply(data, *reply)

    def _call(self, method: str, request: Record | Any, *reply: type[Record], timeout: float | None = None,
              retry: bool = True) -> Any:
        """One call; while the supervisor restarts (``SupervisorUnavailable``) an idempotent
        call is retried with backoff until its deadline, so clients ride over a failover."""
        limit = timeout if timeout is not None else self.call_timeout
        deadline = time.monotonic() + limit
        delay = RETRY_INITIAL_DELAY
        while True:
            remaining = max(0.001, deadline - time.monotonic())
            message = request(remaining) if callable(request) else request  # a request that carries its own wait
            try:
                return self._call_raw(getattr(self._handle, method).remote(encode(message)), *reply, timeout=remaining)
            except SupervisorUnavailable:
                if not retry or time.monotonic() + delay >= deadline:
                    raise
            time.sleep(delay)  # backoff between attempts to reach a restarting supervisor
            delay = min(delay * 2, RETRY_MAX_DELAY)

    def register_agent(self, opts: WorkerOptions | Any, settings: SupervisorSettings | None = None) -> AgentRegistered:
        """Register an agent, or replace the one of that name for new jobs: its warm pool is
        restarted on ``opts``' code, live jobs keep the code they started with (``rayvisor dev``
        reloads this way). The reply's ``conflicts`` name the supervisor-wide settings asked for
        (``settings``, or ``opts``' own) that the running supervisor keeps otherwise (logged)."""
        opts = as_rayvisor_options(opts)
        ship_agent_code(opts)  # a reloaded agent is a new module object: ship it by value too
        registered = self._call_raw(self._handle.register_agent.remote(opts, settings), AgentRegistered)
        if registered.conflicts:
            logger.warning("namespace %r's supervisor is already running with other supervisor-wide settings; "
                           "agent %r gets its settings, not these: %s", self.namespace, opts.agent_name,
                           "; ".join(registered.conflicts))
        return registered

    def submit(self, spec: JobSpec | None = None, **fields: Any) -> str:
        """Admit a job (``JobSpec`` or its fields as keywords); returns its id at once."""
        spec = spec if spec is not None else JobSpec(**fields)
        # Not retried: a submit that reached a supervisor which then died may have been admitted.
        return self._call("submit", spec, JobInfo, retry=False).id

    def status(self, job_id: str) -> JobInfo:
        return self._call("status", JobIdRequest.build(job_id=job_id), JobInfo)

    def list(self) -> list[JobInfo]:
        return self._call("list_jobs", JobIdRequest(job_id=""), JobList).jobs

    def shutdown(self, job_id: str, reason: str = "") -> JobInfo:
        """Start the job's shutdown protocol; returns at once (see ``wait``)."""
        return self._call("shutdown", ShutdownJobRequest.build(job_id=job_id, reason=reason), JobInfo)

    def wait(self, job_id: str, timeout: float = 60.0) -> JobInfo:
        """The job's terminal ``JobInfo``; ``WaitTimeout`` if it is still live after ``timeout``."""
        WaitRequest.build(job_id=job_id, timeout=timeout)  # validate once, before any call
        # Each retry asks the supervisor to wait only for what is left of the caller's timeout.
        return self._call("wait", lambda remaining: WaitRequest(
            job_id=job_id, timeout=max(0.0, remaining - self.call_timeout)), JobInfo,
            timeout=timeout + self.call_timeout)

    def events(self, after_seq: int = -1, timeout: float = 0.0) -> list[Transition]:
        """State transitions after ``after_seq`` (waits up to ``timeout`` for the next)."""
        return self._call("events", EventsRequest.build(after_seq=after_seq, timeout=timeout), TransitionList,
                          timeout=timeout + self.call_timeout).events

    def drain(self, timeout: float = 600.0) -> DrainResult:
        """Admit no more jobs (``Draining``), let running ones end for ``timeout`` seconds,
        shut the rest down (cause ``drained``), and return once none is live."""
        started = self._call("drain", DrainRequest.build(timeout=timeout), DrainStarted)
        return self._call("wait_drained", DrainRequest(timeout=started.bound + self.call_timeout), DrainResult,
                          timeout=started.bound + 2 * self.call_timeout)

    def start_worker(self, agent_name: str | None = None) -> WorkerBridgeStatus:
        """Register the agent (default: the only one) as a worker with its LiveKit server;
        idempotent. ``LiveKitNotConfigured`` if it has no LiveKit settings."""
        return self._call("start_worker", AgentNameRequest.build(agent_name=agent_name), WorkerBridgeStatus)

    def worker_status(self, agent_name: str | None = None) -> WorkerBridgeStatus:
        """Where the agent's LiveKit worker registration stands."""
        return self._call("worker_status", AgentNameRequest.build(agent_name=agent_name), WorkerBridgeStatus)

    def metrics(self) -> MetricsSnapshot:
        """The supervisor's counters, gauges and histogram summaries."""
        return self._call("metrics", JobIdRequest(job_id=""), MetricsSnapshot)

    def health(self, agent_name: str | None = None, *, with_load: bool = False,
               timeout: float | None = None) -> SupervisorHealth:
        """The supervisor's cheap self-report (jobs, draining, LiveKit registration; the
        load too with ``with_load``), ``SupervisorUnavailable`` past ``timeout``."""
        return self._call("health", HealthRequest.build(agent_name=agent_name, with_load=with_load),
                          SupervisorHealth, timeout=timeout)

    def stop(self, timeout: float = 120.0) -> None:
        """Shut every job down through the protocol (new submits get ``Draining``), then remove
        the supervisor, the local rooms, the nodes' inference actors, and any job actor still
        alive after ``timeout``."""
        stopped = False
        try:
            self._call("stop", JobIdRequest(job_id=""), Ack, timeout=timeout, retry=False)
            stopped = True  # and withdrew its request to Ray's autoscaler
        except SupervisorUnavailable:
            pass  # already stopped (or dead): still clean up below
        finally:
            if not stopped:  # a supervisor killed here, or already dead, left its request standing
                withdraw_request()
            for actor in ray.util.list_named_actors(all_namespaces=True):
                name = actor["name"]
                if actor["namespace"] == self.namespace and (
                        name.startswith(JOB_ACTOR_PREFIX) or name in (SUPERVISOR_NAME, ROOM_SERVER_NAME)):
                    try:
                        ray.kill(ray.get_actor(name, namespace=self.namespace), no_restart=True)
                    except ValueError:
                        pass  # ended meanwhile
            stop_inference_actors(self.namespace)  # detached, shared by the jobs of each node

    def wait_for_state(self, job_id: str, *states: Any, timeout: float = 10.0, poll: float = 0.02) -> JobInfo:
        """Poll ``status`` until the job is in one of ``states`` (``WaitTimeout`` otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.status(job_id)
            if info.state in states:
                return info
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} is {info.state.value}, not {[s.value for s in states]}, after {timeout}s")
            time.sleep(poll)
