"""Inference runners served by rayvisor: one shared, supervised inference actor per node."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("livekit.agents")

import ray  # noqa: E402
from livekit.agents.inference_runner import _InferenceRunner  # noqa: E402
from support import process_alive, wait_until  # noqa: E402

from rayvisor.actors.inference import (  # noqa: E402
    RayInferenceExecutor,
    inference_actor_name,
    registered_runners,
    stop_inference_actors,
)
from rayvisor.errors import (  # noqa: E402
    InferenceError,
    InferenceTimeout,
    RayvisorError,
    UnknownInferenceMethod,
)

ECHO = "rayvisor_test_echo"
SLOW = "rayvisor_test_slow"
RAISES = "rayvisor_test_raises"
BROKEN_INIT = "rayvisor_test_broken_init"
LATE = "rayvisor_test_late"
ACTOR_GONE_TIMEOUT = 15.0
"""Bound for Ray to end a killed actor's process and free its name on this shared 2-core machine."""


class EchoRunner(_InferenceRunner):
    """Answers the data reversed, with its process id and how often it was initialized."""

    INFERENCE_METHOD = ECHO

    def initialize(self) -> None:
        self.inits = getattr(self, "inits", 0) + 1

    def run(self, data: bytes) -> bytes | None:
        return json.dumps({"echo": data[::-1].decode(), "pid": os.getpid(), "inits": self.inits}).encode()


class SlowRunner(_InferenceRunner):
    """Sleeps for ``float(data)`` seconds."""

    INFERENCE_METHOD = SLOW

    def initialize(self) -> None:
        pass

    def run(self, data: bytes) -> bytes | None:
        time.sleep(float(data))
        return b"slept"


class RaisingRunner(_InferenceRunner):
    INFERENCE_METHOD = RAISES

    def initialize(self) -> None:
        pass

    def run(self, data: bytes) -> bytes | None:
        raise ValueError(f"cannot handle {data!r}")


class BrokenInitRunner(_InferenceRunner):
    INFERENCE_METHOD = BROKEN_INIT

    def initialize(self) -> None:
        raise OSError("model file missing")

    def run(self, data: bytes) -> bytes | None:
        return data


class LateRunner(_InferenceRunner):
    """Registered only after the node's actor exists (a second agent's plugin)."""

    INFERENCE_METHOD = LATE

    def initialize(self) -> None:
        pass

    def run(self, data: bytes) -> bytes | None:
        return b"late:" + data


@pytest.fixture(scope="module", autouse=True)
def runners() -> Iterator[None]:
    """Registered as livekit-agents plugins do (on the main thread); removed afterwards."""
    classes = [EchoRunner, SlowRunner, RaisingRunner, BrokenInitRunner]
    for cls in classes:
        _InferenceRunner.register_runner(cls)
    yield
    for cls in classes:
        _InferenceRunner.registered_runners.pop(cls.INFERENCE_METHOD, None)


@pytest.fixture
def cleanup(namespace: str) -> Iterator[None]:
    yield
    stop_inference_actors(namespace)


def inference_actors(namespace: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace and a["name"].startswith("rayvisor-inference-"))


def echo(reply: bytes | None) -> dict:
    assert reply is not None
    return json.loads(reply)


def test_two_jobs_on_a_node_share_one_actor(namespace: str, cleanup: None) -> None:
    async def main():
        first, second = RayInferenceExecutor(namespace), RayInferenceExecutor(namespace)
        replies = await asyncio.gather(first.do_inference(ECHO, b"hello"), second.do_inference(ECHO, b"world"))
        again = await second.do_inference(ECHO, b"abc")
        return [echo(r) for r in (*replies, again)], await first.actor_info()

    (a, b, c), info = asyncio.run(main())
    assert (a["echo"], b["echo"], c["echo"]) == ("olleh", "dlrow", "cba")
    assert a["pid"] == b["pid"] == c["pid"] == info.pid != os.getpid()
    assert a["inits"] == b["inits"] == c["inits"] == 1  # initialized once, for both jobs
    node_id = ray.get_runtime_context().get_node_id()
    assert info.node_id == node_id and not info.restarted
    assert set(info.runners) == {ECHO, SLOW, RAISES} and set(info.failed) == {BROKEN_INIT}
    assert inference_actors(namespace) == [inference_actor_name(node_id)]


def test_a_killed_actor_is_restarted_and_the_next_call_works(namespace: str, cleanup: None) -> None:
    async def main():
        executor = RayInferenceExecutor(namespace)
        before = echo(await executor.do_inference(ECHO, b"ab"))
        ray.kill(ray.get_actor(inference_actor_name(executor.node_id), namespace=namespace), no_restart=False)
        wait_until(lambda: not process_alive(before["pid"]), ACTOR_GONE_TIMEOUT)
        after = echo(await executor.do_inference(ECHO, b"cd"))
        return before, after, await executor.actor_info()

    before, after, info = asyncio.run(main())
    assert after["echo"] == "dc"
    assert after["pid"] != before["pid"] and info.pid == after["pid"]
    assert info.restarted and after["inits"] == 1  # Ray restarted it; its runners initialized again


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_an_actor_gone_for_good_is_recreated_by_the_executor(namespace: str, cleanup: None) -> None:
    async def main():
        executor = RayInferenceExecutor(namespace)
        before = echo(await executor.do_inference(ECHO, b"ab"))
        ray.kill(ray.get_actor(inference_actor_name(executor.node_id), namespace=namespace), no_restart=True)
        wait_until(lambda: not process_alive(before["pid"]), ACTOR_GONE_TIMEOUT)
        after = echo(await executor.do_inference(ECHO, b"xyz"))
        return before, after, executor.recoveries, await executor.actor_info()

    records = _Records()  # on the logger itself: the CLI's logging set-up stops propagation to caplog's
    inference_logger = logging.getLogger("rayvisor.inference")
    inference_logger.addHandler(records)
    try:
        before, after, recoveries, info = asyncio.run(main())
    finally:
        inference_logger.removeHandler(records)
    assert after["echo"] == "zyx" and after["pid"] != before["pid"]
    assert recoveries == 1 and not info.restarted  # a new actor, not a Ray restart
    assert any("re-creating" in message for message in records.messages)


def test_unknown_method_is_a_typed_error(namespace: str, cleanup: None) -> None:
    executor = RayInferenceExecutor(namespace)
    with pytest.raises(UnknownInferenceMethod, match="rayvisor_test_nope") as caught:
        asyncio.run(executor.do_inference("rayvisor_test_nope", b"x"))
    assert isinstance(caught.value, InferenceError) and isinstance(caught.value, RayvisorError)
    assert isinstance(caught.value, RuntimeError)  # what LiveKit Agents raises for failed inference
    assert executor.recoveries == 0


def test_runner_failures_are_typed_errors(namespace: str, cleanup: None) -> None:
    async def outcome(executor: RayInferenceExecutor, method: str) -> BaseException | None:
        try:
            await executor.do_inference(method, b"bad")
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            return err
        return None

    async def main():
        executor = RayInferenceExecutor(namespace)
        return await outcome(executor, RAISES), await outcome(executor, BROKEN_INIT)

    raised, broken = asyncio.run(main())
    assert type(raised) is InferenceError and "ValueError: cannot handle b'bad'" in str(raised)
    assert type(broken) is InferenceError and "failed to initialize" in str(broken) and "model file missing" in str(broken)


SLOW_CALL_TIMEOUT = 5.0
"""The slow call's bound: far longer than a fast call takes even on a loaded machine."""
SLOW_RUN_SECONDS = 30.0
"""How long the slow runner runs: past its call's bound, so the call must time out."""


def test_slow_runner_times_out_without_blocking_other_calls(namespace: str, cleanup: None) -> None:
    async def main():
        executor = RayInferenceExecutor(namespace, call_timeout=SLOW_CALL_TIMEOUT)
        await executor.do_inference(ECHO, b"warm")  # actor created and ready
        slow = asyncio.create_task(executor.do_inference(SLOW, str(SLOW_RUN_SECONDS).encode()))
        fast = echo(await executor.do_inference(ECHO, b"ok"))
        answered_while_slow_ran = not slow.done()
        with pytest.raises(InferenceTimeout, match=f"within {SLOW_CALL_TIMEOUT}s"):
            await slow
        return fast, answered_while_slow_ran

    fast, answered_while_slow_ran = asyncio.run(main())
    assert fast["echo"] == "ko" and answered_while_slow_ran


def test_a_runner_the_actor_lacks_is_added_from_the_job(namespace: str, cleanup: None) -> None:
    async def main():
        first = RayInferenceExecutor(namespace)
        pid = echo(await first.do_inference(ECHO, b"a"))["pid"]  # actor created without LateRunner
        _InferenceRunner.register_runner(LateRunner)
        try:
            late = await RayInferenceExecutor(namespace).do_inference(LATE, b"x")
        finally:
            _InferenceRunner.registered_runners.pop(LATE, None)
        return pid, late, await first.actor_info()

    pid, late, info = asyncio.run(main())
    assert late == b"late:x" and info.pid == pid and LATE in info.runners


def test_stop_inference_actors_removes_only_its_namespace(namespace: str, cleanup: None) -> None:
    other = namespace + "-other"
    try:
        for ns in (namespace, other):
            asyncio.run(RayInferenceExecutor(ns).do_inference(ECHO, b"x"))
        assert stop_inference_actors(namespace) == [inference_actor_name(ray.get_runtime_context().get_node_id())]
        wait_until(lambda: not inference_actors(namespace), ACTOR_GONE_TIMEOUT)
        assert inference_actors(other)
    finally:
        stop_inference_actors(other)


def test_client_stop_removes_the_inference_actors(serve, namespace: str) -> None:
    async def idle(ctx) -> None:
        await ctx.connect()

    client = serve(idle, num_idle_actors=0)
    asyncio.run(RayInferenceExecutor(namespace).do_inference(ECHO, b"x"))
    assert inference_actors(namespace)
    client.stop(timeout=30)
    wait_until(lambda: not inference_actors(namespace), ACTOR_GONE_TIMEOUT)


def test_registry_is_read_without_importing_livekit_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(registered_runners()) >= {ECHO, SLOW}
    monkeypatch.delitem(sys.modules, "livekit.agents.inference_runner")
    assert registered_runners() == {}
    code = ("import sys, rayvisor.actors.inference as m; assert m.registered_runners() == {}; "
            "assert not [n for n in sys.modules if n.startswith('livekit.agents')], 'livekit.agents imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def infers_in_a_job(ctx) -> None:
    """A livekit-agents style entrypoint: ``get_job_context().inference_executor``."""
    from livekit.agents import get_job_context

    # What a plugin's import does in the job's process (registered directly: this is not the main thread).
    _InferenceRunner.registered_runners.setdefault(ECHO, EchoRunner)
    await ctx.connect()
    try:
        reply = (await get_job_context().inference_executor.do_inference(ECHO, b"job") or b"").decode()
    except Exception as err:  # reported to the test, which fails with it
        reply = f"error: {type(err).__name__}: {err}"
    await ctx.room.local_participant.send_text(reply, topic="inference")


def test_a_job_reaches_its_nodes_inference_actor(serve, rooms, namespace: str) -> None:
    client = serve(infers_in_a_job, num_idle_actors=0)
    user = rooms.join("inference-room", "user")
    job_id = client.submit(room="inference-room")

    reply = user.wait_for_messages(1, topic="inference", timeout=60)[0][2]
    assert reply.startswith("{"), reply
    answer = json.loads(reply)
    assert answer["echo"] == "boj" and answer["pid"] != client.status(job_id).pid  # served by the node's actor
    node_id = ray.get_runtime_context().get_node_id()
    assert inference_actors(namespace) == [inference_actor_name(node_id)]
    shared = echo(asyncio.run(RayInferenceExecutor(namespace).do_inference(ECHO, b"x")))
    assert shared["pid"] == answer["pid"]  # one actor per node, whoever created it
