"""Properties of rayvisor's pure parts, checked with hypothesis: no Ray is started or needed.

What crosses the control plane (``JobSpec`` and every other record, the msgpack envelope and
its decoder), the job tokens the supervisor mints, and ``WorkerOptions`` validation: whatever
a caller or the wire hands them, the answer is a valid value or a typed ``rayvisor.errors``
error, never another exception.

Runs are repeatable (``derandomize``: the same examples every run, in CI too). For a longer
fuzzing session multiply every example budget: ``RAYVISOR_PROPERTY_SCALE=20 pytest ...``.
This file uses no conftest fixture, so it also runs alone:
``python -m pytest -q -p no:cacheprovider --noconftest tests/test_properties.py``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import importlib
import math
import operator
import os
import re
import string
import types
import typing

import jwt
import msgpack
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from livekit.api import TokenVerifier

importlib.import_module("rayvisor.actors.records")  # registers the job actor's records
import rayvisor.rooms.records as room_records
importlib.import_module("rayvisor.supervisor.store")  # registers JobSnapshot
from rayvisor import errors
from rayvisor.agents.options import MAX_TOKEN_TTL, WorkerOptions, WorkerPermissions
from rayvisor.errors import (
    InvalidAgent,
    InvalidJobSpec,
    MessageError,
    RayvisorError,
    UnsupportedVersion,
)
from rayvisor.messages import (
    _REGISTRY,
    MAX_JOB_ID_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_ROOM_NAME_CHARS,
    MAX_TOKEN_CHARS,
    PROTOCOL_VERSION,
    Ack,
    Cause,
    ErrorRecord,
    EventsRequest,
    JobInfo,
    JobOrigin,
    JobSpec,
    JobState,
    Record,
    RestartPolicy,
    ShutdownJobRequest,
    Transition,
    WaitRequest,
    decode,
    decode_reply,
    encode,
)
from rayvisor.supervisor.credentials import AGENT_KIND, LiveKitCredentials

# --------------------------------------------------------------------------- settings

settings.register_profile(
    "rayvisor-properties",  # registered for this module's tests only; never loaded globally
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
_SCALE = max(1, int(os.environ.get("RAYVISOR_PROPERTY_SCALE", "1")))
_BASE = settings.get_profile("rayvisor-properties")


def examples(n: int) -> settings:
    return settings(_BASE, max_examples=n * _SCALE)


MANY = examples(300)
"""Cheap pure properties (a few draws per example)."""
SOME = examples(200)
"""Properties that draw whole records or hostile field dicts per example."""
FEW = examples(100)
"""JWT signing and verification."""

# --------------------------------------------------------------------------- strategies

RECORD_TYPES: list[type[Record]] = [_REGISTRY[name] for name in sorted(_REGISTRY)]
TYPED_DECODE_ERRORS = (MessageError, *{cls.invalid_error for cls in RECORD_TYPES})
"""What ``decode`` may raise: a malformed message, or a record type's own validation error."""
MSGPACK_INTS = {"min_value": -(2**63), "max_value": 2**64 - 1}
JOB_ID_PATTERN = JobSpec.model_fields["job_id"].metadata[-1].pattern

CHARS = st.characters(exclude_categories=("Cs",))
"""Any code point UTF-8 can carry (no lone surrogates). Cheaper to set up than ``codec="utf-8"``."""
JOB_ID_CHARS = string.ascii_letters + string.digits + "_.-"
WIDE_CHARS = ["a", "\x00", "\n", "é", "€", "\u2028", "😀"]
"""One to four UTF-8 bytes each: a length limit counts characters, not bytes."""
ANY_CHARS = st.characters()
"""Any code point, lone surrogates included."""


def texts(min_size: int = 0, max_size: int | None = None) -> st.SearchStrategy[str]:
    """Valid text (no lone surrogates) of ``min_size``..``max_size`` characters: short
    strings of any characters, or long runs up to and at the length limits."""
    upper = 1000 if max_size is None else max_size
    short = st.text(CHARS, min_size=min_size, max_size=min(upper, 16))
    lengths = st.sampled_from(sorted({min_size, upper})) | st.integers(min_size, upper)
    long = st.builds(operator.mul, st.sampled_from(WIDE_CHARS), lengths)
    return short | long


def with_lone_surrogate(text: str, surrogate: str) -> str:
    return text + surrogate


lone_surrogate_texts = st.builds(with_lone_surrogate, st.text(CHARS, max_size=8),
                                 st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
room_names = texts(1, MAX_ROOM_NAME_CHARS)
job_ids = st.text(JOB_ID_CHARS, min_size=1, max_size=MAX_JOB_ID_CHARS)
msgpack_ints = st.integers(**MSGPACK_INTS)
wall_clock = st.floats(allow_nan=False)
timeouts = st.floats(min_value=0, allow_nan=False)


def optional(strategy: st.SearchStrategy[typing.Any]) -> st.SearchStrategy[typing.Any]:
    return st.none() | strategy


job_specs = st.builds(
    JobSpec,
    room=room_names,
    metadata=texts(),
    agent_name=optional(texts()),
    dispatch_id=texts(),
    restart=optional(st.sampled_from(RestartPolicy)),
    job_id=optional(job_ids),
    url=texts(0, 2048),
    token=texts(0, MAX_TOKEN_CHARS),
    origin=st.sampled_from(JobOrigin),
)
transitions = st.builds(
    Transition,
    seq=msgpack_ints, job_id=texts(), state=st.sampled_from(JobState), room=room_names, at=wall_clock,
    cause=optional(st.sampled_from(Cause)), reason=texts(), error=optional(texts()),
    node_id=optional(texts()), pid=optional(msgpack_ints),
)
shutdown_job_requests = st.builds(ShutdownJobRequest, job_id=texts(), reason=texts())
wait_requests = st.builds(WaitRequest, job_id=texts(), timeout=timeouts)
events_requests = st.builds(EventsRequest, after_seq=st.integers(-1, MSGPACK_INTS["max_value"]), timeout=timeouts)


# Every registered record type, built from its pydantic fields (so a new record type is
# covered without touching this file; an annotation this builder does not know fails loudly).

FIELD_OVERRIDES: dict[tuple[str, str], st.SearchStrategy[typing.Any]] = {
    ("ParticipantInfo", "kind"): st.sampled_from(sorted(room_records._KINDS)),
    ("JobInfo", "timestamps"): st.dictionaries(st.sampled_from([s.value for s in JobState]), wall_clock),
}


def _constraint(metadata: typing.Iterable[typing.Any], name: str) -> typing.Any:
    for item in metadata:
        value = getattr(item, name, None)
        if value is not None:
            return value
    return None


def values_of(annotation: typing.Any, metadata: typing.Sequence[typing.Any] = ()) -> st.SearchStrategy[typing.Any]:
    """Valid values of one field's annotation (honouring min/max length, pattern and ``ge``)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        return st.one_of(*(values_of(arg, metadata) for arg in args))
    if annotation is type(None):
        return st.none()
    if typing.get_origin(annotation) is list:
        return st.lists(values_of(args[0]), max_size=3)
    if typing.get_origin(annotation) is dict:
        return st.dictionaries(values_of(args[0]), values_of(args[1]), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return st.sampled_from(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Record):
        return st.deferred(lambda: records(annotation))
    ge = _constraint(metadata, "ge")
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(min_value=max(ge, MSGPACK_INTS["min_value"]) if ge is not None else MSGPACK_INTS["min_value"],
                           max_value=MSGPACK_INTS["max_value"])
    if annotation is float:
        return st.floats(min_value=ge, allow_nan=False)
    if annotation is bytes:
        return st.binary(max_size=64)
    if annotation is str:
        low, high = _constraint(metadata, "min_length") or 0, _constraint(metadata, "max_length")
        pattern = _constraint(metadata, "pattern")
        if pattern == JOB_ID_PATTERN:
            return st.text(JOB_ID_CHARS, min_size=max(low, 1), max_size=high)
        if pattern is not None:
            return st.from_regex(pattern, fullmatch=True).filter(lambda s: low <= len(s) <= (high or math.inf))
        return texts(low, high)
    raise NotImplementedError(f"no strategy for {annotation!r}: teach tests/test_properties.py values_of()")


@functools.cache
def records(cls: type[Record]) -> st.SearchStrategy[Record]:
    """Valid instances of ``cls``; optional fields are sometimes left at their defaults."""
    required, optional_fields = {}, {}
    for name, info in cls.model_fields.items():
        key = (cls.__name__, name)
        strategy = FIELD_OVERRIDES[key] if key in FIELD_OVERRIDES else values_of(info.annotation, info.metadata)
        (required if info.is_required() else optional_fields)[name] = strategy
    return st.fixed_dictionaries(required, optional=optional_fields).map(cls.model_validate)


# One hand-made instance per registered type, every optional field filled ("full") or left at
# its default ("minimal"): deterministic seeds for the truncation and mutation properties.

SAMPLE_OVERRIDES: dict[tuple[str, str], typing.Any] = {
    ("ParticipantInfo", "kind"): 1,
    ("JobInfo", "timestamps"): {"PENDING": 1.5, "RUNNING": 2.25},
}


def sample_value(annotation: typing.Any, metadata: typing.Sequence[typing.Any], full: bool) -> typing.Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        return sample_value(next(arg for arg in args if arg is not type(None)), metadata, full)
    if typing.get_origin(annotation) is list:
        return [sample_value(args[0], (), full)] if full else []
    if typing.get_origin(annotation) is dict:
        return {"key é": sample_value(args[1], (), full)} if full else {}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return list(annotation)[-1 if full else 0]
    if isinstance(annotation, type) and issubclass(annotation, Record):
        return sample_of(annotation, full)
    ge = _constraint(metadata, "ge")
    if annotation is bool:
        return full
    if annotation is int:
        return MSGPACK_INTS["max_value"] if full else (ge if ge is not None else MSGPACK_INTS["min_value"])
    if annotation is float:
        return 1.7976931348623157e308 if full else (ge if ge is not None else -0.5)
    if annotation is bytes:
        return bytes(range(256)) if full else b""
    if annotation is str:
        if _constraint(metadata, "pattern") == JOB_ID_PATTERN:
            return "RJ_job-1.a"
        low, high = _constraint(metadata, "min_length") or 0, _constraint(metadata, "max_length") or 64
        return ("ü€😀 x" * 64)[:high] if full else "r" * low
    raise NotImplementedError(f"no sample for {annotation!r}: teach tests/test_properties.py sample_value()")


@functools.cache
def sample_of(cls: type[Record], full: bool = True) -> Record:
    fields = {}
    for name, info in cls.model_fields.items():
        if info.is_required() or full:
            key = (cls.__name__, name)
            fields[name] = SAMPLE_OVERRIDES[key] if key in SAMPLE_OVERRIDES else sample_value(
                info.annotation, info.metadata, full)
    return cls.model_validate(fields)


SAMPLES = [sample_of(cls, full) for cls in RECORD_TYPES for full in (True, False)]
SAMPLE_IDS = [f"{cls.__name__}-{'full' if full else 'minimal'}" for cls in RECORD_TYPES for full in (True, False)]
KEY_TYPES = (JobSpec, JobInfo, Transition, ShutdownJobRequest, WaitRequest, EventsRequest)
samples = st.sampled_from(SAMPLES)
key_samples = st.sampled_from([sample for sample in SAMPLES if isinstance(sample, KEY_TYPES)])

job_infos = records(JobInfo)
KEY_RECORDS = st.one_of(job_specs, job_infos, transitions, shutdown_job_requests, wait_requests, events_requests)
any_records = st.sampled_from(RECORD_TYPES).flatmap(records)
record_types = st.sampled_from(RECORD_TYPES)

# Hostile values: what a caller or a corrupted message may put where a field should be.

packable_scalars = st.one_of(
    st.none(), st.booleans(), msgpack_ints, st.floats(), st.text(CHARS, max_size=16), st.binary(max_size=16),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
)
msgpack_values = st.recursive(
    packable_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(CHARS, max_size=6), inner, max_size=3),
    max_leaves=8,
)
"""Anything msgpack can pack with string map keys (other keys: see the explicit examples)."""
enum_members_and_look_alikes = st.sampled_from([
    *RestartPolicy, *JobOrigin, *JobState, *Cause, "temporary", "transient", "permanent", "client", "livekit",
    "TEMPORARY", "Transient", "LIVEKIT", " client", b"temporary", b"livekit", b"", "", 0, 1,
])
hostile_values = st.one_of(
    msgpack_values,
    st.integers(min_value=2**64) | st.integers(max_value=-(2**63) - 1),
    st.text(ANY_CHARS, max_size=16),
    lone_surrogate_texts,
    texts(0, 20_000),  # past every length limit
    st.text(alphabet="abcXYZ09_.- \n\t/:é", min_size=0, max_size=140),  # job-id-like, some invalid
    enum_members_and_look_alikes,
    st.sampled_from([b"r", bytearray(b"r"), memoryview(b"r"), 1, 1.0, True]),  # coercible in lax mode
    st.sets(st.integers(), max_size=2), st.just(object()),
)
extra_field_names = st.one_of(
    st.sampled_from(["model_config", "model_fields", "invalid_error", "__class__", "__dict__", "build", "Room",
                     " room", "room\x00", "jobId", "_private", "", "self", "cls"]),
    st.text(CHARS, min_size=1, max_size=12),
)
"""Names that are not fields (filtered per record type), ``self`` and ``cls`` included."""


def wire_body(record: Record) -> dict[str, typing.Any]:
    """The record's body exactly as it travels (enums as their values)."""
    return msgpack.unpackb(encode(record), raw=False)["body"]


def _not_a_field_of(cls: type[Record], name: str) -> bool:
    return name not in cls.model_fields


@functools.cache
def samples_of(cls: type[Record]) -> st.SearchStrategy[Record]:
    return st.sampled_from([sample_of(cls, True), sample_of(cls, False)])


@functools.cache
def field_edits(cls: type[Record]) -> st.SearchStrategy[list[str]]:
    names = list(cls.model_fields)
    return st.lists(st.sampled_from(names), unique=True, max_size=min(3, len(names))) if names else st.just([])


@functools.cache
def extra_fields(cls: type[Record], values: st.SearchStrategy[typing.Any]) -> st.SearchStrategy[dict[str, typing.Any]]:
    return st.dictionaries(extra_field_names.filter(functools.partial(_not_a_field_of, cls)), values, max_size=2)


@st.composite
def mutated_fields(draw: st.DrawFn, cls: type[Record], values: st.SearchStrategy[typing.Any],
                   bases: st.SearchStrategy[Record] | None = None) -> dict[str, typing.Any]:
    """A valid body of ``cls`` (from ``bases``, by default its two samples) with some fields
    dropped or replaced by ``values``, and maybe extra fields."""
    body = wire_body(draw(bases if bases is not None else samples_of(cls)))
    for name in draw(field_edits(cls)):
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(values)
    return {**body, **draw(extra_fields(cls, values))} if draw(st.integers(0, 3)) == 0 else body


@functools.cache
def mutated(cls: type[Record], values: st.SearchStrategy[typing.Any],
            bases: st.SearchStrategy[Record] | None = None) -> st.SearchStrategy[dict[str, typing.Any]]:
    """``mutated_fields``, built once per arguments (a fresh strategy object costs its setup each draw)."""
    return mutated_fields(cls, values, bases)


arbitrary_job_spec_fields = st.dictionaries(
    extra_field_names.filter(lambda k: k != "self") | st.sampled_from(list(JobSpec.model_fields)), hostile_values,
    max_size=4)


@st.composite
def job_spec_fields(draw: st.DrawFn) -> dict[str, typing.Any]:
    """``JobSpec(**fields)`` arguments: a valid spec's fields, then some fields hostile,
    missing or unexpected; sometimes no valid base at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(arbitrary_job_spec_fields)
    return draw(mutated(JobSpec, hostile_values, job_specs))


wrong_type_names = msgpack_values | st.text(CHARS, max_size=20)
other_expected_types = st.lists(record_types, max_size=2, unique=True)


@st.composite
def envelopes(draw: st.DrawFn) -> tuple[typing.Any, list[type[Record]]]:
    """An envelope-like msgpack object (mostly well-formed, each part sometimes wrong) and
    the record types the receiver expects."""
    cls = draw(record_types)
    kind = draw(st.integers(0, 9))
    body: typing.Any = (draw(msgpack_values) if kind == 0 else wire_body(draw(samples_of(cls))) if kind < 5
                        else draw(mutated(cls, msgpack_values)))
    envelope: typing.Any = {
        "v": PROTOCOL_VERSION if draw(st.integers(0, 5)) else draw(msgpack_values),
        "type": cls.__name__ if draw(st.integers(0, 5)) else draw(wrong_type_names),
        "body": body,
    }
    reshape = draw(st.integers(0, 12))
    if reshape == 0:
        envelope = {k: v for k, v in envelope.items() if k != "body"}
    elif reshape == 1:
        envelope = {**envelope, "extra": 1}
    elif reshape == 2:
        envelope = list(envelope.values())
    elif reshape == 3:
        envelope = {"V": envelope["v"], "type": envelope["type"], "body": body}
    others = draw(other_expected_types)
    expected = [cls, *others] if draw(st.integers(0, 3)) else others
    return envelope, expected


@st.composite
def mutated_encodings(draw: st.DrawFn, seeds: st.SearchStrategy[Record]) -> tuple[type[Record], bytes]:
    """A valid encoding with 1-4 bytes flipped, overwritten, inserted, deleted or slices duplicated."""
    record = draw(seeds)
    data = bytearray(encode(record))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data) - 1)) if data else 0
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "duplicate"]))
        if op == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[where] = draw(st.integers(0, 255))
        elif op == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[where:where + draw(st.integers(1, 4))]
        elif op == "duplicate":
            data[where:where] = data[where:where + draw(st.integers(1, 16))]
    return type(record), bytes(data)


# --------------------------------------------------------------------------- helpers


def has_nan(value: typing.Any) -> bool:
    if isinstance(value, Record):
        return has_nan(value.model_dump())
    if isinstance(value, dict):
        return any(has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(has_nan(v) for v in value)
    return isinstance(value, float) and math.isnan(value)


def assert_round_trips(record: Record) -> None:
    """``decode(encode(record))`` is the same record, and encoding it again gives the same bytes."""
    data = encode(record)
    back = decode(data, type(record))
    assert type(back) is type(record)
    assert encode(back) == data
    if not has_nan(record):  # NaN != NaN; the byte comparison above covers those
        assert back == record


def assert_utf8(value: str) -> None:
    value.encode("utf-8")  # raises for a lone surrogate


def assert_valid_or_typed(data: typing.Any, expected: typing.Sequence[type[Record]]) -> None:
    """``decode`` gives a record of an expected type that round-trips, or a typed error; and
    ``decode_reply`` gives an expected record (``Ack`` by default) or raises a ``RayvisorError``
    (an ``ErrorRecord`` is always raised, never returned)."""
    try:
        record = decode(data, *expected)
    except TYPED_DECODE_ERRORS as err:
        event(f"decode -> {type(err).__name__}")
    else:
        event("decode -> record")
        assert isinstance(record, tuple(expected) or tuple(RECORD_TYPES))
        assert_round_trips(record)
    try:
        reply = decode_reply(data, *expected)
    except RayvisorError:
        return
    assert isinstance(reply, tuple(expected) or (Ack,))
    assert not isinstance(reply, ErrorRecord)


def pack(value: typing.Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# --------------------------------------------------------------------------- 1. JobSpec


@examples(300)
@given(job_spec_fields())
@example({"room": "r", "restart": b"transient", "origin": "livekit"})
@example({"room": "r" * MAX_ROOM_NAME_CHARS, "job_id": "a" * MAX_JOB_ID_CHARS, "token": "t" * MAX_TOKEN_CHARS})
@example({"room": "r" * (MAX_ROOM_NAME_CHARS + 1)})
@example({"room": "r", "metadata": "\ud800"})
@example({"room": "r", "url": "wss://x\udfff"})
@example({"room": "r", "job_id": "RJ_ok\n"})
@example({"room": b"bytes-room"})  # strict: no coercion of bytes (or numbers) to text
@example({"room": "r", "metadata": bytearray(b"{}")})
def test_a_job_spec_is_either_valid_and_round_trips_or_an_invalid_job_spec(fields):
    """Whatever keyword arguments a caller passes, ``JobSpec(**fields)`` raises
    ``InvalidJobSpec`` or gives a spec that meets every documented limit and travels intact."""
    try:
        spec = JobSpec(**fields)
    except InvalidJobSpec:
        event("refused")
        return
    event("accepted")
    assert 1 <= len(spec.room) <= MAX_ROOM_NAME_CHARS
    assert spec.job_id is None or (len(spec.job_id) <= MAX_JOB_ID_CHARS and re.fullmatch(JOB_ID_PATTERN, spec.job_id))
    assert len(spec.url) <= 2048 and len(spec.token) <= MAX_TOKEN_CHARS
    assert spec.restart is None or isinstance(spec.restart, RestartPolicy)
    assert isinstance(spec.origin, JobOrigin)
    for name in ("room", "metadata", "agent_name", "dispatch_id", "url", "token", "job_id"):
        value = getattr(spec, name)
        if name in fields:  # strict: text fields take text (or None where optional), nothing coerced
            assert isinstance(fields[name], str) or fields[name] is None and JobSpec.model_fields[name].default is None
            assert value == fields[name]  # what the caller gave is what travels
        if value is not None:
            assert_utf8(value)
    assert_round_trips(spec)


@SOME
@given(job_specs)
def test_every_valid_job_spec_round_trips(spec):
    """A spec built from valid fields (up to every length limit) decodes to an equal spec."""
    assert_round_trips(spec)


def test_a_job_spec_past_the_message_ceiling_is_refused_by_the_decoder_with_a_typed_error():
    """Metadata has no limit of its own, but the control plane's message ceiling holds."""
    spec = JobSpec(room="r", metadata="x" * MAX_MESSAGE_BYTES)
    with pytest.raises(MessageError, match="exceeds"):
        decode(encode(spec), JobSpec)


@pytest.mark.parametrize("build", [
    lambda: JobSpec(room="r", self=1),
    lambda: ShutdownJobRequest.build(job_id="j", cls=1),
], ids=["JobSpec(self=...)", "Record.build(cls=...)"])
def test_a_field_named_like_a_python_parameter_is_a_typed_error(build):
    """An unexpected field is a typed error whatever its name."""
    with pytest.raises(RayvisorError):
        build()


@SOME
@given(st.data())
def test_record_build_gives_a_valid_record_or_the_records_own_typed_error(data):
    """``Cls.build(**fields)`` for any record type: a record that round-trips, or exactly
    ``Cls.invalid_error`` (never a pydantic ``ValidationError``)."""
    cls = data.draw(record_types)
    fields = data.draw(mutated(cls, hostile_values))
    try:
        record = cls.build(**fields)
    except RayvisorError as err:
        assert type(err) is cls.invalid_error, err
        return
    assert isinstance(record, cls)
    try:
        assert_round_trips(record)
    except RayvisorError as err:  # e.g. an int past 64 bits or a lone surrogate: refused when encoded
        assert type(err) is cls.invalid_error, err


# --------------------------------------------------------------------------- 2. the decoder


@SOME
@given(any_records)
def test_every_registered_record_type_round_trips(record):
    """Any valid instance of any registered record type decodes to an equal record."""
    assert_round_trips(record)
    back = decode(encode(record))  # no expected type: any registered one
    assert type(back) is type(record)
    assert has_nan(record) or back == record


@pytest.mark.parametrize("record", SAMPLES, ids=SAMPLE_IDS)
def test_a_sample_of_every_registered_record_type_round_trips(record):
    """One instance of each registered type, optional fields filled or left out, travels intact."""
    assert_round_trips(record)


def test_the_record_builder_covers_every_registered_type():
    """Each registered type has a strategy (a new field type must be taught to ``values_of``)."""
    for cls in RECORD_TYPES:
        records(cls).validate()  # raises NotImplementedError for an annotation values_of() does not know


@SOME
@given(KEY_RECORDS)
def test_key_records_round_trip(record):
    """JobSpec, JobInfo, Transition, ShutdownJobRequest, WaitRequest and EventsRequest travel intact."""
    assert_round_trips(record)


@MANY
@given(st.binary(max_size=512), st.lists(record_types, max_size=3, unique=True))
@example(b"", [])
@example(b"\xff\x00garbage", [JobSpec])
@example(b"\xdd\xff\xff\xff\xff", [])  # an array header claiming 4 billion items
@example(b"\xc7\x01\xff\x00", [Ack])  # a malformed msgpack timestamp extension
def test_random_bytes_decode_to_an_expected_record_or_a_typed_error(data, expected):
    """Garbage bytes never raise anything but a typed error."""
    assert_valid_or_typed(data, expected)
    assert_valid_or_typed(bytearray(data), expected)
    assert_valid_or_typed(memoryview(data), expected)


@SOME
@given(msgpack_values, st.lists(record_types, max_size=3, unique=True))
@example({1: "an int map key"}, [])
@example({"v": 1, "type": "Ack", "body": {0: 1}}, [Ack])
def test_any_msgpack_value_decodes_to_an_expected_record_or_a_typed_error(value, expected):
    """Any well-formed msgpack value (hardly ever an envelope) decodes to an expected record or
    a typed error."""
    assert_valid_or_typed(pack(value), expected)


@examples(150)
@given(envelopes())
@example(({"v": True, "type": "Ack", "body": {}}, []))  # True == 1 in Python, but not a version
def test_envelopes_are_checked_in_order_version_type_body(case):
    """An envelope fails with the error of its first wrong part: shape, then version
    (``UnsupportedVersion``), then type, then body (the record's own typed error)."""
    sent, expected = case
    data = pack(sent)
    try:
        record = decode(data, *expected)
    except RayvisorError as err:
        raised = err
    else:
        raised = None
    try:  # what arrives: msgpack as rayvisor reads it (map keys must be strings)
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except ValueError:
        envelope = None
    event(f"decode -> {type(raised).__name__ if raised else 'record'}")
    if not isinstance(envelope, dict) or set(envelope) != {"v", "type", "body"}:
        assert type(raised) is MessageError
    elif type(envelope["v"]) is not int or envelope["v"] != PROTOCOL_VERSION:  # True == 1, yet not a version
        assert type(raised) is UnsupportedVersion
    elif not isinstance(envelope["type"], str) or envelope["type"] not in _REGISTRY or (
            expected and _REGISTRY[envelope["type"]] not in expected):
        assert type(raised) is MessageError and "unexpected message type" in str(raised)
    elif not isinstance(envelope["body"], dict):
        assert type(raised) is MessageError
    elif raised is not None:
        assert type(raised) is _REGISTRY[envelope["type"]].invalid_error
    else:
        assert type(record) is _REGISTRY[envelope["type"]]
        assert_round_trips(record)
    assert_valid_or_typed(data, expected)  # and through decode_reply


@MANY
@given(st.one_of(st.integers(), st.floats(), st.text(ANY_CHARS, max_size=8), st.none(), st.booleans(),
                 st.lists(st.integers() | st.binary(max_size=8), max_size=3),
                 st.dictionaries(st.text(CHARS, max_size=3), st.integers(), max_size=3)),
       st.lists(record_types, max_size=2, unique=True))
@example("not even bytes", [JobSpec])
@example([encode(Ack())], [Ack])  # a valid message, but in a list
def test_a_value_that_is_not_bytes_is_a_message_error(value, expected):
    """Only bytes-like objects are messages; everything else is refused, not unpacked."""
    with pytest.raises(MessageError) as err:
        decode(value, *expected)
    assert type(err.value) is MessageError
    with pytest.raises(MessageError):
        decode_reply(value, *expected)


@pytest.mark.parametrize("record", SAMPLES, ids=SAMPLE_IDS)
def test_every_proper_prefix_of_a_sample_envelope_is_a_message_error(record):
    """A truncated message is malformed, wherever it was cut (never half a record)."""
    data = encode(record)
    for end in range(len(data)):
        with pytest.raises(MessageError) as err:
            decode(data[:end], type(record))
        assert type(err.value) is MessageError, end


@SOME
@given(any_records, st.data())
def test_a_truncated_or_extended_envelope_is_a_message_error(record, data):
    """The same for generated records cut anywhere, and for a message followed by more bytes."""
    encoded = encode(record)
    for end in data.draw(st.lists(st.integers(0, len(encoded) - 1), min_size=1, max_size=8)):
        with pytest.raises(MessageError) as err:
            decode(encoded[:end], type(record))
        assert type(err.value) is MessageError
    with pytest.raises(MessageError):
        decode(encoded + data.draw(st.binary(min_size=1, max_size=8)), type(record))


@MANY
@given(samples, st.one_of(st.integers(min_value=PROTOCOL_VERSION + 1, max_value=2**64 - 1),
                              st.integers(min_value=-(2**63), max_value=PROTOCOL_VERSION - 1),
                              st.text(CHARS, max_size=5), st.none(), st.lists(msgpack_ints, max_size=2),
                              st.floats().filter(lambda f: f != PROTOCOL_VERSION)))
def test_another_protocol_version_is_unsupported_whatever_the_envelope_carries(record, version):
    """A valid record under any other version is ``UnsupportedVersion``, before its type is looked at."""
    envelope = msgpack.unpackb(encode(record), raw=False)
    data = pack({**envelope, "v": version})
    with pytest.raises(UnsupportedVersion):
        decode(data, type(record))
    with pytest.raises(UnsupportedVersion):
        decode(data, Ack)
    with pytest.raises(UnsupportedVersion):
        decode_reply(data, type(record))


@MANY
@given(samples, st.lists(record_types, min_size=1, max_size=3, unique=True))
def test_a_record_of_an_unexpected_type_is_a_message_error(record, expected):
    """A valid record is refused where another type is expected."""
    assume(type(record) not in expected)
    with pytest.raises(MessageError, match="unexpected message type"):
        decode(encode(record), *expected)


@SOME
@given(st.integers(1, 200_000), st.sampled_from(["top", "field"]), record_types)
def test_deeply_nested_input_is_a_typed_error(depth, where, cls):
    """Nesting far beyond any record's depth is refused without a RecursionError or a crash."""
    nested = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]
    if where == "top":
        data = nested
    else:
        field = next(iter(cls.model_fields), "x")
        body = b"\x81" + pack(field) + nested
        data = b"\x83" + pack("v") + pack(PROTOCOL_VERSION) + pack("type") + pack(cls.__name__) + pack("body") + body
    with pytest.raises(TYPED_DECODE_ERRORS):
        decode(data, cls)


@SOME
@given(st.sampled_from([Transition, JobInfo, EventsRequest]), st.integers(min_value=2**64), st.booleans())
def test_a_record_with_an_int_past_64_bits_fails_to_encode_with_a_typed_error(cls, huge, negative):
    """Pydantic accepts any int; msgpack carries 64 bits: the gap is a typed error, not OverflowError."""
    signed = -huge if negative else huge
    fields = {"Transition": {"seq": signed, "job_id": "j", "state": "RUNNING", "room": "r", "at": 0.0},
              "JobInfo": {"id": "j", "state": "RUNNING", "room": "r", "agent_name": "", "restarts": signed},
              "EventsRequest": {"after_seq": huge, "timeout": 0.0}}[cls.__name__]
    with pytest.raises(MessageError, match="cannot encode"):
        encode(cls.build(**fields))


@SOME
@given(st.sampled_from(["room", "agent_name", "reason", "metadata"]), lone_surrogate_texts)
def test_a_record_holding_a_lone_surrogate_fails_to_encode_with_a_typed_error(field, text):
    """Text that UTF-8 cannot carry is refused when encoded (a typed error, not UnicodeEncodeError)."""
    info = JobInfo.build(**{"id": "j", "state": "RUNNING", "room": "r", "agent_name": "", field: text})
    with pytest.raises(MessageError, match="cannot encode"):
        encode(info)


@MANY
@given(st.one_of(st.sampled_from(sorted(errors._BY_CODE)), st.text(CHARS, max_size=20)), st.text(CHARS, max_size=40),
       st.lists(record_types, max_size=2, unique=True))
def test_decode_reply_re_raises_an_error_record_as_its_typed_error(code, message, expected):
    """An ``ErrorRecord`` comes back as the error class its code names (unknown codes:
    ``RayvisorError``) with the same message, whatever reply type was expected."""
    with pytest.raises(RayvisorError) as err:
        decode_reply(encode(ErrorRecord(code=code, message=message)), *expected)
    assert type(err.value) is errors._BY_CODE.get(code, RayvisorError)
    assert err.value.message == message


# --------------------------------------------------------------------------- 3. mutated envelopes


@MANY
@given(mutated_encodings(key_samples))
def test_a_mutated_key_record_decodes_to_a_valid_record_or_a_typed_error(case):
    """Flipped, inserted or deleted bytes in JobSpec, JobInfo, Transition ... envelopes never
    escape as anything but a valid record of the expected type or a typed error."""
    cls, data = case
    assert_valid_or_typed(data, [cls])
    assert_valid_or_typed(data, [])


@SOME
@given(mutated_encodings(samples | any_records))
def test_a_mutated_record_of_any_type_decodes_to_a_valid_record_or_a_typed_error(case):
    """The same for every registered record type."""
    cls, data = case
    assert_valid_or_typed(data, [cls])


# --------------------------------------------------------------------------- 4. token scope

SOURCES = ["camera", "microphone", "screen_share", "screen_share_audio"]
GRANT_FLAGS = ("room_create", "room_list", "room_record", "room_admin", "room_join", "ingress_admin", "recorder",
               "agent", "can_manage_agent_session", "can_subscribe_metrics", "destination_room")
"""Grants beyond publishing and subscribing in one's own room."""
ROOM_TOKEN_CLAIMS = {"sub", "iss", "nbf", "exp", "video", "kind", "name", "metadata", "attributes"}
API_TOKEN_CLAIMS = {"sub", "iss", "nbf", "exp", "video"}

api_keys = st.text(string.ascii_letters + string.digits, min_size=1, max_size=24)
api_secrets = st.text(string.ascii_letters + string.digits, min_size=32, max_size=64)
short_texts = st.text(CHARS, max_size=24)
identities = texts(1, 256)
ttls = st.floats(min_value=1.0, max_value=400 * 24 * 3600.0) | st.integers(1, 10**8)
permissions = st.builds(
    WorkerPermissions, can_publish=st.booleans(), can_subscribe=st.booleans(), can_publish_data=st.booleans(),
    can_update_metadata=st.booleans(), can_publish_sources=st.lists(st.sampled_from(SOURCES), unique=True),
    hidden=st.booleans(),
)


def granted(video) -> set[str]:
    return {flag for flag in GRANT_FLAGS if getattr(video, flag)}


def unverified_claims(token: str) -> dict[str, typing.Any]:
    return jwt.decode(token, options={"verify_signature": False})


def assert_lifetime(claims: dict[str, typing.Any], ttl: float) -> None:
    assert abs((claims["exp"] - claims["nbf"]) - ttl) <= 1


def assert_secret_stays_out(token: str, secret: str) -> None:
    assert secret not in token
    assert secret not in json.dumps(unverified_claims(token), ensure_ascii=False)
    assert secret not in json.dumps(jwt.get_unverified_header(token))


def assert_other_keys_are_refused(token: str, key: str, secret: str, other_key: str, other_secret: str) -> None:
    with pytest.raises(jwt.InvalidSignatureError):
        TokenVerifier(key, other_secret).verify(token)
    with pytest.raises(jwt.InvalidIssuerError):
        TokenVerifier(other_key, secret).verify(token)


@FEW
@given(key=api_keys, secret=api_secrets, other_key=api_keys, other_secret=api_secrets, room=room_names,
       identity=identities, name=short_texts, metadata=short_texts,
       attributes=st.dictionaries(short_texts, short_texts, max_size=3), perms=permissions, ttl=ttls)
def test_a_room_token_lets_its_agent_join_exactly_its_room_for_its_ttl(key, secret, other_key, other_secret, room,
                                                                       identity, name, metadata, attributes, perms,
                                                                       ttl):
    """The job's room token: this identity, this room, kind agent, the agent's permissions,
    no admin, create or list grant, the configured lifetime; only this key pair verifies it."""
    assume(other_key != key and other_secret != secret)
    assume(all(secret not in text for text in (room, identity, name, metadata, *attributes, *attributes.values())))
    credentials = LiveKitCredentials(url="wss://lk.example", api_key=key, api_secret=secret)
    token = credentials.room_token(room=room, identity=identity, name=name, attributes=attributes,
                                   metadata=metadata, permissions=perms, ttl=ttl)

    claims = TokenVerifier(key, secret).verify(token)
    assert claims.identity == identity and claims.kind == AGENT_KIND
    assert (claims.name, claims.metadata, claims.attributes) == (name, metadata, attributes)
    video = claims.video
    assert video.room == room
    assert granted(video) == {"room_join", "agent"}
    assert (video.can_publish, video.can_subscribe, video.can_publish_data) == (
        perms.can_publish, perms.can_subscribe, perms.can_publish_data)
    assert bool(video.can_update_own_metadata) == perms.can_update_metadata
    assert bool(video.hidden) == perms.hidden
    assert (video.can_publish_sources or []) == perms.can_publish_sources
    raw = unverified_claims(token)
    assert set(raw) <= ROOM_TOKEN_CLAIMS and raw["iss"] == key
    assert_lifetime(raw, ttl)
    assert_secret_stays_out(token, secret)
    assert_other_keys_are_refused(token, key, secret, other_key, other_secret)


@FEW
@given(key=api_keys, secret=api_secrets, other_key=api_keys, other_secret=api_secrets, room=room_names, ttl=ttls)
def test_an_api_token_administers_exactly_its_room_for_its_ttl(key, secret, other_key, other_secret, room, ttl):
    """``ctx.api``'s token: ``room_admin`` of this room and ``room_create`` (LiveKit's
    DeleteRoom asks for it), no participant identity, no join, list or agent grant."""
    assume(other_key != key and other_secret != secret and secret not in room)
    credentials = LiveKitCredentials(url="wss://lk.example", api_key=key, api_secret=secret)
    token = credentials.api_token(room=room, ttl=ttl)

    claims = TokenVerifier(key, secret).verify(token)
    assert claims.identity == "" and claims.video.room == room
    assert granted(claims.video) == {"room_admin", "room_create"}
    raw = unverified_claims(token)
    assert set(raw) <= API_TOKEN_CLAIMS
    assert_lifetime(raw, ttl)
    assert_secret_stays_out(token, secret)
    assert_other_keys_are_refused(token, key, secret, other_key, other_secret)


async def _entrypoint(ctx) -> None:
    return None


@FEW
@given(ttl=st.floats(min_value=1.0, max_value=1e300))
@example(ttl=1e12)
def test_every_token_ttl_that_worker_options_accept_can_be_minted(ttl):
    """``token_ttl`` is validated when the options are built, so minting never fails later."""
    try:
        opts = WorkerOptions(entrypoint_fnc=_entrypoint, token_ttl=ttl, ws_url="wss://lk.example",
                             api_key="key", api_secret="s" * 32)
    except InvalidAgent:
        return
    credentials = LiveKitCredentials.of(opts)
    assert credentials is not None
    credentials.api_token(room="r", ttl=opts.token_ttl)


# --------------------------------------------------------------------------- WorkerOptions

NOT_DURATIONS = {"load_threshold", "job_memory_warn_mb", "job_memory_limit_mb"}
DURATIONS = sorted(f.name for f in dataclasses.fields(WorkerOptions) if f.type == "float" and f.name not in NOT_DURATIONS)
"""Every ``float`` option is a duration in seconds, but for the few named above (a new float
option that is not a duration must be added there, or this file's duration property fails)."""


def worker_options(**overrides: typing.Any) -> WorkerOptions:
    """Options of the local room backend (whatever LIVEKIT_* this process has), with ``overrides``."""
    return WorkerOptions(entrypoint_fnc=_entrypoint, **{"ws_url": "", "api_key": "", "api_secret": "", **overrides})


OPTION_FIELDS = sorted(name for name in WorkerOptions.__dataclass_fields__ if name != "entrypoint_fnc")


@MANY
@given(st.sampled_from(DURATIONS),
       st.floats() | st.integers(-10**6, 10**6) | st.none() | st.text(CHARS, max_size=4) | st.lists(st.floats(), max_size=1))
def test_worker_options_accept_exactly_the_positive_finite_durations(name, value):
    """Every duration option is a positive, finite number of seconds (``token_ttl`` at most
    ``MAX_TOKEN_TTL``); anything else is ``InvalidAgent``."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    ok = ok and (name != "token_ttl" or value <= MAX_TOKEN_TTL)
    try:
        opts = worker_options(**{name: value})
    except InvalidAgent:
        assert not ok, f"{name}={value!r} refused"
    else:
        assert ok, f"{name}={value!r} accepted"
        assert getattr(opts, name) == value


@SOME
@given(st.dictionaries(st.sampled_from(OPTION_FIELDS), hostile_values, min_size=1, max_size=3))
@example({"job_resources": None})
@example({"shutdown_process_timeout": 10**400})
def test_worker_options_are_built_or_refused_with_invalid_agent(overrides):
    """Whatever values an agent author passes, building ``WorkerOptions`` fails fast with
    ``InvalidAgent`` or succeeds; no other exception."""
    try:
        worker_options(**overrides)
    except InvalidAgent:
        pass
