"""A participant entrypoint's child actor: ``await fnc(ctx, participant)`` in its own process.

Created by the job actor (so Ray's fate-sharing removes it with its job), it never opens
a room connection of its own: ``rooms.relay.RelayConnection`` routes its actions through
the job actor and receives the events that concern its participant.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray

from ..agents.job import JobProcess, LiveKitAccess, make_job
from ..agents.options import forget_secret
from ..agents.participant import participant_context_class
from ..agents.room import RemoteParticipant, Room
from ..messages import Ack, ActorStarted, ParticipantActorState, ParticipantCause, decode, encode
from ..rooms.records import EventDelivery
from ..rooms.relay import RelayConnection
from .lifecycle import RunnerLifecycle, RunnerState, describe_exception
from .records import ParticipantOutcome, ParticipantStart, ParticipantStop
from . import main_thread_registries

logger = logging.getLogger("rayvisor.participant")

main_thread_registries.install_in_ray_workers()  # agents' livekit plugins load on actor threads


class ParticipantRunner:
    """One participant entrypoint: run it, stop it once, report how it ended (its steps of
    the lifecycle it shares with the job, ``lifecycle.RunnerLifecycle``)."""

    def __init__(self, fnc: Any, start: ParticipantStart, job_actor: Any, *, call_timeout: float,
                 poll_timeout: float) -> None:
        self._fnc = fnc
        self._start = start
        self._poll_timeout = poll_timeout
        self.connection = RelayConnection(job_actor, start.snapshot, call_timeout=call_timeout)
        self.room = Room(start.room)
        self.ctx = participant_context_class(start.livekit_agents_context)(
            job=make_job(job_id=start.job_id, room=start.room, metadata=start.metadata,
                         agent_name=start.agent_name, dispatch_id=start.dispatch_id),
            room=self.room, proc=JobProcess(), worker_id=start.worker_id,
            request_job_shutdown=self.connection.request_shutdown,
            livekit=LiveKitAccess(url=start.url, api_token=start.api_token) if start.url else None,
            agent_identity=start.snapshot.local.identity, namespace=start.namespace,
        )
        self._life: RunnerLifecycle[ParticipantCause, ParticipantOutcome] = RunnerLifecycle(
            self, name="participant", logger=logger, step_timeout=call_timeout,
            task_context=self.ctx._task_context)

    @property
    def state(self) -> RunnerState:
        return self._life.state

    async def prepare(self) -> RemoteParticipant:
        """Build the room view; its events start flowing only once the entrypoint runs."""
        await self.room._connect(self.connection, self._start.snapshot.local, self._poll_timeout, start_events=False)
        return self.room.remote_participants[self._start.snapshot.participants[0].identity]

    def start(self, participant: RemoteParticipant) -> None:
        if not self._life.start(lambda: self._fnc(self.ctx, participant)):
            return
        # Scheduled after the entrypoint's first step, so handlers it registers up front see
        # every event delivered since the child was created.
        self.room._start_events(self._poll_timeout)

    def stop(self, cause: ParticipantCause, reason: str, error: str | None = None) -> None:
        """Begin stopping (once): cancel the entrypoint, then run the shutdown callbacks."""
        self._life.begin_shutdown(cause, reason, error)

    async def wait_done(self) -> ParticipantOutcome:
        return await self._life.wait_done()

    # -- the participant's steps of the shared shutdown sequence (``ShutdownSteps``) ------

    def entrypoint_failed(self, err: Exception) -> None:
        logger.error("participant entrypoint raised", exc_info=err)
        self.stop(ParticipantCause.ENTRYPOINT_ERROR, "participant entrypoint raised", describe_exception(err))

    async def stop_children(self) -> None:
        """A participant actor has no children."""

    def shutdown_callbacks(self) -> list[Any]:
        return self.ctx.shutdown_callbacks

    async def leave_room(self) -> None:
        await self.room._disconnect()

    async def release(self) -> None:
        await self.ctx._release()

    def outcome(self) -> ParticipantOutcome:
        assert self._life.cause is not None
        return ParticipantOutcome(
            state=ParticipantActorState.FAILED if self._life.errors else ParticipantActorState.STOPPED,
            cause=self._life.cause, error=self._life.error,
        )


@ray.remote(num_cpus=0, max_restarts=0)
class ParticipantActor:
    """The Ray actor around ``ParticipantRunner``. Calls take and return msgpack records."""

    def __init__(self, fnc: Any, job_actor: Any, call_timeout: float, poll_timeout: float) -> None:
        forget_secret()
        self._fnc = fnc
        self._job_actor = job_actor
        self._call_timeout = call_timeout
        self._poll_timeout = poll_timeout
        self._runner: ParticipantRunner | None = None
        self._participant: RemoteParticipant | None = None
        self._ready = asyncio.Event()
        self._early_stop: ParticipantStop | None = None

    async def start(self, data: bytes) -> bytes:
        """Prepare (the entrypoint starts with ``run``, so a blocking one cannot hold this reply)."""
        start = decode(data, ParticipantStart)
        self._runner = ParticipantRunner(self._fnc, start, self._job_actor, call_timeout=self._call_timeout,
                                         poll_timeout=self._poll_timeout)
        self._participant = await self._runner.prepare()
        self._ready.set()
        if self._early_stop is not None:
            self._runner.stop(self._early_stop.cause, self._early_stop.reason)
        return encode(ActorStarted(pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id()))

    async def run(self) -> bytes:
        if self._runner is not None and self._participant is not None:
            self._runner.start(self._participant)
        return encode(Ack())

    async def deliver(self, data: bytes) -> bytes:
        """Events concerning this participant, in the order the job saw them."""
        if self._runner is not None:
            self._runner.connection.push(decode(data, EventDelivery))
        return encode(Ack())

    async def stop(self, data: bytes) -> bytes:
        request = decode(data, ParticipantStop)
        if self._runner is None:
            self._early_stop = request
        else:
            self._runner.stop(request.cause, request.reason)
        return encode(Ack())

    async def ping(self) -> bytes:
        """Answered on the actor's event loop: a loop blocked by the entrypoint does not answer
        (the job's liveness check, ``participant_ping_timeout``)."""
        return encode(Ack())

    async def wait_done(self) -> bytes:
        await self._ready.wait()
        assert self._runner is not None
        return encode(await self._runner.wait_done())
