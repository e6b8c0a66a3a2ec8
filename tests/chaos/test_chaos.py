"""The chaos suite, CI's short fixed-seed runs: faults under a mixed workload lose no job
record, leave no actor or process behind, and break no shutdown bound.

The long runs are ``python tests/chaos/run.py --seed N --duration S [--nodes K]`` (see
RELIABILITY.md); these are the same scenario, shorter.
"""

from __future__ import annotations

import json

import pytest
from support import ray_cluster

from chaos.scenario import ChaosConfig, ChaosRun

SLOTS_PER_NODE = 3


def assert_clean(report) -> None:
    print(json.dumps(report.to_dict(), indent=2))
    assert report.violations == []
    assert (report.lost_records, report.leaked_actors, report.leaked_processes) == (0, 0, 0)


def test_single_node_chaos_loses_nothing_and_leaks_nothing(namespace, tmp_path):
    config = ChaosConfig(seed=20261202, duration=60)

    report = ChaosRun(config, namespace=namespace, workdir=tmp_path).run()

    assert_clean(report)
    # Timing is the machine's, not the seed's: how many of each fault varies, never to zero.
    assert report.jobs >= 10 and report.faults_injected >= 8
    assert {"job_actor", "supervisor"} <= set(report.faults)


@pytest.mark.timeout(600)
def test_multi_node_chaos_with_node_loss_loses_nothing_and_leaks_nothing(namespace, tmp_path):
    node_args = {"num_cpus": 1, "resources": {"rayvisor_slot": SLOTS_PER_NODE}, "object_store_memory": 80_000_000}
    config = ChaosConfig(seed=7, duration=45, node_kill_spacing=12, scheduled_node_kills=True)
    with ray_cluster(worker_nodes=2, node_args=node_args) as cluster:
        report = ChaosRun(config, namespace=namespace, workdir=tmp_path, cluster=cluster,
                          worker_node_args=node_args).run()

    assert_clean(report)
    assert report.faults.get("node", 0) >= 2
