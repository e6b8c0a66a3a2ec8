"""The warm pool with its defaults: it follows the arrival rate, hands a job the actor it is
prewarming, and replaces a prewarm that overruns ``initialize_process_timeout`` with a
doubling backoff. (Capacity on a cluster: tests/test_cluster.py; the arithmetic:
tests/test_capacity.py.)"""

from __future__ import annotations

import os
import time

from support import process_alive, wait_until

from rayvisor import Cause, JobContext, JobState

AGENT = ""  # the default agent name, as the metrics tag it


def gauge(client, name: str) -> float:
    return client.metrics().gauges.get(f"{name}|agent={AGENT}", 0)


async def ends_at_once(ctx: JobContext) -> None:
    ctx.shutdown(reason="done")


def slow_prewarm(proc) -> None:
    time.sleep(2.0)  # e.g. loading a model
    proc.userdata["prewarmed_at"] = time.time()
    proc.userdata["prewarmed_in"] = os.getpid()


async def reports_its_prewarm(ctx: JobContext) -> None:
    await ctx.connect()
    data = ctx.proc.userdata
    await ctx.room.local_participant.send_text(f"{data['prewarmed_at']}|{data['prewarmed_in']}|{os.getpid()}",
                                               topic="hello")


def never_finishes_prewarming(proc) -> None:
    time.sleep(3600)


def test_the_pool_grows_with_the_arrival_rate_and_shrinks_after_the_rate_window(serve):
    window = 12.0
    client = serve(ends_at_once, pool_rate_window=window)  # num_idle_actors=1, max_idle_actors=4: the defaults
    wait_until(lambda: gauge(client, "rayvisor_idle_actors") == 1, timeout=30)

    peak, jobs = 0.0, []
    for i in range(10):  # a steady stream: jobs go before refills, so a burst would hold every start slot
        jobs.append(client.submit(room=f"arrival-{i}"))
        peak = max(peak, gauge(client, "rayvisor_idle_actors"))
        time.sleep(0.3)  # the arrival rate under test, not a wait for something to settle
    last_arrival = time.monotonic()
    peak = max(peak, wait_until(lambda: (idle := gauge(client, "rayvisor_idle_actors")) >= 2 and idle, timeout=window - 4))
    assert all(client.wait(j, timeout=60).state == JobState.SUCCEEDED for j in jobs)  # nothing takes an actor now

    assert 2 <= peak <= 4  # above num_idle_actors, within max_idle_actors
    wait_until(lambda: gauge(client, "rayvisor_idle_actors") == 1, timeout=window * 2 + 5)
    assert time.monotonic() - last_arrival > window * 0.9  # not before the arrivals left the window


def test_a_job_arriving_while_the_pool_prewarms_takes_that_actor(serve, rooms, namespace):
    """Whichever starts the job sooner: the actor already prewarming, not a cold one."""
    client = serve(reports_its_prewarm, prewarm_fnc=slow_prewarm, initialize_process_timeout=30)
    wait_until(lambda: gauge(client, "rayvisor_prewarming_actors") == 1 and idle_actor_pids(namespace), timeout=30)
    user = rooms.join("prewarming", "user")  # its actor is up and in prewarm_fnc

    submitted = time.time()
    job_id = client.submit(room="prewarming")
    prewarmed_at, prewarmed_in, job_pid = user.wait_for_messages(1, topic="hello", timeout=30)[0][2].split("|")

    assert prewarmed_in == job_pid
    assert job_actor_name(int(job_pid)).startswith("rayvisor-job-idle-")  # the pool's actor, not a cold one
    assert float(prewarmed_at) - submitted < 2.0  # its 2 s prewarm had begun before the job arrived
    assert client.status(job_id).pid == int(job_pid)


def test_a_job_shut_down_while_it_waits_for_a_prewarming_actor_ends_at_once_and_the_actor_stays_in_the_pool(
        serve, namespace):
    client = serve(reports_its_prewarm, prewarm_fnc=slow_prewarm, initialize_process_timeout=30)
    pids = wait_until(lambda: gauge(client, "rayvisor_prewarming_actors") == 1 and idle_actor_pids(namespace), timeout=30)
    job_id = client.submit(room="changes-its-mind")  # takes the actor that is prewarming
    client.wait_for_state(job_id, JobState.STARTING, timeout=10)

    asked = time.monotonic()
    client.shutdown(job_id, reason="not needed after all")
    info = client.wait(job_id, timeout=10)

    assert time.monotonic() - asked < 1.0  # not after the 2 s prewarm
    assert (info.state, info.cause, info.pid) == (JobState.SUCCEEDED, Cause.USER_SHUTDOWN, None)
    wait_until(lambda: gauge(client, "rayvisor_idle_actors") >= 1 and set(pids) <= set(idle_actor_pids(namespace)),
               timeout=30)  # its prewarm finished, and the actor waits for the next job


def test_a_prewarm_past_its_timeout_is_killed_and_replaced_with_a_doubling_backoff(serve, namespace):
    timeout = 2.0
    client = serve(ends_at_once, prewarm_fnc=never_finishes_prewarming, initialize_process_timeout=timeout,
                   pool_backoff_initial=0.2, pool_backoff_max=0.4)
    failures = lambda: client.metrics().counters.get(f"rayvisor_pool_prewarm_failures|agent={AGENT}", 0)  # noqa: E731
    backoffs: dict[int, float] = {}
    failed_at: dict[int, float] = {}
    pids_seen: set[int] = set()

    def observe() -> bool:
        count = int(failures())
        if count and count not in backoffs:
            backoffs[count], failed_at[count] = gauge(client, "rayvisor_pool_backoff_seconds"), time.monotonic()
        pids = idle_actor_pids(namespace)
        assert len(pids) <= 1  # one prewarm at a time, never a pile-up
        pids_seen.update(pids)
        return count >= 3

    wait_until(observe, timeout=60, interval=0.02)

    assert [backoffs[n] for n in (1, 2, 3)] == [0.2, 0.4, 0.4]  # doubling, up to pool_backoff_max
    for n in (2, 3):  # each replacement waited out its backoff, then its own timeout
        assert failed_at[n] - failed_at[n - 1] >= backoffs[n - 1] + timeout - 0.05
    replaced = pids_seen - set(idle_actor_pids(namespace))
    assert len(replaced) >= 2 and not any(process_alive(pid) for pid in replaced)  # each overrun actor was killed


def job_actor_name(pid: int) -> str:
    import ray._private.state as ray_state

    return next(a["Name"] for a in ray_state.actors().values() if a["State"] == "ALIVE" and a["Pid"] == pid)


def idle_actor_pids(namespace: str) -> list[int]:
    import ray
    import ray._private.state as ray_state

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == namespace and a["name"].startswith("rayvisor-job-idle-")}
    return [a["Pid"] for a in ray_state.actors().values() if a["State"] == "ALIVE" and a["Name"] in names and a["Pid"]]
