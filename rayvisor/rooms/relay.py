"""The room backend of a participant actor: the job's own connection, relayed.

A participant's child actor never opens a room connection of its own (it would appear
as an extra participant): its actions go to the job actor's ``relay`` method, and the
job actor pushes it the events that concern its participant.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from ray.exceptions import RayActorError

from ..errors import RoomUnavailable
from ..messages import decode_reply, encode
from .records import (
    EventBatch,
    EventDelivery,
    ParticipantInfo,
    RelayAction,
    RelayRequest,
    RoomEvent,
    RoomSnapshot,
)

MAX_PENDING_EVENTS = 10_000
"""Events a participant actor keeps before it has consumed them; the oldest are dropped."""


class RelayConnection:
    """``RoomConnection`` over the job actor's connection (see the module docstring)."""

    def __init__(self, job_actor: Any, snapshot: RoomSnapshot, *, call_timeout: float) -> None:
        self._job_actor = job_actor
        self._snapshot = snapshot
        self._call_timeout = call_timeout
        self._events: deque[RoomEvent] = deque(maxlen=MAX_PENDING_EVENTS)
        self._changed = asyncio.Event()
        self._closed = False
        self._next_index = 1
        self._held: dict[int, EventDelivery] = {}

    def push(self, delivery: EventDelivery) -> None:
        """Events from the job actor; applied in ``index`` order whatever order they arrive in."""
        if delivery.index < self._next_index:
            return  # a duplicate
        self._held[delivery.index] = delivery
        while self._next_index in self._held:
            self._events.extend(self._held.pop(self._next_index).events)
            self._next_index += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        self._closed = True
        self._changed.set()

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
        while self._events and self._events[0].seq <= after_seq:
            self._events.popleft()  # consumed
        if not any(e.seq > after_seq for e in self._events) and not self._closed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return EventBatch(events=[e for e in self._events if e.seq > after_seq], closed=self._closed)

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
