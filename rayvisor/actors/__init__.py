"""What runs per job: the job actor."""

from .job_actor import JobActor, JobRunner

__all__ = ["JobActor", "JobRunner"]
