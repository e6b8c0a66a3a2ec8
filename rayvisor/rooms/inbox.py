"""One connection's room events: numbered, bounded, read by long-poll.

Every room backend hands its events to the job's room facade through an ``EventInbox``:
the local room server keeps one per participant, a LiveKit connection one for rtc's
events, a participant actor's relay one for the events its job forwards. So the
long-poll (``RoomConnection.next_events``) has exactly one implementation.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from .records import EventBatch, RoomEvent, RoomEventType

logger = logging.getLogger("rayvisor.room.inbox")


class EventInbox:
    """Events in ``seq`` order that the reader has not acknowledged yet.

    The reader long-polls ``next_events(after_seq, timeout)``; passing ``after_seq``
    acknowledges every event up to it, so those are let go. A bounded inbox
    (``max_events``) drops its oldest events past the bound and counts them in ``dropped``:
    a stalled reader costs bounded memory, and one that is far behind loses history rather
    than the writer blocking. The reader's next poll logs what it missed (an inbox nobody
    reads, such as a simulated participant's, drops quietly). Once closed it takes no more
    events; the reader still gets what is left, with ``closed`` set.
    """

    def __init__(self, *, max_events: int | None, room: str = "", identity: str = "") -> None:
        """``max_events=None`` keeps every unread event (for an owner that cannot lose one).
        ``room`` and ``identity`` (whose events these are) go into its log records."""
        if max_events is not None and max_events < 1:
            raise ValueError(f"max_events must be at least 1 or None, not {max_events}")
        self._max_events = max_events
        self._log_fields = {"room": room, "identity": identity}
        self._events: deque[RoomEvent] = deque()
        self._last_seq = 0
        self._dropped = 0
        self._dropped_reported = 0
        self._delivered_seq = 0
        """Newest event a batch has held: dropping one up to it loses the reader nothing."""
        self._closed = False
        self._changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        """``seq`` of the newest event taken (0 before the first)."""
        return self._last_seq

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dropped(self) -> int:
        """Events dropped before any batch held them, because the inbox was full."""
        return self._dropped

    def __len__(self) -> int:
        """Events held (unacknowledged)."""
        return len(self._events)

    def add(self, type_: RoomEventType, **fields: Any) -> RoomEvent | None:
        """Number the next event (``last_seq + 1``) and take it; None once closed."""
        if self._closed:
            return None
        event = RoomEvent(seq=self._last_seq + 1, type=type_, **fields)
        self._take(event)
        return event

    def put(self, event: RoomEvent) -> bool:
        """Take an event numbered elsewhere (the relay keeps its job's numbering). One not
        after ``last_seq`` (a duplicate), or any once closed, is ignored: False."""
        if self._closed or event.seq <= self._last_seq:
            return False
        self._take(event)
        return True

    def close(self) -> None:
        """Take no more events; wakes the reader (idempotent)."""
        if not self._closed:
            self._closed = True
            self._wake()

    async def changed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the next event or the close; True if one came.
        For waits on what the owner derives from events (the local server's messages)."""
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def next_events(self, after_seq: int, timeout: float) -> EventBatch:
        """Every held event after ``after_seq`` (acknowledging those up to it); if there is
        none and the inbox is open, waits up to ``timeout`` seconds for the first one."""
        while self._events and self._events[0].seq <= after_seq:
            self._events.popleft()
        if not self._events and not self._closed:
            await self.changed(timeout)
        if self._dropped > self._dropped_reported:
            logger.warning(
                "room %r: the event reader of %r missed %d events (the inbox holds max_events=%s)",
                self._log_fields["room"], self._log_fields["identity"], self._dropped - self._dropped_reported,
                self._max_events, extra=self._log_fields,
            )
            self._dropped_reported = self._dropped
        events = [e for e in self._events if e.seq > after_seq]
        if events:
            self._delivered_seq = max(self._delivered_seq, events[-1].seq)
        return EventBatch(events=events, closed=self._closed)

    def _take(self, event: RoomEvent) -> None:
        self._events.append(event)
        self._last_seq = event.seq
        if self._max_events is not None and len(self._events) > self._max_events:
            if self._events.popleft().seq > self._delivered_seq:
                self._dropped += 1
        self._wake()

    def _wake(self) -> None:
        # A fresh Event per change: every waiter of the old one wakes, later waiters wait anew.
        self._changed.set()
        self._changed = asyncio.Event()
