"""Asyncio helpers shared by every actor: supervised background tasks."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any


def supervised_task(
    coro: Coroutine[Any, Any, Any],
    *,
    name: str,
    logger: logging.Logger,
    tasks: set[asyncio.Task[Any]] | None = None,
    context: contextvars.Context | None = None,
) -> asyncio.Task[Any]:
    """Start ``coro`` as a task whose failure is logged instead of silently dropped.

    If ``tasks`` is given the task is kept there (a strong reference, so it is not
    garbage-collected mid-flight) until it finishes. ``context``: the ``contextvars`` context
    the task runs in (default: a copy of the caller's).
    """
    task = asyncio.get_running_loop().create_task(coro, name=name, context=context)
    if tasks is not None:
        tasks.add(task)

    def _done(t: asyncio.Task[Any]) -> None:
        if tasks is not None:
            tasks.discard(t)
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            logger.error("background task %s failed", name, exc_info=exc)

    task.add_done_callback(_done)
    return task

