"""``rayvisor demo``: a simulated support desk on a local Ray, printed as it happens.

Three jobs run the same agent in three rooms, each ending a different way:
  1. support-42: a caller and a SIP participant talk to the agent, then leave -> room_empty;
  2. support-43: the user says "bye", the agent calls ``ctx.shutdown`` -> user_shutdown;
  3. support-44: a shutdown callback hangs; the supervisor kills the job when its budget
     is spent -> KILLED, shutdown_timeout (the bound LiveKit Agents does not enforce).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time

import ray
from livekit import rtc

from .agents.job import JobContext
from .agents.options import WorkerOptions
from .messages import Cause, JobState

DEMO_NAMESPACE = "rayvisor-demo"
WAIT = 30.0
"""Bound on every wait in the demo script."""


async def support_agent(ctx: JobContext) -> None:
    """Greets, answers on topic "chat", follows language changes, saves state on shutdown."""
    profile = json.loads(ctx.job.metadata or "{}")
    ctx.log_context_fields = {"worker_id": ctx.worker_id, "room_name": ctx.room.name}

    async def say(text: str) -> None:
        await ctx.room.local_participant.send_text(text, topic="chat")

    async def on_chat(reader, sender: str) -> None:
        text = await reader.read_all()
        if text.strip().lower() == "bye":
            await say(f"goodbye {sender}")
            ctx.shutdown(reason="user said bye")
        else:
            await say(f"{sender}, you said {text!r}; a human will be with you shortly")

    @ctx.room.on("participant_attributes_changed")
    def on_attributes(changed: dict[str, str], participant) -> None:
        if "user.language" in changed:
            asyncio.create_task(say(f"switching to {changed['user.language']} for {participant.identity}"))

    async def save_state(reason: str) -> None:
        if profile.get("hang_on_shutdown"):
            await asyncio.Event().wait()  # a misbehaving hook: never returns
        await say(f"saved the session of user {profile.get('user_id')} ({reason})") if ctx.room.isconnected() else None

    ctx.add_shutdown_callback(save_state)
    ctx.room.register_text_stream_handler("chat", on_chat)
    await ctx.connect()
    await say(f"hello {profile.get('user_name', 'there')}, welcome to the support desk")


def run_demo(*, hang_budget: float = 1.0, ray_logging_level: int = logging.ERROR) -> int:
    """Run the scripted session; returns a process exit code (0 when every job ended as expected).
    ``ray_logging_level``: this process's ``ray`` logger (``rayvisor --verbose demo`` shows Ray's lines)."""
    import rayvisor
    from .cli import format_transition

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throw-away local Ray, gone when the demo ends
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            print(line, flush=True)

    say("starting a local Ray and the rayvisor supervisor ...")
    # address="local": always a Ray of its own, which ray.shutdown() below removes. Without it
    # ray.init() attaches to RAY_ADDRESS or to the cluster `ray start` last recorded (Ray's
    # ray_current_cluster file): the demo would run on someone's cluster, or fail on a stale file.
    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace=DEMO_NAMESPACE,
             logging_level=ray_logging_level, configure_logging=True)
    try:
        local = {"ws_url": "", "api_key": "", "api_secret": ""}  # the built-in rooms, even with LIVEKIT_* set
        client = rayvisor.serve(WorkerOptions(entrypoint_fnc=support_agent, agent_name="support",
                                              shutdown_process_timeout=5.0, **local), namespace=DEMO_NAMESPACE)
        rayvisor.serve(WorkerOptions(entrypoint_fnc=support_agent, agent_name="support-hangs",
                                     shutdown_process_timeout=hang_budget, **local), namespace=DEMO_NAMESPACE)
        rooms = rayvisor.local_rooms(namespace=DEMO_NAMESPACE)
        stop = threading.Event()
        follower = threading.Thread(target=_follow, args=(client, stop, say, format_transition), daemon=True)
        follower.start()

        def chat(participant, text: str, expect: int) -> None:
            say(f"            {participant.identity} -> agent: {text}")
            participant.send_text(text, topic="chat")
            _show_replies(participant, expect, say)

        # 1. a conversation that ends when everyone has left
        alice = rooms.join("support-42", "alice", attributes={"user.language": "en"})
        job1 = client.submit(room="support-42", agent_name="support",
                             metadata=json.dumps({"user_id": 7, "user_name": "Alice"}))
        _show_replies(alice, 1, say)
        chat(alice, "my order never arrived", 2)
        caller = rooms.join("support-42", "+15550100", kind=rtc.ParticipantKind.PARTICIPANT_KIND_SIP)
        alice.set_attributes({"user.language": "es"})
        say("            alice sets user.language=es")
        _show_replies(alice, 3, say)
        say("            alice and the SIP caller leave")
        alice.leave()
        caller.leave()
        info1 = client.wait(job1, timeout=WAIT)

        # 2. the agent ends the session itself
        bob = rooms.join("support-43", "bob")
        job2 = client.submit(room="support-43", agent_name="support", metadata=json.dumps({"user_name": "Bob"}))
        _show_replies(bob, 1, say)
        chat(bob, "bye", 2)
        info2 = client.wait(job2, timeout=WAIT)
        bob.leave()

        # 3. a shutdown hook that hangs: killed when the budget is spent
        carol = rooms.join("support-44", "carol")
        job3 = client.submit(room="support-44", agent_name="support-hangs",
                             metadata=json.dumps({"user_name": "Carol", "hang_on_shutdown": True}))
        _show_replies(carol, 1, say)
        client.wait_for_state(job3, JobState.RUNNING, timeout=WAIT)
        say(f"            operator shuts {job3} down; its shutdown hook hangs (budget {hang_budget}s)")
        asked = time.monotonic()
        client.shutdown(job3, reason="operator request")
        info3 = client.wait(job3, timeout=WAIT)
        took = time.monotonic() - asked

        stop.set()
        follower.join(timeout=WAIT)
        say("")
        say("summary")
        for info, expected in ((info1, Cause.ROOM_EMPTY), (info2, Cause.USER_SHUTDOWN),
                               (info3, Cause.SHUTDOWN_TIMEOUT)):
            say(f"  {info.room}: {info.state.value:<9} cause={info.cause.value if info.cause else None}"
                f"  (expected {expected.value})")
        say(f"  support-44 was killed {took:.2f}s after the shutdown request (budget {hang_budget}s)")
        ok = (info1.cause, info2.cause, info3.cause) == (Cause.ROOM_EMPTY, Cause.USER_SHUTDOWN, Cause.SHUTDOWN_TIMEOUT)
        client.stop()
        return 0 if ok else 1
    finally:
        ray.shutdown()
        say("local Ray stopped; nothing left running")


def _follow(client, stop, say, format_transition) -> None:
    after = -1
    while not stop.is_set():
        for event in client.events(after, timeout=0.5):
            say(format_transition(event))
            after = event.seq


def _show_replies(participant, count: int, say) -> None:
    for sender, _topic, text in participant.wait_for_messages(count, topic="chat", timeout=WAIT)[count - 1:count]:
        say(f"            agent -> {participant.identity}: {text}")
