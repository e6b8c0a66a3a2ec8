"""livekit-agents' ``JobContext``, run by rayvisor: what LiveKit Agents code finds with
``get_job_context()`` inside a rayvisor job.

Imported only for agents that use livekit-agents (``WorkerOptions.livekit_agents_context``).
``AgentsJobContext`` is both a rayvisor ``JobContext`` and a ``livekit.agents.JobContext``.
rayvisor's side comes first in the method order, so ``connect``, ``shutdown``,
``add_shutdown_callback``, ``delete_room``, ``api``, ``wait_for_participant`` and
``add_participant_entrypoint`` are rayvisor's (the shutdown budget, participant isolation
and supervision hold), and what rayvisor adds (``log_context_fields``, ``proc.userdata``)
stays. The rest is livekit-agents' own: ``primary_session``, ``tagger``,
``session_directory``, ``inference_executor``, ``make_session_report`` ...

The job's ``contextvars`` context holds the current job context and a per-job
``http_context.http_session()``; the job's tasks (entrypoint, in-process participant
entrypoints, shutdown) run in copies of it, and the shutdown protocol closes the session.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

from livekit import agents as lk_agents
from livekit.agents import job as lk_job
from livekit.agents.utils import http_context

from ..errors import LiveKitNotConfigured, NotSupported
from ..rooms.base import PreparesRtcRoom
from .job import JobContext, LiveKitAccess
from .participant import ParticipantContext
from .room import RemoteParticipant

logger = logging.getLogger("rayvisor.job")

DEFAULT_PARTICIPANT_KINDS = lk_job.DEFAULT_PARTICIPANT_KINDS
"""livekit-agents' default kinds for ``wait_for_participant`` (CONNECTOR, SIP, STANDARD)."""


def _inference_executor(namespace: str) -> Any:
    from ..actors.inference import RayInferenceExecutor

    return RayInferenceExecutor(namespace) if namespace else RayInferenceExecutor()


class _LiveKitAgentsSide:
    """What both of rayvisor's contexts need to also be livekit-agents' ``JobContext``."""

    _livekit: LiveKitAccess | None
    _job: Any
    _worker_id: str

    def _become_livekit_agents_context(self, *, accept: lk_job.JobAcceptArguments, inference_executor: Any) -> None:
        """Run livekit-agents' constructor over this context (keeping rayvisor's state) and
        build the job's ``contextvars`` context."""
        ours = {name: getattr(self, name) for name in ("_shutdown_callbacks", "_participant_entrypoints")
                if hasattr(self, name)}
        info = lk_job.RunningJobInfo(
            accept_arguments=accept, job=self._job, url=self._livekit.url if self._livekit else "",
            token=self._livekit.room_token if self._livekit else "", worker_id=self._worker_id, fake_job=False,
        )
        lk_agents.JobContext.__init__(
            self, proc=self._proc, info=info, room=self._room,  # type: ignore[arg-type]
            on_connect=lambda: None, on_shutdown=lambda reason: None, inference_executor=inference_executor,
        )
        for name, value in ours.items():
            setattr(self, name, value)
        self._contextvars = contextvars.copy_context()
        self._contextvars.run(self._install_contextvars)
        self._room._task_context = self._task_context  # room callbacks and stream handlers see the job too

    def _install_contextvars(self) -> None:
        lk_job._JobContextVar.set(self)  # type: ignore[arg-type]
        http_context._new_session_ctx()

    def _task_context(self) -> contextvars.Context:
        return self._contextvars.copy()

    def _participant_available(self, participant: Any) -> None:
        """livekit-agents' own participant-entrypoint runner: rayvisor runs them instead."""

    def token_claims(self) -> Any:
        if not (self._livekit and self._livekit.room_token):
            raise LiveKitNotConfigured("no room token: this job runs on the local room backend")
        return lk_agents.JobContext.token_claims(self)  # type: ignore[arg-type]

    def shutdown(self, reason: str = "user requested") -> None:
        """End the job (livekit-agents' default reason)."""
        super().shutdown(reason)  # type: ignore[misc]

    async def _release(self) -> None:
        """Cancel the tasks livekit-agents tracks (they may use ``ctx.api``), then close
        ``ctx.api``, livekit-agents' per-job state and the HTTP session, each whatever the
        others did (the caller bounds the whole with ``control_call_timeout``)."""
        try:
            pending = [task for task in self._pending_tasks if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        finally:
            try:
                await super()._release()  # type: ignore[misc]
            finally:
                try:
                    await self._on_cleanup()
                finally:
                    await asyncio.get_running_loop().create_task(
                        http_context._close_http_ctx(), context=self._task_context())


class AgentsJobContext(_LiveKitAgentsSide, JobContext, lk_agents.JobContext):
    """The entrypoint's ``ctx`` when the agent uses livekit-agents (see the module docstring).

    On the LiveKit backend ``ctx.room`` is the job's ``rtc.Room`` itself, created when the
    job starts so RoomIO and rayvisor's listeners attach to it before it connects; on the
    local backend it is rayvisor's room facade (text and data, no media).
    """

    def __init__(self, *, inference_executor: Any = None, **kwargs: Any) -> None:
        JobContext.__init__(self, **kwargs)
        self._become_livekit_agents_context(
            accept=lk_job.JobAcceptArguments(
                name=self._participant_name, identity=self._identity, metadata=self._participant_metadata,
                attributes=dict(self._participant_attributes)),
            inference_executor=inference_executor or _inference_executor(self._namespace),
        )
        connection = self._connection
        self._rtc_room = connection.prepare_rtc_room() if isinstance(connection, PreparesRtcRoom) else None
        rtc_info = getattr(self._rtc_room, "_info", None)
        if rtc_info is not None and not rtc_info.name:
            rtc_info.name = self._job.room.name  # ctx.room.name before connecting, as livekit-agents sets it

    @property
    def room(self) -> Any:
        return self._rtc_room if self._rtc_room is not None else self._room

    @property
    def agent(self) -> Any:
        return self.room.local_participant

    @property
    def local_participant_identity(self) -> str:
        return self._identity

    def _as_seen_by_user(self, participant: RemoteParticipant) -> Any:
        if self._rtc_room is None:
            return participant
        return self._rtc_room.remote_participants.get(participant.identity, participant)

    async def wait_for_participant(self, *, identity: str | None = None,
                                   kind: list[int] | int = DEFAULT_PARTICIPANT_KINDS) -> Any:
        """As livekit-agents: connects first if needed, then the first matching participant."""
        if not self._room.isconnected():
            await self.connect()
        participant = await JobContext.wait_for_participant(self, identity=identity, kind=kind)
        return self._as_seen_by_user(participant)

    def add_participant_entrypoint(self, entrypoint_fnc: Any, *_: Any,
                                   kind: list[int] | int = DEFAULT_PARTICIPANT_KINDS) -> None:
        """rayvisor's (isolated in child actors by default), with livekit-agents' default kinds."""
        JobContext.add_participant_entrypoint(self, entrypoint_fnc, kind=kind)

    def delete_room(self, room_name: str | None = None) -> asyncio.Task[None]:  # type: ignore[override]
        """Delete the job's room (awaitable, and a task as in livekit-agents); the job ends
        with ``room_deleted``. Other rooms: use ``ctx.api`` on a LiveKit server."""
        if room_name not in (None, self._job.room.name):
            raise NotSupported(f"delete_room({room_name!r}): a job deletes its own room only; use ctx.api for others")
        task = asyncio.ensure_future(JobContext.delete_room(self))
        self._track_pending_task(task, name="delete_room")
        return task


class AgentsParticipantContext(_LiveKitAgentsSide, ParticipantContext, lk_agents.JobContext):
    """A participant actor's ``ctx`` when the agent uses livekit-agents: ``get_job_context()``
    and ``http_context.http_session()`` work in the child actor too."""

    def __init__(self, *, agent_identity: str = "", inference_executor: Any = None, **kwargs: Any) -> None:
        ParticipantContext.__init__(self, agent_identity=agent_identity, **kwargs)
        self._become_livekit_agents_context(
            accept=lk_job.JobAcceptArguments(name=agent_identity, identity=agent_identity, metadata=""),
            inference_executor=inference_executor or _inference_executor(self._namespace),
        )

    @property
    def local_participant_identity(self) -> str:
        return self._agent_identity

    def add_participant_entrypoint(self, *_: Any, **__: Any) -> None:
        raise NotSupported("participant entrypoints are added by the job's entrypoint, not inside one")

    def delete_room(self, room_name: str | None = None) -> asyncio.Task[None]:  # type: ignore[override]
        """Delete the job's room through the job's connection; the job ends with ``room_deleted``."""
        if room_name not in (None, self._job.room.name):
            raise NotSupported(f"delete_room({room_name!r}): a job deletes its own room only")
        task = asyncio.ensure_future(self._room._delete())
        self._track_pending_task(task, name="delete_room")
        return task
