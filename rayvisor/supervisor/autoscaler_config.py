"""Which resources the cluster's autoscaler config gives its node types.

A node type the autoscaler may start (``min_workers: 0``) declares its resources before any
such node exists; the supervisor reads the declaration to decide whether job actors take a
``rayvisor_slot`` (``ClusterView``). Two places hold it:

- the cluster config Ray keeps in the GCS (``ray._private.state``; reported by autoscalers
  that report one, e.g. KubeRay's);
- the autoscaler's own config file, when its monitor runs on this node: the cluster
  launcher's head (``ray up``, ``ray start --head --autoscaling-config=FILE``), where
  ``rayvisor start`` runs the supervisor. Its command line names the file.

Both are read with Ray's private APIs or another process's command line, so every failure
here means "no declaration found", never an error for the caller.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

logger = logging.getLogger("rayvisor.supervisor")

AUTOSCALING_CONFIG_FLAG = "--autoscaling-config="
GCS_ADDRESS_FLAG = "--gcs-address="
CONFIG_RESCAN_INTERVAL = 30.0
"""While no autoscaler config is found on this node, look again after this many seconds (the
autoscaler may start after the supervisor); a config once found is kept: the file a running
autoscaler was started with does not change under it."""
MONITOR_SCRIPT = "monitor.py"
"""Ray's autoscaler runs as ``python .../ray/autoscaler/_private/monitor.py --gcs-address=ADDRESS
--autoscaling-config=FILE ...``."""


def declared_resources() -> frozenset[str]:
    """Resource names some node type of the autoscaler's config advertises (a positive amount)."""
    return gcs_cluster_config_resources() | local_autoscaler_config_resources()


def gcs_cluster_config_resources() -> frozenset[str]:
    """From the cluster config in the GCS (empty if none was reported)."""
    try:
        import ray._private.state as ray_state

        config = ray_state.state.get_cluster_config()
    except Exception as err:  # not connected, or a Ray whose private state API moved
        logger.debug("no cluster config in the GCS: %r", err)
        return frozenset()
    if config is None:
        return frozenset()
    return frozenset(name for group in config.node_group_configs
                     for name, amount in group.resources.items() if amount > 0)


_found: dict[str, frozenset[str]] = {}
_last_miss: dict[str, float] = {}


def local_autoscaler_config_resources() -> frozenset[str]:
    """From the config file of this cluster's autoscaler, when it runs on this node (see
    ``CONFIG_RESCAN_INTERVAL``)."""
    try:
        import ray

        gcs_address = ray.get_runtime_context().gcs_address
    except Exception as err:  # not connected: no cluster to match an autoscaler with
        logger.debug("no Ray connection to match an autoscaler with: %r", err)
        return frozenset()
    if gcs_address in _found:
        return _found[gcs_address]
    if time.monotonic() - _last_miss.get(gcs_address, -CONFIG_RESCAN_INTERVAL) < CONFIG_RESCAN_INTERVAL:
        return frozenset()
    found = read_config_resources(autoscaler_config_path(gcs_address))
    if found:
        _found[gcs_address] = found
    else:
        _last_miss[gcs_address] = time.monotonic()
    return found


def read_config_resources(path: Path | None) -> frozenset[str]:
    """The resources the node types of the cluster config at ``path`` advertise (none without one)."""
    if path is None:
        return frozenset()
    try:
        return node_type_resources(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as err:
        logger.warning("cannot read the autoscaler's config %s: %r", path, err)
        return frozenset()


def autoscaler_config_path(gcs_address: str) -> Path | None:
    """The ``--autoscaling-config`` file of the autoscaler monitor of the cluster whose GCS
    is at ``gcs_address``, if it runs on this node (another Ray on the machine has its own)."""
    for proc in psutil.process_iter():
        try:
            cmdline = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if not any(arg.endswith(MONITOR_SCRIPT) for arg in cmdline):
            continue
        flags = dict(arg.split("=", 1) for arg in cmdline if arg.startswith("--") and "=" in arg)
        if flags.get(GCS_ADDRESS_FLAG.rstrip("=")) != gcs_address:
            continue
        config = flags.get(AUTOSCALING_CONFIG_FLAG.rstrip("="))
        return Path(config).expanduser() if config else None
    return None


def node_type_resources(config: Any) -> frozenset[str]:
    """Resource names with a positive amount in a cluster config's ``available_node_types``."""
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        return frozenset()
    names = set()
    for node_type in config["available_node_types"].values():
        resources = node_type.get("resources") if isinstance(node_type, dict) else None
        if isinstance(resources, dict):
            names.update(name for name, amount in resources.items()
                         if isinstance(amount, (int, float)) and amount > 0)
    return frozenset(names)
