"""Bad input gets a typed error from rayvisor.errors and changes nothing that runs."""

from __future__ import annotations

import msgpack
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import job_actor_of

import rayvisor
from rayvisor import JobContext, JobSpec, JobState, WorkerOptions
from rayvisor.errors import (
    InvalidAgent,
    InvalidJobSpec,
    InvalidRoomRequest,
    JobNotFound,
    MessageError,
    MetadataTooLarge,
    RoomNotFound,
    UnknownAgent,
    UnsupportedVersion,
)
from rayvisor.messages import ErrorRecord, JobIdRequest, JobInfo, decode, decode_reply, encode
from rayvisor.supervisor.supervisor import SUPERVISOR_NAME


async def echo(ctx: JobContext) -> None:
    async def on_chat(reader, sender: str) -> None:
        await ctx.room.local_participant.send_text(await reader.read_all(), topic="echo")

    ctx.room.register_text_stream_handler("chat", on_chat)
    await ctx.connect()
    await ctx.room.local_participant.send_text("up", topic="hello")


def sync_entrypoint(ctx):  # not async: rejected when the options are built
    return None


@pytest.fixture
def running(serve, rooms):
    """A supervisor with one running job, to check that bad input leaves it alone."""
    client = serve(echo, max_metadata_bytes=1024)
    user = rooms.join("steady", "user")
    job_id = client.submit(room="steady")
    user.wait_for_messages(1, topic="hello", timeout=20)
    yield client, user, job_id
    assert client.status(job_id).state == JobState.RUNNING
    user.send_text("still fine", topic="chat")
    assert user.wait_for_messages(1, topic="echo", timeout=10)[0][2] == "still fine"


@pytest.mark.parametrize("fields", [
    {"room": ""},
    {"room": "r" * 257},
    {"room": 42},
    {"room": "ok", "metadata": 7},
    {"room": "ok", "metadata": {"user_id": 7}},
    {"room": "ok", "unexpected": True},
])
def test_malformed_job_specs_are_rejected_before_they_reach_the_supervisor(fields):
    with pytest.raises(InvalidJobSpec):
        JobSpec(**fields)


def test_metadata_over_the_configured_limit_is_rejected(running):
    client, _user, _job = running
    with pytest.raises(MetadataTooLarge, match="max_metadata_bytes=1024"):
        client.submit(room="big", metadata="x" * 1025)
    assert [j.room for j in client.list()] == ["steady"]


def test_unknown_agent_name_is_rejected(running):
    client, _user, _job = running
    with pytest.raises(UnknownAgent, match="no agent named 'nobody'"):
        client.submit(room="r", agent_name="nobody")


def test_status_of_an_unknown_job_is_a_typed_error(running):
    client, _user, _job = running
    with pytest.raises(JobNotFound):
        client.status("RJ_does_not_exist")


def test_entrypoint_that_is_not_async_is_rejected_when_options_are_built():
    with pytest.raises(InvalidAgent, match="async def"):
        WorkerOptions(entrypoint_fnc=sync_entrypoint)
    for budget in (0, -1, float("nan"), float("inf")):
        with pytest.raises(InvalidAgent, match="shutdown_process_timeout"):
            WorkerOptions(entrypoint_fnc=echo, shutdown_process_timeout=budget)
    with pytest.raises(InvalidAgent, match="job_resources"):
        WorkerOptions(entrypoint_fnc=echo, job_resources={"GPU": float("nan")})


def test_client_arguments_of_the_wrong_type_are_typed_errors(running):
    client, user, job_id = running
    with pytest.raises(MessageError):
        client.wait(job_id, timeout=-1)
    with pytest.raises(MessageError):
        client.status(5)
    with pytest.raises(MessageError):
        client.events(after_seq=-5)
    with pytest.raises(InvalidRoomRequest):
        user.set_attributes({"user.language": 1})
    with pytest.raises(InvalidJobSpec):
        JobSpec(room="r", metadata="\ud800")


@pytest.mark.parametrize("payload,error", [
    (b"\xff\x00garbage", MessageError),
    (b"", MessageError),
    (msgpack.packb([1, 2, 3]), MessageError),
    (msgpack.packb({"v": 99, "type": "JobSpec", "body": {"room": "r"}}), UnsupportedVersion),
    (msgpack.packb({"v": 1, "type": "NoSuchRecord", "body": {}}), MessageError),
    (msgpack.packb({"v": 1, "type": "JobSpec", "body": {"room": ["not", "a", "string"]}}), InvalidJobSpec),
    ("not even bytes", MessageError),
])
def test_garbage_on_the_supervisor_wire_gets_a_typed_error_record(running, namespace, payload, error):
    supervisor = ray.get_actor(SUPERVISOR_NAME, namespace=namespace)
    with pytest.raises(error):
        decode_reply(ray.get(supervisor.submit.remote(payload), timeout=10), JobInfo)
    for method in (supervisor.report_shutdown_started, supervisor.status):  # a JobSpec is the wrong record here
        with pytest.raises(MessageError):
            decode_reply(ray.get(method.remote(payload), timeout=10), JobInfo)


def test_garbage_to_the_local_room_server_gets_a_typed_error(running, rooms):
    _client, user, _job = running
    reply = ray.get(rooms._server.send.remote(b"\x00\x01junk"), timeout=10)
    assert isinstance(decode(reply, ErrorRecord), ErrorRecord)
    with pytest.raises(InvalidRoomRequest, match="max_payload_bytes"):
        user.send_text("x" * (64 * 1024 + 1), topic="chat")
    with pytest.raises(RoomNotFound):
        rooms.participants("no-such-room")


def test_decoder_rejects_oversized_and_wrongly_typed_records():
    with pytest.raises(MessageError):
        decode(b"\x00" * (17 * 1024 * 1024), JobInfo)
    with pytest.raises(MessageError, match="unexpected message type 'JobSpec'"):
        decode(encode(JobSpec(room="r")), JobInfo)


def test_connect_without_a_supervisor_is_a_typed_error(namespace):
    with pytest.raises(rayvisor.errors.SupervisorNotFound):
        rayvisor.connect(namespace=namespace + "-nobody-here")


# --------------------------------------------------------------------------- fuzzing the live wires

_ENVELOPES = [encode(JobSpec(room="fuzz", metadata="m")), encode(JobIdRequest(job_id="RJ_fuzz")),
              msgpack.packb({"v": 1, "type": "ParticipantRef", "body": {"room": "steady", "identity": "ghost"}})]


@st.composite
def wire_payloads(draw) -> bytes:
    """Random bytes, random msgpack values, and valid envelopes truncated or with bytes flipped."""
    kind = draw(st.sampled_from(["bytes", "msgpack", "mutated", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind == "msgpack":
        value = draw(st.recursive(
            st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
            | st.binary(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
            max_leaves=12))
        return msgpack.packb(value, use_bin_type=True)
    envelope = bytearray(draw(st.sampled_from(_ENVELOPES)))
    if kind == "truncated":
        return bytes(envelope[:draw(st.integers(0, len(envelope) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        envelope[draw(st.integers(0, len(envelope) - 1))] = draw(st.integers(0, 255))
    return bytes(envelope)


FUZZED_SUPERVISOR_METHODS = ("submit", "status", "list_jobs", "shutdown", "metrics", "worker_status",
                             "report_shutdown_started", "report_participants", "report_memory")
"""Every supervisor endpoint that answers at once and whose valid form cannot stop everything
(``stop``/``drain`` would, ``wait``/``events`` long-poll)."""
FUZZED_ROOM_METHODS = ("join", "leave", "send", "set_attributes", "describe", "participants", "rooms")


def assert_typed_answer(reply: bytes) -> None:
    """An answer is a well-formed envelope: a record, or a typed error that is not a crash."""
    envelope = msgpack.unpackb(reply, raw=False)
    if envelope["type"] == "ErrorRecord":
        assert envelope["body"]["code"] != "internal_error", envelope["body"]["message"]


def test_random_bytes_on_every_wire_get_typed_answers_and_the_running_job_is_untouched(running, namespace):
    from rayvisor.rooms.local import ROOM_SERVER_NAME

    client, _user, job_id = running
    supervisor = ray.get_actor(SUPERVISOR_NAME, namespace=namespace)
    room_server = ray.get_actor(ROOM_SERVER_NAME, namespace=namespace)
    job_actor = job_actor_of(client.status(job_id).pid, namespace)
    tried = []

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(payload=wire_payloads())
    def every_wire(payload: bytes) -> None:
        calls = [getattr(supervisor, m).remote(payload) for m in FUZZED_SUPERVISOR_METHODS]
        calls += [getattr(room_server, m).remote(payload) for m in FUZZED_ROOM_METHODS]
        calls.append(job_actor.relay.remote(payload))
        for reply in ray.get(calls, timeout=30):  # a handler that raised would be a RayTaskError here
            assert_typed_answer(reply)
        tried.append(payload)

    every_wire()

    assert len(tried) == 300
    assert client.status(job_id).state == JobState.RUNNING  # and the fixture checks it still echoes
