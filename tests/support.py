"""Driver-side helpers for tests (never referenced from agent code, which runs in job actors)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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


def job_actor_of(pid: int, namespace: str) -> Any:
    """The handle of the namespace's job actor running in process ``pid`` (a job taken from
    the warm pool runs in an actor named for the pool, not for the job)."""
    import ray._private.state as ray_state

    names = set(job_actor_names(namespace))
    name = next(a["Name"] for a in ray_state.actors().values()
                if a["State"] == "ALIVE" and a["Pid"] == pid and a["Name"] in names)
    return ray.get_actor(name, namespace=namespace)


def only_pool_actors_left(client: Any, namespace: str) -> bool:
    """Whether every job actor left in the namespace is one of the warm pool's (idle or
    prewarming), so no job's actor is."""
    gauges = client.metrics().gauges
    pool = sum(v for k, v in gauges.items() if k.startswith(("rayvisor_idle_actors|", "rayvisor_prewarming_actors|")))
    return len(job_actor_names(namespace)) == pool


def alive_actors(class_name: str) -> list[dict[str, Any]]:
    """Ray's own actor table (from the GCS): the actors of ``class_name`` still ALIVE."""
    import ray._private.state as ray_state

    return [a for a in ray_state.actors().values() if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]


def actor_pid(handle: Any) -> int:
    """The PID of ``handle``'s actor process, from Ray's actor table (0 until it is alive)."""
    import ray._private.state as ray_state

    return ray_state.actors(actor_id=handle._actor_id.hex())["Pid"]


def worker_log_lines(pid: int) -> list[str]:
    """What Ray worker process ``pid`` (an actor) wrote to stderr, read from the Ray session's
    log file for it (tests run with ``log_to_driver=False``), without Ray's own marker lines."""
    from ray._private import ray_constants

    markers = (ray_constants.LOG_PREFIX_JOB_ID, ray_constants.LOG_PREFIX_ACTOR_NAME, ray_constants.LOG_PREFIX_TASK_NAME,
               ray_constants.LOG_PREFIX_EVENT_SUMMARY, ray_constants.LOG_PREFIX_INFO_MESSAGE)
    files = list(Path(ray._private.worker._global_node.get_logs_dir_path()).glob(f"worker-*-{pid}.err"))
    assert len(files) == 1, f"Ray log files of process {pid}: {files}"
    return [line for line in files[0].read_text().splitlines() if not line.startswith(markers)]


FAST_NODE_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_initial_delay_ms": "0",
}
"""Ray declares a crashed node dead ~1.1 s after it stops (instead of ~15 s)."""


@contextmanager
def ray_cluster(*, worker_nodes: int, node_args: dict[str, Any],
                failure_detection: dict[str, str] = FAST_NODE_FAILURE_DETECTION) -> Iterator[Any]:
    """Swap the session's single-node Ray for a ``ray.cluster_utils.Cluster`` (a head with
    no ``rayvisor_slot`` and ``worker_nodes`` nodes started with ``node_args``, and Ray's
    node health checks set by ``failure_detection``), and back."""
    from conftest import start_session_ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    saved = {k: os.environ.get(k) for k in failure_detection}
    os.environ.update(failure_detection)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80_000_000})
    try:
        for _ in range(worker_nodes):
            cluster.add_node(**node_args)
        ray.init(address=cluster.address, namespace="rayvisor-tests", log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        start_session_ray()
