"""Whether a job's ended attempt is followed by another: the restart decision, as data in,
a cause out, so it is tested without Ray (supervisor trees' restart types and intensity)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..messages import Cause, JobState, RestartPolicy

EXPLICIT_ENDS = frozenset({Cause.USER_SHUTDOWN, Cause.ROOM_DELETED, Cause.SUPERVISOR_STOPPED, Cause.DRAINED,
                           Cause.TERMINATED})
"""Ends that no restart policy undoes."""
ABNORMAL_ENDS = frozenset({Cause.ACTOR_CRASHED, Cause.ENTRYPOINT_ERROR, Cause.UNRESPONSIVE, Cause.MEMORY_LIMIT,
                           Cause.NODE_LOST, Cause.CONNECT_FAILED})
"""Ends after which a ``transient`` job is restarted."""


@dataclass(frozen=True)
class EndedAttempt:
    """What the decision needs to know of an attempt that ended."""

    state: JobState
    cause: Cause
    trigger: Cause | None = None
    """What started its shutdown, if one was started (it outranks how the attempt ended)."""


def restart_decision(policy: RestartPolicy, ended: EndedAttempt, *, admitting: bool, restart_times: deque[float],
                     now: float, restart_window: float, max_restarts: int) -> Cause | None:
    """None: the job ends here. ``RESTART_LIMIT``: it would restart but the intensity is
    spent (``max_restarts`` within ``restart_window`` seconds). Anything else: restart, for
    that cause. ``restart_times`` (monotonic) is trimmed to the window in place."""
    if ended.state == JobState.REJECTED:
        return None
    explicit = ended.cause in EXPLICIT_ENDS or ended.trigger in EXPLICIT_ENDS
    if policy is RestartPolicy.TEMPORARY or explicit or not admitting:
        return None
    if policy is RestartPolicy.TRANSIENT and (ended.trigger or ended.cause) not in ABNORMAL_ENDS:
        return None
    while restart_times and restart_times[0] < now - restart_window:
        restart_times.popleft()
    if len(restart_times) >= max_restarts:
        return Cause.RESTART_LIMIT
    return ended.cause
