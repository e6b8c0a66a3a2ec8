"""The restart decision, without Ray: restart types, what no policy undoes, and intensity."""

from __future__ import annotations

from collections import deque

import pytest

from rayvisor import Cause, JobState, RestartPolicy
from rayvisor.supervisor.restart_policy import EndedAttempt, restart_decision

WINDOW = 60.0
NOW = 1_000.0


def decide(policy: RestartPolicy, ended: EndedAttempt, *, admitting: bool = True,
           restart_times: deque[float] | None = None, max_restarts: int = 3) -> Cause | None:
    return restart_decision(policy, ended, admitting=admitting, restart_times=restart_times or deque(), now=NOW,
                            restart_window=WINDOW, max_restarts=max_restarts)


CRASHED = EndedAttempt(state=JobState.FAILED, cause=Cause.ACTOR_CRASHED)
SUCCEEDED = EndedAttempt(state=JobState.SUCCEEDED, cause=Cause.ROOM_EMPTY)


@pytest.mark.parametrize("policy, ended, expected", [
    (RestartPolicy.TEMPORARY, CRASHED, None),
    (RestartPolicy.TRANSIENT, CRASHED, Cause.ACTOR_CRASHED),
    (RestartPolicy.TRANSIENT, SUCCEEDED, None),
    (RestartPolicy.PERMANENT, SUCCEEDED, Cause.ROOM_EMPTY),
    (RestartPolicy.PERMANENT, EndedAttempt(state=JobState.REJECTED, cause=Cause.REJECTED), None),
])
def test_restart_types(policy: RestartPolicy, ended: EndedAttempt, expected: Cause | None) -> None:
    assert decide(policy, ended) == expected


@pytest.mark.parametrize("cause", [Cause.USER_SHUTDOWN, Cause.ROOM_DELETED, Cause.SUPERVISOR_STOPPED, Cause.DRAINED,
                                   Cause.TERMINATED])
def test_explicit_ends_are_never_undone(cause: Cause) -> None:
    assert decide(RestartPolicy.PERMANENT, EndedAttempt(state=JobState.SUCCEEDED, cause=cause)) is None
    # nor when the explicit request started a shutdown that then ended otherwise
    assert decide(RestartPolicy.PERMANENT, EndedAttempt(state=JobState.KILLED, cause=Cause.SHUTDOWN_TIMEOUT,
                                                        trigger=cause)) is None


def test_what_started_the_shutdown_decides_for_transient_jobs() -> None:
    sick = EndedAttempt(state=JobState.KILLED, cause=Cause.SHUTDOWN_TIMEOUT, trigger=Cause.MEMORY_LIMIT)
    assert decide(RestartPolicy.TRANSIENT, sick) == Cause.SHUTDOWN_TIMEOUT


def test_a_draining_supervisor_restarts_nothing() -> None:
    assert decide(RestartPolicy.PERMANENT, CRASHED, admitting=False) is None


def test_intensity_counts_restarts_within_the_window_only() -> None:
    recent = deque([NOW - WINDOW - 1, NOW - 10, NOW - 5])
    assert decide(RestartPolicy.TRANSIENT, CRASHED, restart_times=recent, max_restarts=3) == Cause.ACTOR_CRASHED
    assert list(recent) == [NOW - 10, NOW - 5]  # the one outside the window was forgotten
    full = deque([NOW - 30, NOW - 20, NOW - 10])
    assert decide(RestartPolicy.TRANSIENT, CRASHED, restart_times=full, max_restarts=3) == Cause.RESTART_LIMIT


@pytest.mark.parametrize("policy", list(RestartPolicy))
@pytest.mark.parametrize("trigger", [None, Cause.USER_SHUTDOWN, Cause.MEMORY_LIMIT])
def test_node_lost_is_decided_as_actor_crashed_is(policy: RestartPolicy, trigger: Cause | None) -> None:
    """A crash is recorded ``actor_crashed`` at once and may be corrected to ``node_lost`` once
    Ray's verdict arrives; the restart decided at first must be the one the verdict implies."""
    def ended(cause: Cause) -> EndedAttempt:
        return EndedAttempt(state=JobState.FAILED, cause=cause, trigger=trigger)

    def kind(decision: Cause | None) -> str:
        return "end" if decision is None else "limit" if decision is Cause.RESTART_LIMIT else "restart"

    for times in (deque(), deque([NOW - 1.0] * 3)):
        assert kind(decide(policy, ended(Cause.NODE_LOST), restart_times=deque(times))) == \
            kind(decide(policy, ended(Cause.ACTOR_CRASHED), restart_times=deque(times)))
