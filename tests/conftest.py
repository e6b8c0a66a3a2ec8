"""One Ray instance for the whole test session; one supervisor namespace per test."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # tests only; production keeps Ray's token auth
for _name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):  # the local backend unless a test says so
    os.environ.pop(_name, None)

# Ray workers (started from this process's environment) can import the tests' own helper
# modules, e.g. lk_plugin_fixture: a stand-in plugin that agent code imports by reference.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)

import ray  # noqa: E402

import rayvisor  # noqa: E402
from rayvisor.rooms.local import LocalRooms  # noqa: E402


def start_session_ray() -> None:
    """The single-node Ray most tests share (tests/test_cluster.py swaps it for a cluster)."""
    ray.init(
        address="local",  # a Ray of its own, never one another run (or a cluster_utils cluster) left announced
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100_000_000,
        log_to_driver=False,
        namespace="rayvisor-tests",
    )


@pytest.fixture(scope="session", autouse=True)
def ray_session() -> Iterator[None]:
    start_session_ray()
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def rayvisor_logging_restored() -> Iterator[None]:
    """Undo what a test's in-process CLI run does to the ``rayvisor`` logger (``logs.configure``
    stops propagation), so later tests' ``caplog`` still sees rayvisor's records."""
    logger = logging.getLogger("rayvisor")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def namespace() -> str:
    return "t-" + uuid.uuid4().hex[:8]


@pytest.fixture
def serve(namespace: str) -> Iterator[Callable[..., rayvisor.Client]]:
    """``serve(entrypoint, **worker_options)`` -> a Client of a fresh supervisor; torn down after.
    Every option not given keeps its ``WorkerOptions`` default (the warm pool included):
    tests run what users run."""
    clients: list[rayvisor.Client] = []

    def start(entrypoint: Callable[..., Any], **options: Any) -> rayvisor.Client:
        client = rayvisor.serve(rayvisor.WorkerOptions(entrypoint_fnc=entrypoint, **options), namespace=namespace)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.stop(timeout=30)  # also kills any job actor of the namespace still alive


@pytest.fixture
def rooms(namespace: str) -> LocalRooms:
    return rayvisor.local_rooms(namespace=namespace)
