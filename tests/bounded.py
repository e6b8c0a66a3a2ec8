"""Running a Ray-free asyncio scenario under a deadline, so a hang fails the test instead
of the suite."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

SCENARIO_DEADLINE = 5.0
"""Seconds one scenario may take (they take milliseconds)."""


def run_bounded(scenario: Callable[[], Awaitable[Any]], deadline: float = SCENARIO_DEADLINE) -> Any:
    """Run ``scenario()`` on a fresh loop; its result, or ``TimeoutError`` after ``deadline``."""
    async def bounded() -> Any:
        async with asyncio.timeout(deadline):
            return await scenario()
    return asyncio.run(bounded())
