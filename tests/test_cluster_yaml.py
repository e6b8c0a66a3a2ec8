"""cluster.yaml is a valid Ray cluster launcher config that deploys rayvisor.

Checked against the JSON schema shipped with the installed Ray
(``ray/autoscaler/ray-schema.json``, draft-07), then for what rayvisor needs: agent
nodes advertise ``rayvisor_slot``, the head advertises none, the autoscaler has room to
add nodes, and the head starts the supervisor. Nothing here starts Ray or a cloud call.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
RAY_SCHEMA = Path(ray.__file__).resolve().parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        loaded = yaml.safe_load(f)
    assert isinstance(loaded, dict), f"{CLUSTER_YAML} is not a YAML mapping"
    return loaded


def _node_types(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(head node type, {name: worker node type})."""
    types = config["available_node_types"]
    head_name = config["head_node_type"]
    assert head_name in types, f"head_node_type {head_name!r} is not one of {sorted(types)}"
    return types[head_name], {name: t for name, t in types.items() if name != head_name}


def test_validates_against_rays_schema(config: dict[str, Any]) -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    messages = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    assert not messages, f"{CLUSTER_YAML.name} does not match {RAY_SCHEMA}:\n" + "\n".join(messages)


def test_ray_up_accepts_it(config: dict[str, Any]) -> None:
    """What `ray up` does before touching the cloud: merge the provider's defaults, then
    validate (schema plus head_node_type / min_workers / max_workers consistency)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_not_the_local_provider(config: dict[str, Any]) -> None:
    # The local provider forbids available_node_types, so it could not autoscale agent nodes.
    assert config["provider"]["type"] != "local"


def test_agent_nodes_advertise_slots_and_the_head_none(config: dict[str, Any]) -> None:
    head, workers = _node_types(config)
    assert "rayvisor_slot" not in head["resources"], "jobs must not be placed on the head"
    assert workers, "no worker node type"
    slotted = {name: t for name, t in workers.items() if t["resources"].get("rayvisor_slot", 0) >= 1}
    assert slotted, f"no worker node type advertises rayvisor_slot: {workers}"


def test_the_autoscaler_can_add_agent_nodes(config: dict[str, Any]) -> None:
    _, workers = _node_types(config)
    for name, node_type in workers.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", config["max_workers"])
        assert 0 <= low <= high, f"{name}: min_workers {low} > max_workers {high}"
    assert any(t.get("max_workers", config["max_workers"]) > t.get("min_workers", 0)
               for t in workers.values() if "rayvisor_slot" in t["resources"]), "no room to scale out"
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]


def test_head_starts_ray_then_the_supervisor(config: dict[str, Any]) -> None:
    commands = config["head_start_ray_commands"]
    ray_start = [i for i, c in enumerate(commands) if "ray start --head" in c]
    rayvisor_start = [i for i, c in enumerate(commands) if "rayvisor start" in c]
    assert ray_start, f"no `ray start --head` in {commands}"
    assert rayvisor_start, f"no `rayvisor start` in {commands}"
    assert min(ray_start) < min(rayvisor_start), "the supervisor must start after Ray"
    assert "--address auto" in commands[min(rayvisor_start)]


def test_nodes_install_rayvisor_and_get_the_agent(config: dict[str, Any]) -> None:
    assert any("pip install" in c and "rayvisor" in c for c in config["setup_commands"])
    agent_paths = [remote for remote in config["file_mounts"] if remote.rstrip("/").endswith("agent")]
    assert agent_paths, f"no agent directory in file_mounts: {config['file_mounts']}"
    assert any(c.startswith("ray start --address=") for c in config["worker_start_ray_commands"])


def test_the_supervisor_reads_slots_from_it_so_agent_nodes_may_start_from_zero(config: dict[str, Any]) -> None:
    """What the supervisor on the head reads from the autoscaler's copy of this file
    (``~/ray_bootstrap_config.yaml``) to decide that job actors take a slot."""
    from rayvisor.supervisor.autoscaler_config import node_type_resources

    assert "rayvisor_slot" in node_type_resources(config)
    head, _ = _node_types(config)
    assert "rayvisor_slot" not in node_type_resources({"available_node_types": {"head": head}})
