"""Supervisor-wide settings are set once, and an agent asking for others is told which.

``max_jobs``, the load policy, history sizes and the like apply to every agent a
supervisor serves. They come from the first agent's ``WorkerOptions`` or from
``serve(settings=SupervisorSettings(...))``; a later agent whose options disagree is
registered with the supervisor's settings and a warning naming each field it does not get.
"""

from __future__ import annotations

import logging

import pytest

import rayvisor
from rayvisor import SupervisorSettings, WorkerOptions
from rayvisor.errors import AtCapacity, InvalidAgent
from support import wait_until

TIMEOUT = 60.0
"""Deadline for anything that involves starting a job actor (cold actors are slow on CI)."""


async def idle_agent(ctx) -> None:
    await ctx.connect()


def load_a(info) -> float:
    return 0.0


def load_b(info) -> float:
    return 0.0


# --------------------------------------------------------------------------- without Ray


def test_settings_come_from_the_supervisor_wide_fields_of_an_agents_options() -> None:
    opts = WorkerOptions(entrypoint_fnc=idle_agent, max_jobs=3, event_history=7, load_fnc=load_a,
                         shutdown_process_timeout=2.0)
    settings = SupervisorSettings.from_options(opts)

    assert (settings.max_jobs, settings.event_history, settings.load_fnc) == (3, 7, load_a)
    assert not hasattr(settings, "shutdown_process_timeout")  # per agent, not supervisor-wide


def test_conflicts_name_each_field_the_supervisor_keeps() -> None:
    kept = SupervisorSettings(max_jobs=2, load_fnc=load_a)

    assert kept.conflicts(SupervisorSettings(max_jobs=2, load_fnc=load_a)) == []
    assert kept.conflicts(SupervisorSettings(max_jobs=5, load_fnc=load_b, event_history=10)) == [
        "max_jobs=5 (the supervisor keeps 2)",
        "load_fnc=load_b (the supervisor keeps load_a)",
        "event_history=10 (the supervisor keeps 10000)",
    ]


def test_functions_are_compared_by_where_they_are_defined() -> None:
    """A ``load_fnc`` arrives unpickled: a different object for the same function."""
    twin = type(load_a)(load_a.__code__, load_a.__globals__, "load_a")
    twin.__qualname__ = load_a.__qualname__

    assert SupervisorSettings(load_fnc=load_a).conflicts(SupervisorSettings(load_fnc=twin)) == []


@pytest.mark.parametrize("field, value", [("max_jobs", 0), ("load_threshold", 2.0), ("event_history", -1),
                                          ("cluster_view_interval", float("nan"))])
def test_invalid_settings_are_refused_like_the_options_they_mirror(field: str, value: object) -> None:
    with pytest.raises(InvalidAgent, match=f"SupervisorSettings: {field}"):
        SupervisorSettings(**{field: value})


# --------------------------------------------------------------------------- with Ray


def test_a_later_agent_gets_the_running_supervisors_settings_and_a_warning_naming_them(
        serve, rooms, caplog) -> None:
    client = serve(idle_agent, agent_name="first", max_jobs=1)
    with caplog.at_level(logging.WARNING, logger="rayvisor.client"):
        serve(idle_agent, agent_name="second", max_jobs=5, event_history=50)

    warned = [r.getMessage() for r in caplog.records if r.name == "rayvisor.client"]
    assert len(warned) == 1
    assert "max_jobs=5 (the supervisor keeps 1)" in warned[0] and "event_history=50" in warned[0]
    rooms.join("kept-1", "alice")
    client.submit(room="kept-1", agent_name="first")
    with pytest.raises(AtCapacity, match="max_jobs=1"):
        client.submit(room="kept-2", agent_name="second")  # the supervisor's max_jobs, not the agent's


def test_settings_given_to_serve_apply_whatever_the_agent_says(namespace, rooms) -> None:
    client = rayvisor.serve(WorkerOptions(entrypoint_fnc=idle_agent, max_jobs=None), namespace=namespace,
                            settings=SupervisorSettings(max_jobs=1))
    try:
        rooms.join("given-1", "alice")
        job_id = client.submit(room="given-1")
        wait_until(lambda: client.status(job_id).state == rayvisor.JobState.RUNNING, timeout=TIMEOUT)
        with pytest.raises(AtCapacity, match="max_jobs=1"):
            client.submit(room="given-2")
    finally:
        client.stop(timeout=TIMEOUT)


# --------------------------------------------------------------------------- hooks are not endpoints


def test_the_supervisor_actor_has_nothing_but_endpoints() -> None:
    """Ray lets a caller reach any method of an actor class, underscored or not: so the class
    holds only its endpoints (typed records in and out), and everything else lives on the
    plain objects it holds. ``register_agent`` is the one exception: options carry code."""
    from rayvisor.supervisor.supervisor import Supervisor

    cls = Supervisor.__ray_actor_class__
    methods = {name for name, value in vars(cls).items() if callable(value) and name != "__init__"}
    assert methods, "the actor class has endpoints"
    assert {name for name in methods if not hasattr(getattr(cls, name), "request_type")} == {"register_agent"}


FORMER_HOOKS = ["admit", "run_job", "reject", "begin_shutdown", "worker_load", "existing_job", "agent_options",
                "_admit", "_begin_shutdown", "_run_job", "_kill_attempt", "_persist", "_recover", "_on_change", "ping"]


def test_former_internal_hooks_are_not_remotely_callable(serve) -> None:
    """The hooks LiveKit dispatch and the job drivers use take Python objects, not records:
    they live on objects the supervisor holds, not on the actor class, so no caller can
    reach them; trying gets a typed error naming the method."""
    client = serve(idle_agent)
    for hook in FORMER_HOOKS:
        with pytest.raises(AttributeError, match=hook):
            getattr(client._handle, hook).remote(None, None)
