"""Every error rayvisor raises to its callers.

Errors cross process boundaries as ``ErrorRecord`` messages (code + message) and are
re-raised on the caller's side as these types, never as ``ray.exceptions.RayTaskError``.
"""

from __future__ import annotations


class RayvisorError(Exception):
    """Base of every rayvisor error. ``code`` names the error on the wire."""

    code = "rayvisor_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidJobSpec(RayvisorError, ValueError):
    """A job spec failed validation (room name, metadata, agent name ...)."""

    code = "invalid_job_spec"


class MetadataTooLarge(InvalidJobSpec):
    """Job metadata is larger than the supervisor's ``max_metadata_bytes``."""

    code = "metadata_too_large"


class InvalidMetadata(InvalidJobSpec):
    """Metadata that must be JSON (CLI ``--metadata``) is not valid JSON."""

    code = "invalid_metadata"


class UnknownAgent(RayvisorError, LookupError):
    """No agent with the requested ``agent_name`` is registered with the supervisor."""

    code = "unknown_agent"


class InvalidAgent(RayvisorError, TypeError):
    """``WorkerOptions`` describe an agent that cannot run (e.g. a sync entrypoint)."""

    code = "invalid_agent"


class DuplicateEntrypoint(RayvisorError, ValueError):
    """The same participant entrypoint function was added twice to a job."""

    code = "duplicate_entrypoint"


class AgentLoadError(RayvisorError, ImportError):
    """An agent file or import path could not be loaded."""

    code = "agent_load_error"


class JobNotFound(RayvisorError, KeyError):
    """No job with this id is known to the supervisor."""

    code = "job_not_found"


class MessageError(RayvisorError, ValueError):
    """A control-plane message is malformed: not msgpack, wrong shape or wrong types."""

    code = "malformed_message"


class UnsupportedVersion(MessageError):
    """A control-plane message carries a protocol version this build does not speak."""

    code = "unsupported_version"


class WaitTimeout(RayvisorError, TimeoutError):
    """A bounded wait (``client.wait``, ``wait_for_messages``) ran out of time."""

    code = "wait_timeout"


class SupervisorNotFound(RayvisorError, LookupError):
    """No supervisor is running in the namespace; start one with ``rayvisor.serve``."""

    code = "supervisor_not_found"


class SupervisorUnavailable(RayvisorError, ConnectionError):
    """The supervisor did not answer within ``call_timeout``."""

    code = "supervisor_unavailable"


class Draining(RayvisorError, RuntimeError):
    """The supervisor is stopping (or draining) and admits no new jobs."""

    code = "draining"


class AtCapacity(RayvisorError, RuntimeError):
    """Admitting the job would exceed capacity (``max_jobs``, load, or Ray resources)."""

    code = "at_capacity"


class JobRejected(RayvisorError, RuntimeError):
    """``request_fnc`` rejected the job (or neither accepted nor rejected it in time)."""

    code = "job_rejected"


class InternalError(RayvisorError, RuntimeError):
    """An unexpected failure inside rayvisor; the message carries the original error."""

    code = "internal_error"


class RoomError(RayvisorError):
    """A room operation failed."""

    code = "room_error"


class InvalidRoomRequest(RoomError, ValueError):
    """A room request is malformed (empty identity, oversized payload, bad attributes)."""

    code = "invalid_room_request"


class RoomNotFound(RoomError, LookupError):
    """The room does not exist (never created, or deleted)."""

    code = "room_not_found"


class ParticipantNotFound(RoomError, LookupError):
    """The participant is not (or no longer) in the room."""

    code = "participant_not_found"


class RoomUnavailable(RoomError, ConnectionError):
    """The room backend did not answer in time or is gone."""

    code = "room_unavailable"


class NotConnected(RoomError, RuntimeError):
    """The job's room is not connected; call ``await ctx.connect()`` first."""

    code = "not_connected"


class NotSupported(RoomError, NotImplementedError):
    """The room backend cannot do this (e.g. media on the local backend, which has none)."""

    code = "not_supported"


class LiveKitNotConfigured(RayvisorError, RuntimeError):
    """A LiveKit-only feature was used while the job runs on the local room backend."""

    code = "livekit_not_configured"


class ConnectFailed(RoomError, ConnectionError):
    """``ctx.connect()`` could not join the room (bad url or token, server unreachable,
    or no answer within ``room_connect_timeout``); the job ends with cause ``connect_failed``."""

    code = "connect_failed"


class DuplicateJob(InvalidJobSpec):
    """A job id given in a ``JobSpec`` is already used by a job for another room or agent."""

    code = "duplicate_job"


class WorkerRegistrationError(RayvisorError, ConnectionError):
    """The LiveKit server refused or dropped the worker registration (see the message)."""

    code = "worker_registration_error"


class InferenceError(RayvisorError, RuntimeError):
    """``ctx.inference_executor.do_inference`` failed: the runner raised, returned something
    that is not bytes, or failed to initialize (a ``RuntimeError``, as in LiveKit Agents)."""

    code = "inference_error"


class UnknownInferenceMethod(InferenceError, LookupError):
    """No inference runner is registered for the requested method (neither on the node's
    inference actor nor in the calling job's ``_InferenceRunner.registered_runners``)."""

    code = "unknown_inference_method"


class InferenceTimeout(InferenceError, TimeoutError):
    """The node's inference actor did not answer within ``call_timeout`` (or did not
    finish initializing its runners within ``initialize_timeout``)."""

    code = "inference_timeout"


class InferenceUnavailable(InferenceError, ConnectionError):
    """The node's inference actor died and could not be found or re-created in one retry."""

    code = "inference_unavailable"


class HealthServerError(RayvisorError, OSError):
    """``rayvisor dev``/``start`` could not serve its HTTP health endpoint on the configured
    host and port (the port is taken, the host is not this machine's, ...)."""

    code = "health_server_error"


_BY_CODE: dict[str, type[RayvisorError]] = {}


def _register(cls: type[RayvisorError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(RayvisorError)


def error_from_code(code: str, message: str) -> RayvisorError:
    """Rebuild the typed error named by ``code`` (unknown codes become ``RayvisorError``)."""
    return _BY_CODE.get(code, RayvisorError)(message)
