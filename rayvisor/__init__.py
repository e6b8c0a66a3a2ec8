"""rayvisor: LiveKit-Agents-style jobs supervised on a Ray cluster.

Agent side (port a LiveKit agent by changing its imports)::

    from rayvisor import JobContext, WorkerOptions, AutoSubscribe, cli, rtc

Operator side::

    client = rayvisor.serve(opts)            # or rayvisor.connect(address="auto")
    job_id = client.submit(rayvisor.JobSpec(room="support-42", metadata='{"user_id": 7}'))
"""

from livekit import rtc

from . import errors
from .agents import AutoSubscribe, EndWhen, JobContext, JobProcess, JobRequest, LoadInfo, WorkerOptions, WorkerPermissions
from .messages import Cause, JobInfo, JobOrigin, JobSpec, JobState, RestartPolicy, Transition

__version__ = "0.1.0"

__all__ = [
    "AutoSubscribe", "Cause", "Client", "EndWhen", "JobContext", "JobInfo", "JobOrigin", "JobProcess", "JobRequest", "JobSpec",
    "JobState", "LoadInfo", "RestartPolicy", "SupervisorSettings", "Transition", "WorkerOptions", "WorkerPermissions", "cli", "connect", "errors", "local_rooms", "rtc", "serve",
]


_OPERATOR_SIDE = {"Client", "SupervisorSettings", "connect", "local_rooms", "serve"}


def __getattr__(name: str):
    # The operator side (the supervisor, the LiveKit bridge) and ``cli`` load only when asked
    # for: a job's process imports ``rayvisor`` for JobContext and should start fast.
    import importlib

    if name == "cli":
        return importlib.import_module(".cli", __name__)
    if name in _OPERATOR_SIDE:
        return getattr(importlib.import_module(".supervisor", __name__), name)
    raise AttributeError(name)
