"""Driver-side helpers for tests (never referenced from agent code, which runs in job actors)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil
import ray


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.005) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def job_actor_names(namespace: str) -> list[str]:
    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace and a["name"].startswith("rayvisor-job-")
    ]


def alive_actors(class_name: str) -> list[dict[str, Any]]:
    """Ray's own actor table (from the GCS): the actors of ``class_name`` still ALIVE."""
    import ray._private.state as ray_state

    return [a for a in ray_state.actors().values() if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]
