"""The lifecycle that a job's runner and a participant entrypoint's runner share.

``RunnerLifecycle`` is one explicit state machine (``RunnerState``, ``ALLOWED_TRANSITIONS``,
one transition function that raises on an illegal move) and the single shutdown sequence:
cancel the entrypoint and wait for it, stop the children, run the shutdown callbacks with
the reason, leave the room, release the context, build the outcome. What differs between
a job and a participant (which children, which room, which outcome record) is supplied by
the runner through ``ShutdownSteps``, so the lifecycle is testable without Ray.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import inspect
import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from ..aio import supervised_task

MAX_ERROR_CHARS = 8_000
"""Error text kept on a record (the full traceback goes to the log)."""


def describe_exception(err: BaseException) -> str:
    """The exception's traceback, trimmed to ``MAX_ERROR_CHARS`` (the end is kept)."""
    return "".join(traceback.format_exception(err))[-MAX_ERROR_CHARS:]


def join_errors(errors: Sequence[str]) -> str | None:
    return "\n".join(errors)[-MAX_ERROR_CHARS:] if errors else None


def callback_takes_reason(callback: Callable[..., Any]) -> bool:
    """True when a shutdown callback accepts the reason argument."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


async def cancel_and_wait(task: asyncio.Task[Any] | None, logger: logging.Logger) -> BaseException | None:
    """Cancel ``task`` and wait until it has really ended; returns the error it ended with.

    Deliberately unbounded: code that swallows cancellation keeps us here until the
    supervisor kills the process at its deadline, so it is never reported as done.
    """
    if task is None:
        return None
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is None:
            logger.warning("the entrypoint returned normally after being cancelled; "
                           "re-raise CancelledError after cleanup so callers see the cancellation")
    if task.cancelled():
        return None
    return task.exception()


async def run_shutdown_callbacks(callbacks: Sequence[Callable[..., Any]], reason: str,
                                 logger: logging.Logger) -> list[str]:
    """Run each callback once, in order, with the reason if it takes one; returns the errors."""
    errors = []
    for callback in callbacks:
        try:
            result = callback(reason) if callback_takes_reason(callback) else callback()
            if inspect.isawaitable(result):
                await result
        except Exception as err:
            logger.exception("shutdown callback %r raised", callback)
            name = getattr(callback, "__name__", repr(callback))
            errors.append(f"shutdown callback {name!r} raised:\n" + describe_exception(err))
    return errors


# -- the state machine ------------------------------------------------------------------


class RunnerState(str, enum.Enum):
    """Where a runner (a job's or a participant entrypoint's) stands."""

    CREATED = "created"
    RUNNING = "running"
    """The entrypoint was started (returning from it does not end the runner)."""
    SHUTTING_DOWN = "shutting_down"
    """The shutdown sequence runs, once."""
    DONE = "done"
    """The sequence finished and the outcome is ready."""


ALLOWED_TRANSITIONS: dict[RunnerState, frozenset[RunnerState]] = {
    # CREATED -> SHUTTING_DOWN: asked to stop before the entrypoint started; it never runs.
    RunnerState.CREATED: frozenset({RunnerState.RUNNING, RunnerState.SHUTTING_DOWN}),
    RunnerState.RUNNING: frozenset({RunnerState.SHUTTING_DOWN}),
    RunnerState.SHUTTING_DOWN: frozenset({RunnerState.DONE}),
    RunnerState.DONE: frozenset(),
}


class IllegalRunnerTransition(RuntimeError):
    """A bug: a runner tried a transition its state machine forbids."""


CauseT = TypeVar("CauseT", bound=enum.Enum)
OutcomeT = TypeVar("OutcomeT")
OutcomeT_co = TypeVar("OutcomeT_co", covariant=True)


class ShutdownSteps(Protocol[OutcomeT_co]):
    """What one kind of runner does at each step of the shared sequence."""

    def entrypoint_failed(self, err: Exception) -> None:
        """The entrypoint raised: log it and ask for the shutdown with the runner's own cause."""

    async def stop_children(self) -> None:
        """Wait until the runner's children have stopped (each bounded by its own budget)."""

    def shutdown_callbacks(self) -> Sequence[Callable[..., Any]]:
        """The user's shutdown callbacks, in registration order."""

    async def leave_room(self) -> None:
        """Leave the room (bounded by the lifecycle's ``step_timeout``)."""

    async def release(self) -> None:
        """Free what the context holds: ``ctx.api``, the HTTP session (bounded likewise)."""

    def outcome(self) -> OutcomeT_co:
        """The record reporting how the runner ended (read the lifecycle's cause and errors)."""


class RunnerLifecycle(Generic[CauseT, OutcomeT]):
    """One runner's state, cause and errors, and its shutdown sequence, run once.

    The sequence itself waits on user code without a deadline (a cancelled entrypoint, a
    shutdown callback): the bound is enforced from outside the process, by the supervisor
    for a job and by the job for a participant actor, which kill it when the budget is
    spent. Only the steps that talk to the room backend are bounded here (``step_timeout``).
    """

    def __init__(self, steps: ShutdownSteps[OutcomeT], *, name: str, logger: logging.Logger,
                 step_timeout: float,
                 task_context: Callable[[], contextvars.Context | None] = lambda: None) -> None:
        self._steps = steps
        self._name = name
        self._logger = logger
        self._step_timeout = step_timeout
        self._task_context = task_context
        self.state = RunnerState.CREATED
        self.cause: CauseT | None = None
        self.reason = ""
        self.errors: list[str] = []
        self._entry_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._done = asyncio.Event()
        self._outcome: OutcomeT | None = None

    def _transition(self, state: RunnerState) -> None:
        """The only place the state changes."""
        if state not in ALLOWED_TRANSITIONS[self.state]:
            raise IllegalRunnerTransition(f"{self._name}: {self.state.value} -> {state.value}")
        self.state = state

    @property
    def shutting_down(self) -> bool:
        """Whether the shutdown has begun (or finished)."""
        return self.state in (RunnerState.SHUTTING_DOWN, RunnerState.DONE)

    @property
    def error(self) -> str | None:
        """Every recorded error, joined and trimmed; None when there was none."""
        return join_errors(self.errors)

    @property
    def first_error(self) -> str | None:
        return self.errors[0] if self.errors else None

    def start(self, entrypoint: Callable[[], Awaitable[None]]) -> bool:
        """CREATED -> RUNNING: run ``entrypoint()`` in its own task. In any other state
        (already started, or asked to stop first) nothing runs and it returns False."""
        if self.state != RunnerState.CREATED:
            return False
        self._transition(RunnerState.RUNNING)
        self._entry_task = asyncio.get_running_loop().create_task(
            self._run_entrypoint(entrypoint), name=f"{self._name}-entrypoint", context=self._task_context())
        return True

    async def _run_entrypoint(self, entrypoint: Callable[[], Awaitable[None]]) -> None:
        try:
            await entrypoint()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._steps.entrypoint_failed(err)

    def begin_shutdown(self, cause: CauseT, reason: str = "", error: str | None = None) -> bool:
        """-> SHUTTING_DOWN with ``cause`` and start the sequence in its own task, once.

        ``error`` is recorded even when the shutdown had already begun (an entrypoint that
        raises while it is being cancelled still fails the runner). Returns whether this
        call began the shutdown; the caller's own synchronous reactions to it run before
        the sequence's first step (a task starts on the loop's next turn).
        """
        if error is not None:
            self.errors.append(error)
        if self.shutting_down:
            return False
        self._transition(RunnerState.SHUTTING_DOWN)
        self.cause, self.reason = cause, reason
        self._logger.info("%s shutting down", self._name, extra={"cause": cause.value, "reason": reason})
        supervised_task(self._shutdown(), name=f"{self._name}-shutdown", logger=self._logger, tasks=self._tasks,
                        context=self._task_context())
        return True

    async def _shutdown(self) -> None:
        error = await cancel_and_wait(self._entry_task, self._logger)
        if error is not None:  # not an Exception (those went to ``entrypoint_failed``): e.g. SystemExit
            self.errors.append(describe_exception(error))
        await self._steps.stop_children()
        self.errors += await run_shutdown_callbacks(self._steps.shutdown_callbacks(), self.reason, self._logger)
        await self._bounded(self._steps.leave_room(), "leaving the room")
        await self._bounded(self._steps.release(), "releasing the context (ctx.api, HTTP session)")
        self._outcome = self._steps.outcome()
        self._transition(RunnerState.DONE)
        self._done.set()

    async def _bounded(self, step: Awaitable[None], what: str) -> None:
        """A housekeeping step: bounded by ``step_timeout``; its failure is logged, not recorded
        (the user's code ran and ended; only rayvisor's cleanup went wrong)."""
        try:
            await asyncio.wait_for(step, self._step_timeout)
        except Exception as err:
            self._logger.warning("%s: %s failed: %r", self._name, what, err)

    async def wait_done(self) -> OutcomeT:
        """The outcome, once the shutdown sequence has completed."""
        await self._done.wait()
        assert self._outcome is not None
        return self._outcome
