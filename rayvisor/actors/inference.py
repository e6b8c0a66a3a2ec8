"""Inference runners (livekit-agents' end-of-turn detector, ...) served by rayvisor.

LiveKit Agents runs one inference process per worker and its jobs reach it through
``ctx.inference_executor.do_inference(method, data)``. rayvisor runs one ``InferenceActor``
per Ray node instead, shared by that node's jobs: a detached, named actor
(``rayvisor-inference-<node id>`` in the namespace) that Ray restarts when it dies.

A job holds a ``RayInferenceExecutor`` (livekit-agents' ``InferenceExecutor`` protocol). On
first use it finds (or creates, with the job's registered runners) its node's actor; every
call is bounded by ``call_timeout``; a call that finds the actor dead re-finds or re-creates
it and is retried once. ``stop_inference_actors(namespace)`` removes them all (the client's
``stop`` calls it).

livekit-agents is never imported here: the runner registry is read only when the job's
code already imported it, and runner classes travel to the actor pickled by Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import sysconfig
import time
import warnings
from typing import Any

import ray
from pydantic import Field
from ray import cloudpickle
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import (
    InferenceError,
    InferenceTimeout,
    InferenceUnavailable,
    RayvisorError,
    UnknownInferenceMethod,
)
from ..messages import ErrorRecord, Record, decode, decode_reply, encode, register
from ..rooms.local import DEFAULT_NAMESPACE
from . import main_thread_registries

logger = logging.getLogger("rayvisor.inference")

main_thread_registries.install_in_ray_workers()  # agents' livekit plugins load on actor threads

INFERENCE_ACTOR_PREFIX = "rayvisor-inference-"
DEFAULT_INFERENCE_CALL_TIMEOUT = 30.0
"""Bound of one ``do_inference`` call (runners answer in milliseconds; callers such as the
end-of-turn detector apply their own, shorter, timeouts on top)."""
RESTART_POLL_INTERVAL = 0.1
"""How often a call retries while Ray restarts the inference actor (within ``call_timeout``)."""
DEFAULT_INFERENCE_INITIALIZE_TIMEOUT = 300.0
"""Bound of the wait for a new (or restarted) actor's runners to initialize, as LiveKit
Agents' ``initialize_timeout`` for its inference process (models may be loaded from disk)."""
ACTOR_LOOKUP_TIMEOUT = 30.0
"""Bound of finding or creating the node's inference actor (GCS calls)."""
ACTOR_MAX_CONCURRENCY = 1000
"""Calls the actor accepts at once; runners themselves run on ``threads`` threads."""
MIN_RUN_THREADS = 2
"""Runner threads at least (else one per CPU, as LiveKit Agents' inference process), so one
slow call never holds up the others even on a one-CPU node."""
MAX_METHOD_CHARS = 256

_RUNNER_REGISTRY_MODULE = "livekit.agents.inference_runner"
RunnerClasses = dict[str, type]
"""Inference method name -> runner class (``_InferenceRunner`` subclass)."""


# --------------------------------------------------------------------------- records


@register
class InferenceCall(Record):
    """One ``do_inference`` request to the node's inference actor."""

    method: str = Field(min_length=1, max_length=MAX_METHOD_CHARS)
    data: bytes


@register
class InferenceReply(Record):
    """A runner's answer."""

    data: bytes | None


@register
class InferenceActorInfo(Record):
    """Where an inference actor runs and which runners it serves."""

    pid: int
    node_id: str
    runners: list[str]
    """Runners initialized and ready."""
    failed: dict[str, str]
    """Runners whose construction or ``initialize()`` raised: name -> error."""
    restarted: bool
    """Ray restarted this actor (it died at least once)."""


# --------------------------------------------------------------------------- naming and registry


def inference_actor_name(node_id: str) -> str:
    """The name of a node's inference actor (within the rayvisor namespace)."""
    return f"{INFERENCE_ACTOR_PREFIX}{node_id}"


def registered_runners() -> RunnerClasses:
    """A copy of livekit-agents' runner registry in this process; empty when the process
    never imported livekit.agents (so nothing is imported here)."""
    module = sys.modules.get(_RUNNER_REGISTRY_MODULE)
    if module is None:
        return {}
    return dict(module._InferenceRunner.registered_runners)


def _ship_runner_code(runners: RunnerClasses) -> None:
    """Runner classes from modules that are not installed (an agent file, a test module)
    travel by value, so the actor can rebuild them on any node."""
    installed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for cls in runners.values():
        module = sys.modules.get(getattr(cls, "__module__", "") or "")
        if module is None or module.__name__ == "__main__":
            continue  # __main__ is pickled by value already
        path = getattr(module, "__file__", None) or ""
        if not path or any(path.startswith(prefix) for prefix in installed):
            continue
        cloudpickle.register_pickle_by_value(module)


# --------------------------------------------------------------------------- the actor


def _initialized_runner(name: str, cls: type) -> Any:
    """Construct and initialize one runner (on a pool thread)."""
    started = time.perf_counter()
    try:
        runner = cls()
        runner.initialize()
    except Exception:
        logger.exception("inference runner failed to initialize", extra={"runner": name})
        raise
    logger.info("inference runner initialized", extra={
        "runner": name, "elapsed_s": round(time.perf_counter() - started, 3)})
    return runner


def _as_reply_data(method: str, data: Any) -> bytes | None:
    """A runner's return value as bytes (or None); anything else is an ``InferenceError``."""
    if data is None or isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise InferenceError(f"inference runner {method!r} returned {type(data).__name__}, not bytes or None")


@ray.remote(num_cpus=0)
class InferenceActor:
    """A node's inference runners. Each runner is constructed and initialized once, when the
    actor starts (or when a job adds it); calls run on a thread pool, so a slow runner does
    not hold up other calls. Replies are msgpack records (errors as ``ErrorRecord``)."""

    def __init__(self, runners: RunnerClasses, threads: int | None = None) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads or max(MIN_RUN_THREADS, os.cpu_count() or 1), thread_name_prefix="rayvisor-inference")
        self._runners: dict[str, concurrent.futures.Future[Any]] = {}
        self._start(runners)

    def _start(self, runners: RunnerClasses) -> None:
        for name, cls in runners.items():
            if name not in self._runners:
                self._runners[name] = self._pool.submit(_initialized_runner, name, cls)

    async def _settled(self) -> None:
        """Wait until every runner started so far has initialized (or failed)."""
        pending = [asyncio.wrap_future(f) for f in self._runners.values()]
        if pending:
            await asyncio.wait(pending)

    def _info(self) -> InferenceActorInfo:
        ready, failed = [], {}
        for name, fut in self._runners.items():
            if fut.done() and fut.exception() is not None:
                failed[name] = repr(fut.exception())
            elif fut.done():
                ready.append(name)
        context = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray's own property reads its deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = context.was_current_actor_reconstructed
        return InferenceActorInfo(pid=os.getpid(), node_id=context.get_node_id(), runners=sorted(ready),
                                  failed=failed, restarted=restarted)

    async def ready(self) -> bytes:
        """``InferenceActorInfo`` once every runner has initialized (or failed to)."""
        await self._settled()
        return encode(self._info())

    async def add_runners(self, runners: RunnerClasses) -> bytes:
        """Serve runners a job has but this actor lacks; ``InferenceActorInfo`` once they are ready."""
        self._start(runners)
        return await self.ready()

    async def _runner(self, method: str) -> Any:
        fut = self._runners.get(method)
        if fut is None:
            raise UnknownInferenceMethod(
                f"no inference runner {method!r} on this node (serving: {sorted(self._runners)})")
        try:
            return await asyncio.wrap_future(fut)
        except Exception as err:
            raise InferenceError(f"inference runner {method!r} failed to initialize: {err!r}") from None

    async def do_inference(self, call: bytes) -> bytes:
        """Run one ``InferenceCall``; an ``InferenceReply`` or an ``ErrorRecord``."""
        try:
            request = decode(call, InferenceCall)
            runner = await self._runner(request.method)
            try:
                data = await asyncio.wrap_future(self._pool.submit(runner.run, request.data))
            except Exception as err:
                raise InferenceError(f"inference of {request.method} failed: {type(err).__name__}: {err}") from None
            return encode(InferenceReply(data=_as_reply_data(request.method, data)))
        except RayvisorError as err:
            return encode(ErrorRecord.of(err))


def inference_actor(namespace: str, node_id: str, runners: RunnerClasses) -> Any:
    """The node's inference actor, created with ``runners`` when it does not exist yet.
    Blocking (GCS calls): call it off the event loop."""
    _ship_runner_code(runners)
    return InferenceActor.options(
        name=inference_actor_name(node_id),
        namespace=namespace,
        lifetime="detached",  # outlives the job that created it; shared by the node's jobs
        get_if_exists=True,
        max_restarts=-1,  # Ray restarts it whenever it dies
        max_concurrency=ACTOR_MAX_CONCURRENCY,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=True),
    ).remote(runners)


def stop_inference_actors(namespace: str) -> list[str]:
    """Kill every inference actor of ``namespace`` (no restart); the names killed."""
    killed = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if actor["namespace"] != namespace or not name.startswith(INFERENCE_ACTOR_PREFIX):
            continue
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:
            continue  # ended meanwhile
        killed.append(name)
    return killed


# --------------------------------------------------------------------------- the job side


class _ActorLost(Exception):
    """The actor behind ``handle`` died (or is unreachable) during a call."""

    def __init__(self, handle: Any, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.handle = handle
        self.restarting = isinstance(cause, ActorUnavailableError)
        """Ray is restarting the actor: the same handle answers again soon."""


class RayInferenceExecutor:
    """What a job gives as ``ctx.inference_executor``: livekit-agents' ``InferenceExecutor``
    protocol, served by its node's ``InferenceActor``.

    First use finds or creates the actor (bounded by ``ACTOR_LOOKUP_TIMEOUT``) and waits for
    its runners (``initialize_timeout``); each call is bounded by ``call_timeout``. A call
    that finds the actor dead re-finds or re-creates it and is retried once
    (``recoveries`` counts these); errors are ``rayvisor.errors.InferenceError`` types.
    ``namespace``: the rayvisor namespace the job serves (what ``stop_inference_actors`` and
    the client's ``stop`` clean up); not Ray's runtime namespace, which is the driver's.
    """

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, *, node_id: str | None = None,
                 call_timeout: float = DEFAULT_INFERENCE_CALL_TIMEOUT,
                 initialize_timeout: float = DEFAULT_INFERENCE_INITIALIZE_TIMEOUT) -> None:
        self.namespace = namespace
        self.call_timeout = call_timeout
        self.initialize_timeout = initialize_timeout
        self.recoveries = 0
        self._node_id = node_id
        self._actor: Any = None
        self._lock = asyncio.Lock()

    @property
    def node_id(self) -> str:
        """The node whose inference actor serves this executor (this process's by default)."""
        if self._node_id is None:
            self._node_id = ray.get_runtime_context().get_node_id()
        return self._node_id

    async def do_inference(self, method: str, data: bytes) -> bytes | None:
        """Run ``method`` on ``data`` in the node's inference actor."""
        call = encode(InferenceCall.build(method=method, data=data))
        loop = asyncio.get_running_loop()
        restart_deadline = loop.time() + self.call_timeout
        recovered = False
        while True:
            try:
                return await self._call(method, call)
            except _ActorLost as lost:
                if lost.restarting and loop.time() < restart_deadline:
                    await asyncio.sleep(RESTART_POLL_INTERVAL)  # Ray is bringing it back: same handle
                    continue
                if recovered:
                    raise InferenceUnavailable(
                        f"the inference actor of node {self.node_id} died again after being re-created: {lost}"
                    ) from None
                self._recover(lost, method)
                recovered = True

    async def actor_info(self) -> InferenceActorInfo:
        """Where the node's inference actor runs and what it serves (finds or creates it)."""
        actor = await self._ensure_actor()
        return decode_reply(await self._bounded(actor, actor.ready.remote(), self.initialize_timeout,
                                                "initializing its runners"), InferenceActorInfo)

    def _recover(self, lost: _ActorLost, method: str) -> None:
        """Forget the dead handle so the next call finds or re-creates the actor."""
        if self._actor is lost.handle:
            self._actor = None
        self.recoveries += 1
        logger.warning("inference actor lost; finding or re-creating it", extra={
            "node_id": self.node_id, "method": method, "error": str(lost), "recoveries": self.recoveries})

    async def _call(self, method: str, call: bytes) -> bytes | None:
        actor = await self._ensure_actor()
        reply = await self._bounded(actor, actor.do_inference.remote(call), self.call_timeout, f"{method!r}")
        try:
            return decode_reply(reply, InferenceReply).data
        except UnknownInferenceMethod:
            runner = registered_runners().get(method)
            if runner is None:
                raise
        # The actor was created by a job with other runners: give it this job's and retry.
        await self._bounded(actor, actor.add_runners.remote({method: runner}), self.initialize_timeout,
                            f"initializing runner {method!r}")
        reply = await self._bounded(actor, actor.do_inference.remote(call), self.call_timeout, f"{method!r}")
        return decode_reply(reply, InferenceReply).data

    async def _ensure_actor(self) -> Any:
        """The node's actor, found or created (with this job's runners) and ready."""
        async with self._lock:
            if self._actor is not None:
                return self._actor
            node_id = self.node_id
            try:
                actor = await asyncio.wait_for(
                    asyncio.to_thread(inference_actor, self.namespace, node_id, registered_runners()),
                    ACTOR_LOOKUP_TIMEOUT)
            except asyncio.TimeoutError:
                raise InferenceTimeout(
                    f"finding the inference actor of node {node_id} took over {ACTOR_LOOKUP_TIMEOUT}s") from None
            info = decode_reply(await self._bounded(actor, actor.ready.remote(), self.initialize_timeout,
                                                    "initializing its runners"), InferenceActorInfo)
            logger.info("inference actor ready", extra={
                "node_id": info.node_id, "pid": info.pid, "runners": info.runners, "failed": info.failed})
            self._actor = actor
            return actor

    async def _bounded(self, actor: Any, ref: Any, timeout: float, what: str) -> Any:
        """Await one actor call within ``timeout``; a dead actor is ``_ActorLost``."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
        except asyncio.TimeoutError:
            raise InferenceTimeout(
                f"the inference actor of node {self.node_id} did not answer {what} within {timeout}s") from None
        except RayActorError as err:
            raise _ActorLost(actor, err) from None
        except RayTaskError as err:  # e.g. runner classes that cannot be unpickled there
            raise InferenceError(f"the inference actor could not run {what}: {err.cause or err}") from None
