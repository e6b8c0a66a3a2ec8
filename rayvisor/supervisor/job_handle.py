"""Every Ray API call the supervisor makes on a job actor goes through ``JobActorHandle``.

Keeping them in one place (as Ray Serve's ``ActorReplicaWrapper`` does) keeps the
supervisor's state machine free of Ray details and every call bounded.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import Any

import ray
from ray.core.generated.common_pb2 import ActorDiedErrorContext
from ray.exceptions import RayActorError, RayTaskError

from ..actors.job_actor import JobActor
from ..agents.options import WorkerOptions
from ..messages import ActorStarted, JobDescription, JobOutcome, JobStart, ShutdownRequest, decode, encode
from .cluster_view import SLOT_RESOURCE

logger = logging.getLogger("rayvisor.supervisor")

JOB_ACTOR_PREFIX = "rayvisor-job-"


class ActorGone(Exception):
    """The job actor died (crash, kill, or its node was lost)."""


class StartError(Exception):
    """The job actor could not start the job (prewarm or agent code raised)."""


class ActorFate(enum.Enum):
    """Ray's verdict on a job actor whose calls failed, from the GCS actor table."""

    UNDECIDED = "undecided"
    """Ray still counts it alive (or cannot say): a crashed node is declared dead only
    after its health checks fail, while calls to its actors fail at once."""
    DIED_WITH_NODE = "died_with_node"
    DIED = "died"
    """Dead for any other reason: its process crashed or was killed."""


FATE_POLL_INTERVAL = 0.1
"""How often (seconds) ``JobActorHandle.fate`` asks the GCS while Ray has not decided."""


class JobActorHandle:
    """One job actor, seen from the supervisor."""

    def __init__(self, actor: Any, name: str) -> None:
        self._actor = actor
        self.name = name

    @classmethod
    def create(cls, *, name: str, opts: WorkerOptions, supervisor: Any, namespace: str,
               slot: bool = False) -> "JobActorHandle":
        """Ask Ray for a job actor: named (``rayvisor-job-...``) and detached, so it outlives
        the supervisor; with ``slot`` it also takes one ``rayvisor_slot`` of its node."""
        assert name.startswith(JOB_ACTOR_PREFIX)
        custom = dict(opts.job_resources)
        if slot:
            custom[SLOT_RESOURCE] = custom.get(SLOT_RESOURCE, 0) + 1
        actor = JobActor.options(
            name=name,
            namespace=namespace,
            lifetime="detached",
            num_cpus=custom.pop("CPU", 0),  # Ray takes CPU and GPU as options, not as resources
            num_gpus=custom.pop("GPU", 0),
            resources=custom,
            max_restarts=0,
            max_concurrency=1000,
        ).remote(opts.without_credentials(), supervisor, namespace)  # the LiveKit secret stays here
        return cls(actor, name)

    async def start(self, start: JobStart, timeout: float) -> ActorStarted:
        """Start the job; raises ``ActorGone``, ``asyncio.TimeoutError`` or the decode error."""
        try:
            data = await asyncio.wait_for(self._actor.start.remote(encode(start)), timeout)
        except RayActorError as err:
            raise ActorGone(str(err)) from err
        except RayTaskError as err:
            raise StartError(str(err.cause if err.cause is not None else err)) from err
        return decode(data, ActorStarted)

    @classmethod
    def attach(cls, name: str, namespace: str) -> "JobActorHandle | None":
        """The live job actor called ``name``, if there is one (supervisor recovery)."""
        try:
            return cls(ray.get_actor(name, namespace=namespace), name)
        except ValueError:
            return None

    @staticmethod
    def names(namespace: str) -> list[str]:
        """The names of the namespace's job actors, live or still being created."""
        return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                if actor["namespace"] == namespace and actor["name"].startswith(JOB_ACTOR_PREFIX)]

    def _actor_table_entry(self) -> dict[str, Any]:
        """The actor's row in Ray's actor table (the GCS); empty if the GCS cannot say."""
        try:
            import ray._private.state as ray_state

            return ray_state.actors(self._actor._actor_id.hex()) or {}
        except Exception as err:  # the GCS may be briefly unreachable while a node goes
            logger.debug("actor table lookup for %s: %r", self.name, err)
            return {}

    def node_id(self) -> str | None:
        """The node Ray placed the actor on, from Ray's actor table (None if never placed)."""
        return (self._actor_table_entry().get("Address") or {}).get("NodeID") or None

    def _fate_now(self) -> ActorFate:
        info = self._actor_table_entry()
        if info.get("State") != "DEAD":
            return ActorFate.UNDECIDED
        context = getattr(info.get("DeathCause"), "actor_died_error_context", None)
        died_with_node = context is not None and context.reason == ActorDiedErrorContext.NODE_DIED
        return ActorFate.DIED_WITH_NODE if died_with_node else ActorFate.DIED

    async def fate(self, wait: float) -> ActorFate:
        """Why the actor died, waiting up to ``wait`` seconds for Ray to decide. Ask before
        ``kill``: a kill is a verdict of its own (``RAY_KILL``) and hides the node's loss."""
        deadline = time.monotonic() + wait
        while True:
            fate = await asyncio.to_thread(self._fate_now)  # a GCS query must not stall the loop
            if fate is not ActorFate.UNDECIDED or time.monotonic() >= deadline:
                return fate
            await asyncio.sleep(FATE_POLL_INTERVAL)

    async def wait_placed(self, timeout: float) -> None:
        """Until Ray has placed and created the actor (``asyncio.TimeoutError`` otherwise)."""
        try:
            await asyncio.wait_for(self._actor.ping.remote(), timeout)
        except RayActorError as err:
            raise ActorGone(str(err)) from err

    async def describe(self, timeout: float) -> JobDescription:
        try:
            data = await asyncio.wait_for(self._actor.describe.remote(), timeout)
        except RayActorError as err:
            raise ActorGone(str(err)) from err
        return decode(data, JobDescription)

    async def prewarm(self, timeout: float) -> ActorStarted:
        """Run ``prewarm_fnc`` in the actor (a warm-pool actor waiting for a job); returns
        where it runs."""
        try:
            return decode(await asyncio.wait_for(self._actor.prewarm.remote(), timeout), ActorStarted)
        except RayActorError as err:
            raise ActorGone(str(err)) from err
        except RayTaskError as err:
            raise StartError(str(err.cause if err.cause is not None else err)) from err

    async def ping(self, timeout: float) -> None:
        """Answered on the job's event loop, so a loop blocked by user code does not answer."""
        try:
            await asyncio.wait_for(self._actor.ping.remote(), timeout)
        except RayActorError as err:
            raise ActorGone(str(err)) from err

    def run(self) -> None:
        """Fire-and-forget: start the entrypoint (the job is RUNNING from here)."""
        self._actor.run.remote()

    async def wait_done(self) -> JobOutcome:
        """The job's outcome once its shutdown sequence completes; ``ActorGone`` if it dies.

        Deliberately unbounded: it is the liveness channel. Deadlines are enforced by the
        supervisor's own timers, never by waiting on the actor.
        """
        try:
            data = await self._actor.wait_done.remote()
        except RayActorError as err:
            raise ActorGone(str(err)) from err
        return decode(data, JobOutcome)

    def request_shutdown(self, request: ShutdownRequest) -> None:
        """Fire-and-forget: a job whose loop is blocked never answers, so nobody waits on it."""
        self._actor.shutdown.remote(encode(request))

    def kill(self) -> None:
        """Kill the actor (and, through Ray's fate-sharing, every actor it created)."""
        try:
            ray.kill(self._actor, no_restart=True)
        except Exception as err:  # already gone
            logger.debug("kill of %s: %r", self.name, err)
