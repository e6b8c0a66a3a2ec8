"""The lifecycle a job's runner and a participant's runner share, against fake steps (no Ray):
its transitions, and its shutdown sequence run once, in order, bounded where it must be."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from rayvisor.actors.lifecycle import (
    ALLOWED_TRANSITIONS,
    IllegalRunnerTransition,
    RunnerLifecycle,
    RunnerState,
    describe_exception,
)
from rayvisor.messages import Cause

logger = logging.getLogger("tests.runner_lifecycle")

STEP_TIMEOUT = 0.2
"""The lifecycle's bound on leaving the room and releasing the context, in these tests."""
DONE_DEADLINE = 10.0
"""How long a test waits for the shutdown sequence to finish before it fails."""


class FakeSteps:
    """A runner's steps that record what ran, in order, in ``calls``."""

    def __init__(self, *, callbacks: list[Callable[..., Any]] | None = None, leave_hangs: bool = False) -> None:
        self.calls: list[str] = []
        self.callbacks = callbacks or []
        self.leave_hangs = leave_hangs
        self.life: RunnerLifecycle[Cause, tuple[Any, ...]] = RunnerLifecycle(
            self, name="test-runner", logger=logger, step_timeout=STEP_TIMEOUT)

    def entrypoint_failed(self, err: Exception) -> None:
        self.calls.append(f"entrypoint failed: {err}")
        self.life.begin_shutdown(Cause.ENTRYPOINT_ERROR, "raised", describe_exception(err))

    async def stop_children(self) -> None:
        self.calls.append("stop children")

    def shutdown_callbacks(self) -> list[Callable[..., Any]]:
        return self.callbacks

    async def leave_room(self) -> None:
        self.calls.append("leave room")
        if self.leave_hangs:
            await asyncio.Event().wait()

    async def release(self) -> None:
        self.calls.append("release")

    def outcome(self) -> tuple[Any, ...]:
        return self.life.cause, self.life.reason, self.life.error


async def done(steps: FakeSteps) -> tuple[Any, ...]:
    return await asyncio.wait_for(steps.life.wait_done(), DONE_DEADLINE)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def test_every_state_leads_to_done_and_done_is_final():
    assert set(ALLOWED_TRANSITIONS) == set(RunnerState)
    assert ALLOWED_TRANSITIONS[RunnerState.DONE] == frozenset()
    for state in RunnerState:
        reachable, frontier = {state}, [state]
        while frontier:
            for nxt in ALLOWED_TRANSITIONS[frontier.pop()] - reachable:
                reachable.add(nxt)
                frontier.append(nxt)
        assert RunnerState.DONE in reachable, state


@pytest.mark.parametrize("path,illegal", [
    ([], RunnerState.DONE),  # done without a shutdown
    ([RunnerState.RUNNING], RunnerState.CREATED),
    ([RunnerState.RUNNING, RunnerState.SHUTTING_DOWN], RunnerState.RUNNING),  # no way back
    ([RunnerState.SHUTTING_DOWN, RunnerState.DONE], RunnerState.SHUTTING_DOWN),
])
def test_an_illegal_transition_is_refused_and_leaves_the_state_as_it_was(path, illegal):
    life = FakeSteps().life
    for state in path:
        life._transition(state)

    with pytest.raises(IllegalRunnerTransition, match=f"test-runner: .* -> {illegal.value}"):
        life._transition(illegal)
    assert life.state == (path[-1] if path else RunnerState.CREATED)


def test_the_shutdown_sequence_runs_once_in_order_and_keeps_the_first_cause():
    async def scenario() -> None:
        steps = FakeSteps(callbacks=[lambda reason: steps.calls.append(f"callback ({reason})")])

        async def entrypoint() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                steps.calls.append("entrypoint cancelled")

        assert steps.life.start(entrypoint) and steps.life.state == RunnerState.RUNNING
        await asyncio.sleep(0)  # the entrypoint reaches its wait
        assert not steps.life.start(entrypoint)  # once

        assert steps.life.begin_shutdown(Cause.USER_SHUTDOWN, "closing")
        assert not steps.life.begin_shutdown(Cause.ROOM_EMPTY, "everyone left")
        assert steps.life.state == RunnerState.SHUTTING_DOWN

        assert await done(steps) == (Cause.USER_SHUTDOWN, "closing", None)
        assert steps.calls == ["entrypoint cancelled", "stop children", "callback (closing)", "leave room", "release"]
        assert steps.life.state == RunnerState.DONE
        assert not steps.life.begin_shutdown(Cause.ROOM_EMPTY, "later")

    run(scenario)


def test_a_runner_shut_down_before_it_started_never_runs_its_entrypoint():
    async def scenario() -> None:
        steps = FakeSteps()

        async def entrypoint() -> None:
            steps.calls.append("entrypoint ran")

        steps.life.begin_shutdown(Cause.USER_SHUTDOWN, "early")

        assert not steps.life.start(entrypoint)
        assert await done(steps) == (Cause.USER_SHUTDOWN, "early", None)
        assert "entrypoint ran" not in steps.calls

    run(scenario)


def test_an_entrypoint_that_raises_ends_the_runner_with_its_error():
    async def scenario() -> None:
        steps = FakeSteps()

        async def entrypoint() -> None:
            raise ValueError("bad input")

        steps.life.start(entrypoint)

        cause, reason, error = await done(steps)
        assert (cause, reason) == (Cause.ENTRYPOINT_ERROR, "raised")
        assert "ValueError: bad input" in error
        assert steps.calls[0] == "entrypoint failed: bad input"

    run(scenario)


def test_an_error_reported_after_the_shutdown_began_still_fails_the_runner():
    async def scenario() -> None:
        steps = FakeSteps()

        async def entrypoint() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise RuntimeError("cleanup failed") from None

        steps.life.start(entrypoint)
        await asyncio.sleep(0)
        steps.life.begin_shutdown(Cause.USER_SHUTDOWN, "closing")

        cause, reason, error = await done(steps)
        assert (cause, reason) == (Cause.USER_SHUTDOWN, "closing")  # the first cause stays
        assert "RuntimeError: cleanup failed" in error

    run(scenario)


def test_a_failing_callback_is_recorded_and_the_next_one_still_runs():
    async def scenario() -> None:
        def broken() -> None:
            raise RuntimeError("callback broke")

        async def after(reason: str) -> None:
            steps.calls.append(f"after ({reason})")

        steps = FakeSteps(callbacks=[broken, after])
        steps.life.begin_shutdown(Cause.USER_SHUTDOWN, "closing")

        _cause, _reason, error = await done(steps)
        assert "shutdown callback 'broken' raised" in error and "callback broke" in error
        assert "after (closing)" in steps.calls

    run(scenario)


def test_leaving_the_room_is_bounded_and_the_sequence_still_completes():
    async def scenario() -> None:
        steps = FakeSteps(leave_hangs=True)
        steps.life.begin_shutdown(Cause.ROOM_DELETED, "room deleted")

        assert await done(steps) == (Cause.ROOM_DELETED, "room deleted", None)  # housekeeping is not the user's error
        assert steps.calls[-2:] == ["leave room", "release"]

    run(scenario)
