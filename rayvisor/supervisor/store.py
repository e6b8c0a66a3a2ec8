"""What the supervisor keeps outside its own process, so a restarted supervisor can go on.

Job records are msgpack ``JobSnapshot``s in Ray's internal KV (in the GCS), written on
every transition. Agents (``WorkerOptions`` hold functions, so they are code, not
control-plane messages) are kept cloudpickled beside them, as Ray keeps actor classes.
"""

from __future__ import annotations

import logging
import time


from pydantic import Field
from ray import cloudpickle
from ray.experimental import internal_kv

from ..agents.options import WorkerOptions
from ..messages import Cause, JobInfo, JobSpec, JobState, Record, RestartPolicy, decode, encode, register

logger = logging.getLogger("rayvisor.supervisor")

JOB_PREFIX = b"job:"
AGENT_PREFIX = b"agent:"
BRIDGE_PREFIX = b"bridge:"


class AttemptEndRecord(Record):
    """An attempt's end as the supervisor decided it (``AttemptEnd`` on the wire)."""

    state: JobState = Field(strict=False)
    cause: Cause = Field(strict=False)
    reason: str = ""
    error: str | None = None


@register
class JobSnapshot(Record):
    """Everything a restarted supervisor needs to take a job back."""

    info: JobInfo
    spec: JobSpec
    shutdown_budget: float
    restart_policy: RestartPolicy = Field(strict=False)
    attempt: int
    actor_name: str | None = None
    deadline_at: float | None = None
    """Wall-clock time at which a SHUTTING_DOWN job is killed."""
    shutdown_trigger: Cause | None = Field(default=None, strict=False)
    restart_times: list[float] = []
    """Wall-clock times of recent restarts (for the restart intensity)."""
    agent_identity: str = ""
    agent_participant_name: str = ""
    agent_attributes: dict[str, str] = {}
    agent_metadata: str = ""
    attempt_end: AttemptEndRecord | None = None
    """How the current attempt ended, written before the supervisor kills its actor (a kill,
    or an outcome collected): a successor that finds the actor gone knows why."""


class SupervisorStore:
    """Ray internal KV, under a namespace of its own per rayvisor namespace."""

    def __init__(self, namespace: str) -> None:
        self._ns = f"rayvisor-{namespace}"  # Ray splits KV namespaces on ":"

    def put_job(self, snapshot: JobSnapshot) -> None:
        internal_kv._internal_kv_put(JOB_PREFIX + snapshot.info.id.encode(), encode(snapshot),
                                     overwrite=True, namespace=self._ns)

    def delete_job(self, job_id: str) -> None:
        internal_kv._internal_kv_del(JOB_PREFIX + job_id.encode(), namespace=self._ns)

    def job_count(self) -> int:
        return len(internal_kv._internal_kv_list(JOB_PREFIX, namespace=self._ns))

    def jobs(self) -> list[JobSnapshot]:
        snapshots = []
        for key in internal_kv._internal_kv_list(JOB_PREFIX, namespace=self._ns):
            data = internal_kv._internal_kv_get(key, namespace=self._ns)
            if data is None:
                continue
            try:
                snapshots.append(decode(data, JobSnapshot))
            except Exception as err:  # one bad record must not stop the recovery of the others
                logger.error("dropping unreadable job snapshot %r: %s", key, err)
        return snapshots

    def put_agent(self, opts: WorkerOptions) -> None:
        internal_kv._internal_kv_put(AGENT_PREFIX + opts.agent_name.encode(), cloudpickle.dumps(opts),
                                     overwrite=True, namespace=self._ns)

    def agents(self) -> list[WorkerOptions]:
        found = []
        for key in internal_kv._internal_kv_list(AGENT_PREFIX, namespace=self._ns):
            data = internal_kv._internal_kv_get(key, namespace=self._ns)
            try:
                found.append(cloudpickle.loads(data))
            except Exception as err:
                logger.error("cannot load agent %r: %s", key, err)
        return found

    def put_bridge(self, agent_name: str) -> None:
        """Remember that ``agent_name`` is registered with LiveKit (a restarted supervisor registers again)."""
        internal_kv._internal_kv_put(BRIDGE_PREFIX + agent_name.encode(), b"1", overwrite=True, namespace=self._ns)

    def bridges(self) -> list[str]:
        return [key[len(BRIDGE_PREFIX):].decode() for key in internal_kv._internal_kv_list(BRIDGE_PREFIX, namespace=self._ns)]

    def clear(self) -> None:
        for prefix in (JOB_PREFIX, AGENT_PREFIX, BRIDGE_PREFIX):
            for key in internal_kv._internal_kv_list(prefix, namespace=self._ns):
                internal_kv._internal_kv_del(key, namespace=self._ns)


def wall_to_monotonic(wall: float | None) -> float | None:
    return None if wall is None else time.monotonic() + (wall - time.time())


def monotonic_to_wall(mono: float | None) -> float | None:
    return None if mono is None else time.time() + (mono - time.monotonic())


