"""The chaos suite, standalone: ``python tests/chaos/run.py --seed 7 --duration 900 [--nodes 2]``.

Starts its own Ray (one node, or a ``ray.cluster_utils.Cluster`` of a head and ``--nodes``
worker nodes with ``rayvisor_slot``), runs the scenario of ``chaos/scenario.py``, prints
the report as JSON (also written to ``--out``), stops Ray, and exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: `chaos` and `support`
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from chaos.scenario import ChaosConfig, ChaosRun  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of workload and faults")
    parser.add_argument("--nodes", type=int, default=0, help="worker nodes (0: a single-node Ray)")
    parser.add_argument("--slots-per-node", type=int, default=3)
    parser.add_argument("--max-live-jobs", type=int, default=5)
    parser.add_argument("--mean-fault-interval", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    config = ChaosConfig(seed=args.seed, duration=args.duration, max_live_jobs=args.max_live_jobs,
                         mean_fault_interval=args.mean_fault_interval)
    namespace = "chaos-" + uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="rayvisor-chaos-") as workdir:
        if args.nodes:
            from support import FAST_NODE_FAILURE_DETECTION
            from ray.cluster_utils import Cluster

            os.environ.update(FAST_NODE_FAILURE_DETECTION)
            node_args = {"num_cpus": 1, "resources": {"rayvisor_slot": args.slots_per_node},
                         "object_store_memory": 80_000_000}
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80_000_000})
            try:
                for _ in range(args.nodes):
                    cluster.add_node(**node_args)
                ray.init(address=cluster.address, log_to_driver=False)
                cluster.wait_for_nodes()
                report = ChaosRun(config, namespace=namespace, workdir=Path(workdir), cluster=cluster,
                                  worker_node_args=node_args).run()
            finally:
                ray.shutdown()
                cluster.shutdown()
        else:
            ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100_000_000, log_to_driver=False)
            try:
                report = ChaosRun(config, namespace=namespace, workdir=Path(workdir)).run()
            finally:
                ray.shutdown()
    text = json.dumps(report.to_dict(), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
