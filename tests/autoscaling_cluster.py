"""A Ray cluster run by Ray's own autoscaler, on this machine (Ray's fake multi-node provider).

``ray.cluster_utils.AutoscalingCluster`` would do this, but it reads a config file the ray
wheel does not ship and its ``start()`` runs ``ray stop --force``, which kills every Ray on
the machine (the test session's own included). So the config is written here, the head is
started with ``ray start --head --autoscaling-config=FILE`` and ``RAY_FAKE_CLUSTER=1``, and
only this cluster's processes are stopped: every one of them inherits a marker variable
from the head's environment (the autoscaler starts agent nodes as processes of its own).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import yaml

AGENT_NODE_TYPE = "agent"
HEAD_NODE_TYPE = "ray.head.default"  # the fake provider's own name for the head
MARKER = "RAYVISOR_AUTOSCALING_TEST_CLUSTER"
"""Environment variable every process of one test cluster carries (its value: the cluster's id)."""
HEAD_START_TIMEOUT = 60.0
NODE_POLL_INTERVAL = 0.2
"""How often the node table is read while waiting for the autoscaler (it acts once a second)."""
STOP_GRACE = 5.0
"""Seconds the cluster's processes get to exit on SIGTERM before they are killed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def autoscaler_config(*, gcs_address: str, agent_resources: dict[str, float], max_agent_nodes: int,
                      idle_timeout_minutes: float) -> dict[str, Any]:
    """A cluster config for the fake multi-node provider: a head with no ``rayvisor_slot``
    and an ``agent`` node type the autoscaler adds from zero."""
    commands: dict[str, Any] = {name: [] for name in (
        "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
        "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
        "rsync_filter")}
    return {
        "cluster_name": "rayvisor-autoscaling-" + uuid.uuid4().hex[:6],
        "max_workers": max_agent_nodes,
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            AGENT_NODE_TYPE: {"resources": agent_resources, "node_config": {}, "min_workers": 0,
                              "max_workers": max_agent_nodes},
        },
        **commands,
    }


class AutoscalingCluster:
    """One running test cluster: its GCS ``address`` and how to stop it."""

    def __init__(self, address: str, cluster_id: str, workdir: Path) -> None:
        self.address = address
        self.cluster_id = cluster_id
        self.workdir = workdir

    def processes(self) -> list[psutil.Process]:
        """The processes that carry the marker, and their descendants (a process that set
        its title, as Ray's agents do, may have overwritten its environment's memory)."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER) == self.cluster_id:
                    found[proc.pid] = proc
                    found.update((child.pid, child) for child in proc.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return list(found.values())

    def stop(self) -> None:
        """Stop this cluster's processes only (SIGTERM, then SIGKILL after ``STOP_GRACE``)."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE)
        for proc in alive + self.processes():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@contextmanager
def autoscaling_cluster(*, agent_resources: dict[str, float], max_agent_nodes: int,
                        idle_timeout_minutes: float, upscale_interval: int = 1) -> Iterator[AutoscalingCluster]:
    """Start a head (no ``rayvisor_slot``) whose autoscaler adds ``agent`` nodes on demand."""
    cluster_id = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="rvas-"))  # short: Ray's socket paths live under it
    port = free_port()
    address = f"{_node_ip()}:{port}"
    config = workdir / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(autoscaler_config(
        gcs_address=address, agent_resources=agent_resources, max_agent_nodes=max_agent_nodes,
        idle_timeout_minutes=idle_timeout_minutes)))
    env = {**os.environ, MARKER: cluster_id, "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": str(upscale_interval)}
    cluster = AutoscalingCluster(address, cluster_id, workdir)
    try:
        started = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--num-cpus=1",
             f"--temp-dir={workdir}", "--include-dashboard=false", f"--autoscaling-config={config}",
             "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=HEAD_START_TIMEOUT)
        if started.returncode != 0:
            raise RuntimeError(f"ray start --head failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
        yield cluster
    finally:
        cluster.stop()


def _node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


def agent_nodes() -> list[dict[str, Any]]:
    """The live agent nodes (those advertising ``rayvisor_slot``) of the cluster this driver is on."""
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("rayvisor_slot")]


def wait_for_agent_nodes(count: int, *, timeout: float) -> None:
    """Wait until exactly ``count`` agent nodes are alive (the autoscaler added or removed them)."""
    from support import wait_until

    try:
        wait_until(lambda: len(agent_nodes()) == count, timeout=timeout, interval=NODE_POLL_INTERVAL)
    except AssertionError:
        raise AssertionError(f"{len(agent_nodes())} agent nodes after {timeout}s; wanted {count}") from None
