"""Several driver processes submit and query one supervisor at once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import ray

from rayvisor import JobContext

DRIVER = textwrap.dedent('''
    import json, sys
    import rayvisor
    client = rayvisor.connect(sys.argv[1], namespace=sys.argv[2])
    ids = [client.submit(room=f"{sys.argv[3]}-{i}") for i in range(3)]
    print(json.dumps({"ids": ids, "listed": [info.id for info in client.list()]}))
''')


async def waits(ctx: JobContext) -> None:
    await ctx.connect()


def test_two_drivers_submitting_at_once_get_distinct_ids_and_a_consistent_list(serve, namespace):
    client = serve(waits, end_when="never")
    address = ray.get_runtime_context().gcs_address
    drivers = [subprocess.Popen([sys.executable, "-c", DRIVER, address, namespace, name],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in ("left", "right")]
    results = []
    for driver in drivers:
        stdout, stderr = driver.communicate(timeout=120)
        assert driver.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))

    submitted = [job_id for result in results for job_id in result["ids"]]
    assert len(submitted) == len(set(submitted)) == 6
    assert {i.id for i in client.list()} == set(submitted)
    for result in results:  # each driver saw at least its own jobs, and only real ones
        assert set(result["ids"]) <= set(result["listed"]) <= set(submitted)
