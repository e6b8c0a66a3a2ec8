"""The one event inbox behind every room backend's long-poll (``RoomConnection.next_events``),
driven in plain asyncio: order, acknowledgement, waking, timeouts, the bound and the close."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from rayvisor.rooms.inbox import EventInbox
from rayvisor.rooms.records import EventBatch, ParticipantInfo, RoomEvent, RoomEventType

LONG_POLL = 30.0
"""A poll timeout no test reaches: a poll that returns did so because something happened."""
WAKE_DEADLINE = 5.0
"""How long a parked poll may take to return once an event or the close arrives."""
SHORT_POLL = 0.05
"""A poll timeout a test lets run out."""
TEST_DEADLINE = 10.0
"""Bound on each test's whole asyncio run."""

CONNECTED = RoomEventType.PARTICIPANT_CONNECTED
ALICE = ParticipantInfo(identity="alice")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TEST_DEADLINE)

    return asyncio.run(bounded())


def seqs(batch: EventBatch) -> list[int]:
    return [e.seq for e in batch.events]


async def parked_poll(inbox: EventInbox, after_seq: int) -> asyncio.Task[EventBatch]:
    """A ``next_events`` call waiting for its first event."""
    poll = asyncio.create_task(inbox.next_events(after_seq, LONG_POLL))
    await asyncio.sleep(0)  # one loop turn (not a settle): the task runs to its first await
    assert not poll.done(), "the poll returned without waiting"
    return poll


def test_events_come_out_in_the_order_they_were_added_numbered_from_one() -> None:
    async def main() -> EventBatch:
        inbox = EventInbox(max_events=10)
        inbox.add(CONNECTED, participant=ALICE)
        inbox.add(RoomEventType.DATA_RECEIVED, participant=ALICE, data=b"hi")
        inbox.add(RoomEventType.PARTICIPANT_DISCONNECTED, participant=ALICE)
        return await inbox.next_events(0, LONG_POLL)

    batch = run(main())
    assert seqs(batch) == [1, 2, 3]
    assert [e.type for e in batch.events] == [
        CONNECTED, RoomEventType.DATA_RECEIVED, RoomEventType.PARTICIPANT_DISCONNECTED]
    assert batch.closed is False


def test_a_poll_acknowledges_the_events_up_to_after_seq_and_a_repeated_poll_gets_the_rest_again() -> None:
    """A reply lost on the way (the local server is a Ray call away) is asked for again."""

    async def main() -> tuple[EventBatch, EventBatch, EventBatch, int]:
        inbox = EventInbox(max_events=10)
        for _ in range(4):
            inbox.add(CONNECTED, participant=ALICE)
        first = await inbox.next_events(2, LONG_POLL)
        again = await inbox.next_events(2, LONG_POLL)
        behind = await inbox.next_events(0, LONG_POLL)  # acknowledged events are gone for good
        return first, again, behind, len(inbox)

    first, again, behind, held = run(main())
    assert seqs(first) == seqs(again) == seqs(behind) == [3, 4]
    assert held == 2


def test_a_parked_poll_wakes_when_an_event_is_added() -> None:
    async def main() -> tuple[EventBatch, float]:
        inbox = EventInbox(max_events=10)
        poll = await parked_poll(inbox, 0)
        started = time.monotonic()
        inbox.add(CONNECTED, participant=ALICE)
        batch = await asyncio.wait_for(poll, WAKE_DEADLINE)
        return batch, time.monotonic() - started

    batch, waited = run(main())
    assert seqs(batch) == [1]
    assert waited < WAKE_DEADLINE


def test_every_parked_reader_wakes_and_a_later_one_waits_for_the_next_event() -> None:
    async def main() -> tuple[list[list[int]], list[int]]:
        inbox = EventInbox(max_events=10)
        polls = [await parked_poll(inbox, 0), await parked_poll(inbox, 0)]
        inbox.add(CONNECTED, participant=ALICE)
        woken = [seqs(b) for b in await asyncio.wait_for(asyncio.gather(*polls), WAKE_DEADLINE)]
        later = await parked_poll(inbox, 1)
        inbox.add(CONNECTED, participant=ALICE)
        return woken, seqs(await asyncio.wait_for(later, WAKE_DEADLINE))

    woken, later = run(main())
    assert woken == [[1], [1]]
    assert later == [2]


def test_a_poll_with_nothing_new_returns_an_empty_batch_when_its_timeout_runs_out() -> None:
    async def main() -> tuple[EventBatch, float]:
        inbox = EventInbox(max_events=10)
        inbox.add(CONNECTED, participant=ALICE)
        started = time.monotonic()
        batch = await inbox.next_events(1, SHORT_POLL)
        return batch, time.monotonic() - started

    batch, waited = run(main())
    assert batch.events == [] and batch.closed is False
    assert SHORT_POLL * 0.9 <= waited < WAKE_DEADLINE


def test_a_poll_with_timeout_zero_does_not_wait() -> None:
    async def main() -> EventBatch:
        return await EventInbox(max_events=10).next_events(0, 0)

    batch = run(main())
    assert batch.events == [] and batch.closed is False


def test_a_full_inbox_drops_its_oldest_unread_events_and_the_reader_is_told_once(caplog: Any) -> None:
    async def main() -> tuple[EventBatch, EventBatch, int]:
        inbox = EventInbox(max_events=3, room="support", identity="agent")
        for _ in range(5):
            inbox.add(CONNECTED, participant=ALICE)
        first = await inbox.next_events(0, LONG_POLL)
        inbox.add(CONNECTED, participant=ALICE)
        second = await inbox.next_events(5, LONG_POLL)
        return first, second, inbox.dropped

    with caplog.at_level(logging.WARNING, logger="rayvisor.room.inbox"):
        first, second, dropped = run(main())
    assert seqs(first) == [3, 4, 5]
    assert seqs(second) == [6]
    assert dropped == 2
    warnings = [r for r in caplog.records if r.name == "rayvisor.room.inbox"]
    assert len(warnings) == 1 and "missed 2 events" in warnings[0].getMessage()
    assert (warnings[0].room, warnings[0].identity) == ("support", "agent")


def test_dropping_events_a_batch_already_held_loses_the_reader_nothing() -> None:
    async def main() -> tuple[EventBatch, int]:
        inbox = EventInbox(max_events=3)
        for _ in range(3):
            inbox.add(CONNECTED, participant=ALICE)
        await inbox.next_events(0, LONG_POLL)  # handed out 1..3, not yet acknowledged
        for _ in range(3):
            inbox.add(CONNECTED, participant=ALICE)
        return await inbox.next_events(3, LONG_POLL), inbox.dropped

    batch, dropped = run(main())
    assert seqs(batch) == [4, 5, 6]
    assert dropped == 0


def test_an_unbounded_inbox_keeps_every_unread_event() -> None:
    async def main() -> tuple[EventBatch, int]:
        inbox = EventInbox(max_events=None)
        for _ in range(12_000):
            inbox.add(CONNECTED, participant=ALICE)
        return await inbox.next_events(0, LONG_POLL), inbox.dropped

    batch, dropped = run(main())
    assert len(batch.events) == 12_000 and dropped == 0


def test_closing_wakes_a_parked_poll_and_the_inbox_takes_nothing_after() -> None:
    async def main() -> tuple[EventBatch, Any, bool, EventBatch]:
        inbox = EventInbox(max_events=10)
        poll = await parked_poll(inbox, 0)
        inbox.close()
        woken = await asyncio.wait_for(poll, WAKE_DEADLINE)
        added = inbox.add(CONNECTED, participant=ALICE)
        put = inbox.put(RoomEvent(seq=7, type=CONNECTED))
        return woken, added, put, await inbox.next_events(0, LONG_POLL)

    woken, added, put, after = run(main())
    assert woken.events == [] and woken.closed is True
    assert added is None and put is False
    assert after.events == [] and after.closed is True


def test_the_last_events_come_with_closed_and_a_closed_inbox_answers_without_waiting() -> None:
    async def main() -> tuple[EventBatch, EventBatch, float]:
        inbox = EventInbox(max_events=10)
        inbox.add(CONNECTED, participant=ALICE)
        inbox.add(RoomEventType.DISCONNECTED, reason=4)
        inbox.close()
        last = await inbox.next_events(0, LONG_POLL)
        started = time.monotonic()
        empty = await inbox.next_events(2, LONG_POLL)
        return last, empty, time.monotonic() - started

    last, empty, waited = run(main())
    assert seqs(last) == [1, 2] and last.closed is True
    assert empty.events == [] and empty.closed is True
    assert waited < WAKE_DEADLINE


def test_put_keeps_numbering_from_elsewhere_and_ignores_an_event_not_after_the_last() -> None:
    """The relay keeps its job's numbering, which skips the events of other participants."""

    async def main() -> tuple[list[bool], EventBatch, int]:
        inbox = EventInbox(max_events=10)
        taken = [inbox.put(RoomEvent(seq=s, type=CONNECTED)) for s in (5, 9, 7, 9)]
        return taken, await inbox.next_events(0, LONG_POLL), inbox.last_seq

    taken, batch, last_seq = run(main())
    assert taken == [True, True, False, False]
    assert seqs(batch) == [5, 9] and last_seq == 9


def test_changed_reports_the_next_event_or_times_out() -> None:
    async def main() -> tuple[bool, bool]:
        inbox = EventInbox(max_events=10)
        timed_out = await inbox.changed(SHORT_POLL)
        waiter = asyncio.create_task(inbox.changed(LONG_POLL))
        await asyncio.sleep(0)  # one loop turn (not a settle): the waiter parks
        inbox.add(CONNECTED, participant=ALICE)
        return timed_out, await asyncio.wait_for(waiter, WAKE_DEADLINE)

    assert run(main()) == (False, True)


def test_an_inbox_must_hold_at_least_one_event() -> None:
    with pytest.raises(ValueError, match="max_events"):
        EventInbox(max_events=0)
