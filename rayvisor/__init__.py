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
from .supervisor import Client, connect, local_rooms, serve

__version__ = "0.1.0"

__all__ = [
    "AutoSubscribe", "Cause", "Client", "EndWhen", "JobContext", "JobInfo", "JobOrigin", "JobProcess", "JobRequest", "JobSpec",
    "JobState", "LoadInfo", "RestartPolicy", "Transition", "WorkerOptions", "WorkerPermissions", "cli", "connect", "errors", "local_rooms", "rtc", "serve",
]


def __getattr__(name: str):
    # ``cli`` imports click and the logging setup; load it only when asked for.
    if name == "cli":
        import importlib

        return importlib.import_module(".cli", __name__)
    raise AttributeError(name)
