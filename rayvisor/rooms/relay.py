"""The room backend of a participant actor: the job's own connection, relayed.

A participant's child actor never opens a room connection of its own (it would appear
as an extra participant): its actions go to the job actor's ``relay`` method, and the
job actor pushes it the events that concern its participant.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray.exceptions import RayActorError

from ..errors import RoomUnavailable
from ..messages import decode_reply, encode
from .base import RoomConnection
from .inbox import EventInbox
from .records import EventBatch, EventDelivery, ParticipantInfo, RelayAction, RelayRequest, RoomSnapshot

MAX_PENDING_EVENTS = 10_000
"""Events a participant actor keeps before it has consumed them; the oldest are dropped."""


class RelayConnection(RoomConnection):
    """``RoomConnection`` over the job actor's connection (see the module docstring). It has
    none of the optional capabilities: no media, and rtc's native events stay in the job."""

    def __init__(self, job_actor: Any, snapshot: RoomSnapshot, *, call_timeout: float) -> None:
        self._job_actor = job_actor
        self._snapshot = snapshot
        self._call_timeout = call_timeout
        # Events keep the job's numbering (``put``): they are a subset of the job's own.
        self._inbox = EventInbox(max_events=MAX_PENDING_EVENTS, room=snapshot.room, identity=snapshot.local.identity)
        self._next_index = 1
        self._held: dict[int, EventDelivery] = {}

    def push(self, delivery: EventDelivery) -> None:
        """Events from the job actor; applied in ``index`` order whatever order they arrive in."""
        if delivery.index < self._next_index:
            return  # a duplicate
        self._held[delivery.index] = delivery
        while self._next_index in self._held:
            for event in self._held.pop(self._next_index).events:
                self._inbox.put(event)
            self._next_index += 1

    def close(self) -> None:
        """End the event stream: the facade reads what is left, then sees ``closed``."""
        self._inbox.close()

    async def _relay(self, request: RelayRequest) -> None:
        try:
            data = await asyncio.wait_for(self._job_actor.relay.remote(encode(request)), self._call_timeout)
        except asyncio.TimeoutError:
            raise RoomUnavailable(f"the job did not relay {request.action.value} within {self._call_timeout}s") from None
        except RayActorError as err:
            raise RoomUnavailable(f"the job actor is gone: {err}") from None
        decode_reply(data)

    def request_shutdown(self, reason: str) -> None:
        """Fire-and-forget: ask the job to shut down (``ctx.shutdown`` in a participant actor)."""
        self._job_actor.relay.remote(encode(RelayRequest(action=RelayAction.SHUTDOWN, reason=reason)))

    # -- RoomConnection ---------------------------------------------------------------

    async def connect(self, room: str, local: ParticipantInfo, auto_subscribe: str = "subscribe_all") -> RoomSnapshot:
        return self._snapshot

    async def next_events(self, after_seq: int, timeout: float) -> EventBatch:
        return await self._inbox.next_events(after_seq, timeout)

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        await self._relay(RelayRequest.build(action=RelayAction.SET_ATTRIBUTES, attributes=attributes))

    async def set_metadata(self, metadata: str) -> None:
        await self._relay(RelayRequest.build(action=RelayAction.SET_METADATA, metadata=metadata))

    async def send(self, *, topic: str, text: str | None, data: bytes | None,
                   destination_identities: list[str], stream_name: str | None = None,
                   stream_attributes: dict[str, str] | None = None) -> None:
        await self._relay(RelayRequest.build(
            action=RelayAction.SEND, topic=topic, text=text, data=data,
            destination_identities=destination_identities, stream_name=stream_name,
            stream_attributes=dict(stream_attributes or {})))

    async def disconnect(self) -> None:
        self.close()

    async def delete_room(self) -> None:
        await self._relay(RelayRequest(action=RelayAction.DELETE_ROOM))
