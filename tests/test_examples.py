"""The LiveKit docs' job-lifecycle examples in ``examples/`` run unchanged on rayvisor.

Each example is loaded from its file (as ``rayvisor dev examples/X.py`` would), served,
and driven through the local room backend with simulated participants; the tests
assert only what a user could observe: messages received, the job's terminal record,
files written, and who is left in the room.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from rayvisor import Cause, JobState, rtc
from rayvisor.errors import RoomNotFound
from support import wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

STANDARD = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

TIMEOUT = 60.0
"""Deadline for anything that involves starting a job actor (cold Ray actors are slow on CI)."""


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` under a unique module name; rayvisor.serve ships it by value."""
    module_name = f"docs_example_{name}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def room() -> str:
    return "docs-" + uuid.uuid4().hex[:8]


def texts(messages: list[tuple[str, str, str | bytes]]) -> list[str | bytes]:
    return [text for _sender, _topic, text in messages]


def participant_identities(rooms, room: str) -> list[str]:
    return sorted(p.identity for p in rooms.participants(room))


# --------------------------------------------------------------------------- Entrypoint


def test_hello_world_greets_the_room_and_sees_who_is_there_then_ends_when_the_user_leaves(serve, rooms, room):
    example = load_example("hello_world")
    client = serve(example.entrypoint)
    alice = rooms.join(room, "alice", kind=STANDARD)
    observer = rooms.join(room, "observer", kind=AGENT)

    job_id = client.submit(room=room)

    agent = f"agent-{job_id}"
    assert alice.wait_for_messages(1, topic="hello-world", timeout=TIMEOUT) == [(agent, "hello-world", "hello world")]
    assert observer.wait_for_messages(1, topic="hello-world", timeout=TIMEOUT) == [
        (agent, "hello-world", "hello world")
    ]
    # the agent's room.remote_participants holds everyone who was there when it connected
    wait_until(lambda: client.status(job_id).participants == ["alice", "observer"], timeout=TIMEOUT)
    assert client.status(job_id).state == JobState.RUNNING  # returning from the entrypoint does not end the job

    alice.leave()  # the last STANDARD participant; an AGENT observer does not keep the job alive

    info = client.wait(job_id, timeout=TIMEOUT)
    assert info.state == JobState.SUCCEEDED
    assert info.cause == Cause.ROOM_EMPTY
    assert info.error is None
    assert participant_identities(rooms, room) == ["observer"]


# --------------------------------------------------------------------------- Job metadata


def test_job_metadata_example_reads_the_dispatch_metadata_and_greets_the_user_by_name(serve, rooms, room):
    example = load_example("job_metadata")
    client = serve(example.entrypoint)
    alice = rooms.join(room, "alice", kind=STANDARD)
    metadata = json.dumps({"user_id": "7", "user_name": "Ada", "user_phone": "+15550100"})

    job_id = client.submit(room=room, metadata=metadata)

    assert alice.wait_for_messages(1, topic="greeting", timeout=TIMEOUT) == [(f"agent-{job_id}", "greeting", "hello Ada")]
    assert client.status(job_id).metadata == metadata
    alice.leave()
    info = client.wait(job_id, timeout=TIMEOUT)
    assert (info.state, info.cause, info.error) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY, None)


def test_job_metadata_example_fails_the_job_with_entrypoint_error_when_metadata_is_not_json(serve, rooms, room):
    example = load_example("job_metadata")
    client = serve(example.entrypoint)
    alice = rooms.join(room, "alice", kind=STANDARD)

    job_id = client.submit(room=room, metadata="user_id=7")

    info = client.wait(job_id, timeout=TIMEOUT)
    assert info.state == JobState.FAILED
    assert info.cause == Cause.ENTRYPOINT_ERROR
    assert "JSONDecodeError" in (info.error or "")
    assert alice.messages() == []  # it failed before connecting: nobody was greeted
    assert participant_identities(rooms, room) == ["alice"]


def test_job_metadata_example_fails_the_job_when_a_required_field_is_missing(serve, rooms, room):
    example = load_example("job_metadata")
    client = serve(example.entrypoint)
    rooms.join(room, "alice", kind=STANDARD)

    job_id = client.submit(room=room, metadata=json.dumps({"user_id": "7", "user_name": "Ada"}))

    info = client.wait(job_id, timeout=TIMEOUT)
    assert (info.state, info.cause) == (JobState.FAILED, Cause.ENTRYPOINT_ERROR)
    assert "KeyError" in (info.error or "") and "user_phone" in (info.error or "")


# --------------------------------------------------------------------------- Participant attributes


def test_participant_attributes_example_follows_the_first_participants_language_and_ignores_others(
    serve, rooms, room
):
    example = load_example("participant_attributes")
    client = serve(example.entrypoint)
    observer = rooms.join(room, "observer", kind=AGENT)  # not a match for wait_for_participant's default kinds

    job_id = client.submit(room=room)  # submitted before the user arrives: the agent waits for one
    wait_until(lambda: "agent-" + job_id in participant_identities(rooms, room), timeout=TIMEOUT)
    alice = rooms.join(room, "alice", kind=STANDARD, attributes={"user.language": "en"})

    agent = f"agent-{job_id}"
    assert alice.wait_for_messages(1, topic="language", timeout=TIMEOUT) == [(agent, "language", "en")]

    bob = rooms.join(room, "bob", kind=STANDARD, attributes={"user.language": "de"})
    bob.set_attributes({"user.language": "fr"})  # not the participant the agent waited for
    alice.set_attributes({"user.language": "es"})

    assert texts(alice.wait_for_messages(2, topic="language", timeout=TIMEOUT)) == ["en", "es"]
    alice.set_attributes({"user.language": "pt"})
    assert texts(alice.wait_for_messages(3, topic="language", timeout=TIMEOUT)) == ["en", "es", "pt"]
    assert texts(observer.wait_for_messages(3, topic="language", timeout=TIMEOUT)) == ["en", "es", "pt"]

    alice.leave()
    bob.leave()
    info = client.wait(job_id, timeout=TIMEOUT)
    assert (info.state, info.cause, info.error) == (JobState.SUCCEEDED, Cause.ROOM_EMPTY, None)


# --------------------------------------------------------------------------- Ending the session


def test_end_session_example_shuts_its_job_down_saves_state_once_and_leaves_the_others_in_the_room(
    serve, rooms, room, tmp_path
):
    example = load_example("end_session")
    client = serve(example.entrypoint)
    alice = rooms.join(room, "alice", kind=STANDARD)
    state_file = tmp_path / "state.jsonl"

    job_id = client.submit(room=room, metadata=json.dumps({"state_file": str(state_file)}))

    info = client.wait(job_id, timeout=TIMEOUT)
    assert info.state == JobState.SUCCEEDED
    assert info.cause == Cause.USER_SHUTDOWN
    assert info.reason == "Session ended"
    assert info.error is None
    assert alice.wait_for_messages(1, topic="session", timeout=TIMEOUT) == [(f"agent-{job_id}", "session", "goodbye")]

    lines = state_file.read_text().splitlines()
    assert len(lines) == 1
    state = json.loads(lines[0])
    assert (state["job_id"], state["room"]) == (job_id, room)

    # only the agent disconnected: the session goes on for everyone else
    assert participant_identities(rooms, room) == ["alice"]


def test_end_session_example_without_a_state_file_still_ends_cleanly(serve, rooms, room):
    example = load_example("end_session")
    client = serve(example.entrypoint)
    rooms.join(room, "alice", kind=STANDARD)

    job_id = client.submit(room=room)

    info = client.wait(job_id, timeout=TIMEOUT)
    assert (info.state, info.cause, info.reason, info.error) == (
        JobState.SUCCEEDED, Cause.USER_SHUTDOWN, "Session ended", None
    )


def test_delete_room_example_disconnects_everyone_and_ends_the_job_with_room_deleted(serve, rooms, room):
    example = load_example("delete_room")
    client = serve(example.entrypoint)
    alice = rooms.join(room, "alice", kind=STANDARD)
    bob = rooms.join(room, "bob", kind=STANDARD)
    observer = rooms.join(room, "observer", kind=AGENT)

    job_id = client.submit(room=room)

    info = client.wait(job_id, timeout=TIMEOUT)
    assert info.state == JobState.SUCCEEDED
    assert info.cause == Cause.ROOM_DELETED
    assert info.error is None
    agent = f"agent-{job_id}"
    for participant in (alice, bob, observer):
        assert participant.wait_for_messages(1, topic="session", timeout=TIMEOUT) == [
            (agent, "session", "the session is over")
        ]
    with pytest.raises(RoomNotFound):
        rooms.participants(room)
    with pytest.raises(RoomNotFound):
        alice.send_text("anyone here?")


# --------------------------------------------------------------------------- runnable files


@pytest.mark.parametrize("name", ["hello_world", "job_metadata", "participant_attributes", "end_session",
                                  "delete_room"])
def test_every_example_runs_as_a_script_with_the_rayvisor_cli(name):
    """``python examples/X.py --help`` in a fresh interpreter: the ported imports resolve and
    ``cli.run_app`` offers the worker commands."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--help"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for command in ("dev", "start", "submit"):
        assert command in result.stdout
