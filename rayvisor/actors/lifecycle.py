"""The parts of a shutdown sequence that jobs and participant actors share."""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any

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
