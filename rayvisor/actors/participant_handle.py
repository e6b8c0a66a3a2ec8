"""Every Ray API call the job actor makes on a participant actor goes through
``ParticipantActorHandle``.

As ``supervisor.job_handle.JobActorHandle`` does for job actors (and Ray Serve's
``ActorReplicaWrapper`` for replicas): one place for the Ray details, every call that
waits for an answer bounded by a named setting, so the participant manager's logic
stays free of Ray and a child whose event loop is blocked can hold nothing up.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..messages import ActorStarted, decode, encode
from ..rooms.records import EventDelivery
from .participant_actor import ParticipantActor
from .records import ParticipantOutcome, ParticipantStart, ParticipantStop

logger = logging.getLogger("rayvisor.participants")


class ParticipantActorGone(Exception):
    """The participant actor died (crash, kill, or its node was lost)."""


class ParticipantStartError(Exception):
    """The participant actor could not prepare its participant (its code raised)."""


class ParticipantUnresponsive(Exception):
    """The participant actor did not answer a liveness ping in time: its event loop is blocked."""


class ParticipantActorHandle:
    """One participant entrypoint's child actor, seen from its job actor."""

    def __init__(self, actor: Any, name: str) -> None:
        self._actor = actor
        self.name = name
        """For logs: the entrypoint and the participant it serves."""

    @classmethod
    def create(cls, *, fnc: Any, job_actor: Any, call_timeout: float, poll_timeout: float,
               name: str) -> "ParticipantActorHandle":
        """Ask Ray for a child actor running ``fnc``, preferably on this (the job's) node; the
        actor is owned by the job actor, so Ray's fate-sharing removes it with its job.
        Raises whatever shipping ``fnc`` raises (e.g. it cannot be pickled)."""
        actor = ParticipantActor.options(
            num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=True),
        ).remote(fnc, job_actor, call_timeout, poll_timeout)
        return cls(actor, name)

    async def start(self, start: ParticipantStart, timeout: float) -> ActorStarted:
        """Prepare the participant (the entrypoint runs with ``run``); raises
        ``ParticipantActorGone``, ``ParticipantStartError`` or ``asyncio.TimeoutError``."""
        try:
            data = await asyncio.wait_for(self._actor.start.remote(encode(start)), timeout)
        except RayActorError as err:
            raise ParticipantActorGone(str(err)) from err
        except RayTaskError as err:
            raise ParticipantStartError(str(err.cause if err.cause is not None else err)) from err
        return decode(data, ActorStarted)

    def run(self) -> None:
        """Fire-and-forget: start the entrypoint (it may block the child's loop from its first line)."""
        self._actor.run.remote()

    def deliver(self, delivery: EventDelivery) -> None:
        """Fire-and-forget: a child with a blocked loop just queues its events."""
        self._actor.deliver.remote(encode(delivery))

    def request_stop(self, stop: ParticipantStop) -> None:
        """Fire-and-forget: the caller holds the stop's deadline and kills the child at it."""
        self._actor.stop.remote(encode(stop))

    async def ping(self, timeout: float) -> None:
        """Answered on the child's event loop, so a loop blocked by user code does not answer:
        raises ``asyncio.TimeoutError`` after ``timeout``, ``ParticipantActorGone`` if it died."""
        try:
            await asyncio.wait_for(self._actor.ping.remote(), timeout)
        except RayActorError as err:
            raise ParticipantActorGone(str(err)) from err

    async def wait_done(self) -> ParticipantOutcome:
        """How the child ended, once its shutdown sequence completes; ``ParticipantActorGone``
        if it dies first.

        Deliberately unbounded: it is the channel on which a crash is noticed. Deadlines are
        the caller's (the stop budget, the liveness pings), never a wait on the actor.
        """
        try:
            data = await self._actor.wait_done.remote()
        except RayActorError as err:
            raise ParticipantActorGone(str(err)) from err
        return decode(data, ParticipantOutcome)

    def kill(self) -> None:
        """Kill the child at once, whatever its loop is doing."""
        try:
            ray.kill(self._actor, no_restart=True)
        except Exception as err:  # already gone
            logger.debug("kill of the participant actor %s: %r", self.name, err)
