"""deploy/kuberay/raycluster.yaml is a valid KubeRay RayCluster that deploys rayvisor.

Checked against KubeRay's RayCluster CRD schema (a trimmed copy in
tests/data/kuberay_raycluster_schema.yaml, see its header), with unknown fields refused
as ``kubectl apply`` (strict field validation) refuses them, then for what rayvisor
needs: autoscaling on, agent pods advertising ``rayvisor_slot``, the head none, the
supervisor started on the head, and probes on its health endpoint. Nothing here talks
to Kubernetes.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rayvisor.agents.options import START_HTTP_PORT, WorkerOptions
from rayvisor.health import HEALTH_CALL_SLACK

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kuberay" / "raycluster.yaml"
SCHEMA = Path(__file__).resolve().parent / "data" / "kuberay_raycluster_schema.yaml"
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    loaded = yaml.safe_load(MANIFEST.read_text())
    assert isinstance(loaded, dict), f"{MANIFEST} is not a YAML mapping"
    return loaded


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text())


def schema_errors(document: Any, schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))]


def unknown_fields(document: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare, where it declares its fields (what the API
    server reports under strict field validation; a structural schema allows no others)."""
    found: list[str] = []
    if isinstance(document, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, value in document.items():
            if key not in schema["properties"]:
                found.append(f"{path}/{key}")
            else:
                found += unknown_fields(value, schema["properties"][key], f"{path}/{key}")
    elif isinstance(document, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in document.items():
            found += unknown_fields(value, schema["additionalProperties"], f"{path}/{key}")
    elif isinstance(document, list) and isinstance(schema.get("items"), dict):
        for index, value in enumerate(document):
            found += unknown_fields(value, schema["items"], f"{path}/{index}")
    return found


def head_container(manifest: dict[str, Any]) -> dict[str, Any]:
    """The Ray container of the head: KubeRay configures ``containers[0]``."""
    return manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def agent_group(manifest: dict[str, Any]) -> dict[str, Any]:
    (group,) = [g for g in manifest["spec"]["workerGroupSpecs"] if g["groupName"] == "agent"]
    return group


def ray_resources(ray_start_params: dict[str, str]) -> dict[str, float]:
    """``rayStartParams.resources`` in KubeRay's quoting: a JSON string holding the JSON object."""
    value = ray_start_params.get("resources")
    if value is None:
        return {}
    inner = json.loads(value)
    assert isinstance(inner, str), f"resources must be quoted as KubeRay expects ('\"{{...}}\"'), got {value!r}"
    return json.loads(inner)


# --------------------------------------------------------------------------- KubeRay's schema


def test_validates_against_kuberays_raycluster_schema(manifest: dict[str, Any], schema: dict[str, Any]) -> None:
    errors = schema_errors(manifest, schema)
    assert not errors, f"{MANIFEST.name} does not match KubeRay's CRD schema:\n" + "\n".join(errors)


def test_sets_no_field_kuberay_does_not_know(manifest: dict[str, Any], schema: dict[str, Any]) -> None:
    assert unknown_fields(manifest, schema) == []


def test_the_schema_check_catches_a_misspelt_field_and_a_bad_value(manifest: dict[str, Any],
                                                                    schema: dict[str, Any]) -> None:
    broken = copy.deepcopy(manifest)
    agent_group(broken)["minReplica"] = agent_group(broken).pop("minReplicas")
    broken["spec"]["authOptions"]["mode"] = "tokens"
    assert unknown_fields(broken, schema) == ["/spec/workerGroupSpecs/0/minReplica"]
    errors = " ".join(schema_errors(broken, schema))
    assert "'minReplicas' is a required property" in errors and "'tokens' is not one of" in errors


def test_is_a_ray_io_v1_raycluster_with_token_auth(manifest: dict[str, Any]) -> None:
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    assert manifest["spec"]["authOptions"]["mode"] == "token"
    ray_version = tuple(int(part) for part in manifest["spec"]["rayVersion"].split("."))
    assert ray_version >= MIN_RAY_FOR_TOKEN_AUTH, "KubeRay's authOptions needs Ray >= 2.52.0"


# --------------------------------------------------------------------------- what rayvisor needs


def test_the_autoscaler_is_on_and_removes_idle_agent_pods(manifest: dict[str, Any]) -> None:
    spec = manifest["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0


def test_agent_pods_advertise_slots_and_the_head_none(manifest: dict[str, Any]) -> None:
    assert "rayvisor_slot" not in ray_resources(manifest["spec"]["headGroupSpec"]["rayStartParams"])
    slots = ray_resources(agent_group(manifest)["rayStartParams"])["rayvisor_slot"]
    assert isinstance(slots, int) and slots > 0


def test_the_agent_group_can_grow_and_job_actors_take_slots_even_with_no_agent_pod_up(
        manifest: dict[str, Any]) -> None:
    """KubeRay's autoscaler runs in a sidecar, where the supervisor cannot read its config:
    the head says ``job_slots`` itself, so with ``minReplicas: 0`` jobs never land on the head."""
    group = agent_group(manifest)
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] == 10
    env = {item["name"]: item.get("value") for item in head_container(manifest)["env"]}
    assert job_slots_from_env_value(env["RAYVISOR_JOB_SLOTS"]) is True


def job_slots_from_env_value(value: str) -> bool | None:
    import os
    from unittest import mock

    from rayvisor.agents.options import JOB_SLOTS_ENV, job_slots_from_env

    with mock.patch.dict(os.environ, {JOB_SLOTS_ENV: value}):
        return job_slots_from_env()


def test_the_head_starts_ray_then_the_supervisor(manifest: dict[str, Any]) -> None:
    assert manifest["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    script = "\n".join(head_container(manifest)["args"])
    # KubeRay's command ends in --block: in the background, then rayvisor once Ray answers
    assert re.search(r"^\s*\$KUBERAY_GEN_RAY_START_CMD\s*&\s*$", script, re.MULTILINE)
    assert re.search(r"^\s*exec rayvisor start \S+ --address auto\b", script, re.MULTILINE)
    assert script.index("KUBERAY_GEN_RAY_START_CMD") < script.index("ray status") < script.index("rayvisor start")


def test_head_probes_hit_the_health_endpoint_on_the_port_rayvisor_start_serves(manifest: dict[str, Any]) -> None:
    container = head_container(manifest)
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    for kind in ("livenessProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        port = ports[probe["port"]] if isinstance(probe["port"], str) else probe["port"]
        assert (probe["path"], port) == ("/", START_HTTP_PORT), kind
        assert port in ports.values(), f"{kind} probes a port the container does not expose"


def test_a_probe_waits_longer_than_the_health_endpoint_takes_to_answer(manifest: dict[str, Any]) -> None:
    """``/`` answers 503 within ``health_check_timeout`` + ``HEALTH_CALL_SLACK``: a probe that
    gave up sooner would count a clear 503 as a timeout."""
    answer_bound = WorkerOptions.__dataclass_fields__["health_check_timeout"].default + HEALTH_CALL_SLACK
    for kind in ("livenessProbe", "readinessProbe"):
        assert head_container(manifest)[kind]["timeoutSeconds"] > answer_bound, kind


def test_lines_users_must_change_are_marked() -> None:
    text = MANIFEST.read_text()
    for marked in ("rayVersion:", "image: ghcr.io/YOUR-ORG", "terminationGracePeriodSeconds: 1900",
                   "resources: '\"{"):
        lines = [line for line in text.splitlines() if marked in line]
        assert lines and all("# CHANGE" in line for line in lines), lines
