"""Snapshots of job records, and taking jobs back after the supervisor restarted.

A record is written to Ray's KV as a ``JobSnapshot`` on every transition (``snapshot_of``);
a supervisor restarted by Ray reads them back (``record_of``), and ``Recovery.adopt``
hands each live job to a new driver that goes on from where its predecessor stood,
deadline included. Job actors that are nobody's job are killed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..agents.options import WorkerOptions
from ..messages import Cause, JobState
from .attempt import Attempt, AttemptEnd
from .job_driver import GONE, JobDrivers
from .job_handle import JobActorHandle
from .job_table import JobRecord, JobTable
from .store import AttemptEndRecord, JobSnapshot, SupervisorStore, monotonic_to_wall, wall_to_monotonic

logger = logging.getLogger("rayvisor.supervisor")


def snapshot_of(record: JobRecord, attempt_end: AttemptEnd | None = None) -> JobSnapshot:
    """The record as a restarted supervisor needs it. ``attempt_end`` (or a kill's end) is the
    current attempt's end when it is known before the transition that records it."""
    current = record.current
    end = attempt_end or current.kill_end
    return JobSnapshot(
        info=record.info(), spec=record.spec, shutdown_budget=record.shutdown_budget,
        restart_policy=record.restart_policy, attempt=current.number, actor_name=current.actor_name,
        deadline_at=monotonic_to_wall(current.deadline), shutdown_trigger=current.shutdown_trigger,
        restart_times=[monotonic_to_wall(t) for t in record.restart_times],
        agent_identity=record.agent_identity, agent_participant_name=record.agent_participant_name,
        agent_attributes=record.agent_attributes, agent_metadata=record.agent_metadata,
        attempt_end=None if end is None else AttemptEndRecord(
            state=end.state, cause=end.cause, reason=end.reason, error=end.error),
    )


def record_of(snap: JobSnapshot) -> JobRecord:
    """The record a snapshot describes; an attempt ended but not yet recorded keeps its end."""
    info = snap.info
    current = Attempt(number=snap.attempt, actor_name=snap.actor_name, pid=info.pid, node_id=info.node_id,
                      shutdown_trigger=snap.shutdown_trigger, deadline=wall_to_monotonic(snap.deadline_at),
                      participants=list(info.participants), participant_actors=list(info.participant_actors))
    if snap.attempt_end is not None and not info.state.is_terminal:
        end = snap.attempt_end
        current.end_by_kill(AttemptEnd(end.state, end.cause, end.reason, end.error))
    record = JobRecord(
        id=info.id, spec=snap.spec, agent_name=info.agent_name, shutdown_budget=snap.shutdown_budget,
        state=info.state, cause=info.cause, reason=info.reason, error=info.error, restarts=info.restarts,
        timestamps=dict(info.timestamps), restart_policy=snap.restart_policy, attempts=list(info.attempts),
        current=current, agent_identity=snap.agent_identity, agent_participant_name=snap.agent_participant_name,
        agent_attributes=dict(snap.agent_attributes), agent_metadata=snap.agent_metadata)
    record.restart_times.extend(t for t in map(wall_to_monotonic, snap.restart_times) if t is not None)
    return record


class Recovery:
    """Takes a previous incarnation's jobs back (see the module docstring)."""

    def __init__(self, *, store: SupervisorStore, table: JobTable, drivers: JobDrivers, namespace: str,
                 agent_options: Callable[[str], WorkerOptions | None]) -> None:
        self._store = store
        self._table = table
        self._drivers = drivers
        self._namespace = namespace
        self._agent_options = agent_options

    def adopt(self) -> None:
        """Rebuild the table from the snapshots, oldest first, and go on driving every live
        job; then kill the job actors no job owns."""
        snapshots = sorted(self._store.jobs(), key=lambda snap: max(snap.info.timestamps.values(), default=0.0))
        for snap in snapshots:
            try:
                self._adopt(record_of(snap))
            except Exception:  # one bad record must not crash-loop the supervisor
                logger.exception("cannot recover job %s", snap.info.id)
        kill_strays(self._namespace, keep={r.current.actor_name for r in self._table.live() if r.current.actor_name})

    def _adopt(self, record: JobRecord) -> None:
        self._table.restore(record)
        if record.is_terminal:
            return
        if record.state == JobState.PENDING:  # request_fnc's answer was lost with the old process
            self._table.transition(record, JobState.REJECTED, cause=Cause.REJECTED,
                                   reason="the supervisor restarted before the job was admitted")
            return
        current = record.current
        opts = self._agent_options(record.agent_name)
        handle = JobActorHandle.attach(current.actor_name, self._namespace) if current.actor_name else None
        if opts is None:  # its agent could not be loaded: do not run it with another agent's options
            if handle is not None:
                handle.kill()
            self._table.transition(record, JobState.FAILED, cause=Cause.START_FAILED,
                                   error=f"agent {record.agent_name!r} could not be recovered")
            return
        logger.warning("recovering job %s (%s) after a supervisor restart", record.id, record.state.value,
                       extra={"job_id": record.id, "room": record.spec.room})
        driver = self._drivers.add(record, opts)
        # A job still waiting for a start slot had no actor yet: it starts afresh.
        queued = current.actor_name is None and record.state == JobState.STARTING
        driver.start(resume=None if queued else handle or GONE)
        if record.state == JobState.SHUTTING_DOWN and current.deadline is not None:
            # A deadline that passed while no supervisor watched: the job may have finished
            # its shutdown and be holding its outcome; it gets a moment to hand it over.
            current.deadline = max(current.deadline, time.monotonic() + opts.failover_outcome_grace)
            driver.arm_deadline()


def kill_strays(namespace: str, keep: set[str]) -> None:
    """Kill the namespace's job actors that are nobody's job (idle actors of an earlier
    incarnation, leftovers of a supervisor that was removed without stopping its jobs)."""
    for name in JobActorHandle.names(namespace):
        if name not in keep:
            handle = JobActorHandle.attach(name, namespace)
            if handle is not None:
                handle.kill()
