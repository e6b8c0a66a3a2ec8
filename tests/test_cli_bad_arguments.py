"""The ``rayvisor`` command refuses bad arguments with a clear message and a non-zero exit,
never a Python traceback, and before it touches Ray.

Only arguments that are refused before any Ray connection are tested here. Every in-process
run replaces ``connect``, ``local_rooms``, ``serve``, the worker loop and ``ray.init`` with
stand-ins that record the call and refuse with a typed error, so an argument that slipped
through shows up as "reached Ray" instead of connecting to whatever cluster this machine has.
The subprocess checks use only arguments that click itself refuses, with ``RAY_ADDRESS``
pointed at a closed port as a second guard. No conftest fixture is used: this file also runs
alone with ``python -m pytest -q -p no:cacheprovider --noconftest tests/test_cli_bad_arguments.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import ray
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import rayvisor.cli
from rayvisor import WorkerOptions
from rayvisor.cli import build_cli
from rayvisor.errors import SupervisorNotFound
from rayvisor.messages import MAX_ROOM_NAME_CHARS

CLI_PROPERTIES = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                          suppress_health_check=[HealthCheck.too_slow])
STAND_IN = "stand-in: this test never reaches Ray"
TEXT = st.characters(exclude_categories=("Cs",))
"""Any character a real command line can carry as text (no lone surrogates)."""


@contextlib.contextmanager
def ray_stand_ins() -> Iterator[list[str]]:
    """Replace everything in the CLI that would reach Ray; yields the names that were called."""
    reached: list[str] = []

    def stand_in(name: str):
        def refuse(*_args, **_kwargs):
            reached.append(name)
            raise SupervisorNotFound(f"{STAND_IN} ({name})")
        return refuse

    with pytest.MonkeyPatch.context() as patch:
        for name in ("connect", "local_rooms", "serve", "_run_worker"):
            patch.setattr(rayvisor.cli, name, stand_in(name))
        patch.setattr(ray, "init", stand_in("ray.init"))
        yield reached


def invoke(args: list[str], opts: WorkerOptions | None = None) -> tuple[Result, list[str]]:
    with ray_stand_ins() as reached:
        result = CliRunner().invoke(build_cli(opts), args, prog_name="rayvisor")
    return result, reached


def assert_refused(result: Result, reached: list[str], message: str | tuple[str, ...], exit_code: int) -> None:
    """Exited through click with ``exit_code`` and ``message`` (every fragment of it), no
    traceback, Ray untouched."""
    assert isinstance(result.exception, SystemExit), result.exc_info  # not an escaped exception
    assert result.exit_code == exit_code, result.output
    for fragment in (message,) if isinstance(message, str) else message:
        assert fragment in result.output
    assert "Traceback" not in result.output
    assert reached == [], f"reached {reached} before refusing the arguments"


async def entrypoint(ctx) -> None:
    return None


USAGE = 2
"""click's exit code for a usage error (unknown command or option, missing or malformed value)."""
REFUSED = 1
"""A value click accepts but rayvisor refuses (``InvalidJobSpec``, ``AgentLoadError`` ...)."""

BAD_ARGUMENTS = [
    pytest.param(["frobnicate"], "No such command 'frobnicate'", USAGE, id="unknown subcommand"),
    pytest.param(["room", "frobnicate"], "No such command 'frobnicate'", USAGE, id="unknown room subcommand"),
    pytest.param(["jobs", "--jsonn"], ("No such option", "--jsonn"), USAGE, id="unknown option"),
    pytest.param(["submit"], "Missing option '--room'", USAGE, id="submit without --room"),
    pytest.param(["submit", "--room"], "Option '--room' requires an argument", USAGE, id="--room without a value"),
    pytest.param(["submit", "--room", "r", "--metadata", "{not json"], "InvalidMetadata", REFUSED,
                 id="--metadata that is not JSON"),
    pytest.param(["submit", "--room", "r", "--metadata", "{}", "--raw-metadata", "x"],
                 "give --metadata or --raw-metadata, not both", USAGE, id="--metadata and --raw-metadata"),
    pytest.param(["submit", "--room", ""], "InvalidJobSpec", REFUSED, id="empty room name"),
    pytest.param(["submit", "--room", "r" * (MAX_ROOM_NAME_CHARS + 1)], "InvalidJobSpec", REFUSED,
                 id="over-long room name"),
    pytest.param(["submit", "--room", "r", "--wait", "soon"], "'soon' is not a valid float", USAGE,
                 id="non-numeric --wait"),
    pytest.param(["submit", "--room", "r", "--restart", "sometimes"], "Invalid value for '--restart'", USAGE,
                 id="unknown --restart policy"),
    pytest.param(["status"], "Missing argument 'JOB_ID'", USAGE, id="status without a job id"),
    pytest.param(["shutdown"], "Missing argument 'JOB_ID'", USAGE, id="shutdown without a job id"),
    pytest.param(["shutdown", "RJ_x", "--wait", "later"], "'later' is not a valid float", USAGE,
                 id="shutdown with a non-numeric --wait"),
    pytest.param(["drain", "--timeout", "forever"], "'forever' is not a valid float", USAGE,
                 id="non-numeric drain --timeout"),
    pytest.param(["jobs", "--namespace"], "Option '--namespace' requires an argument", USAGE,
                 id="--namespace without a value"),
    pytest.param(["room", "join"], "Missing argument 'ROOM_NAME'", USAGE, id="room join without arguments"),
    pytest.param(["room", "join", "desk"], "Missing argument 'IDENTITY'", USAGE, id="room join without identity"),
    pytest.param(["room", "join", "desk", "alice", "--kind", "robot"], "Invalid value for '--kind'", USAGE,
                 id="room join with an unknown --kind"),
    pytest.param(["room", "set-attributes", "desk", "alice", "no-equals-sign"], "'no-equals-sign' is not KEY=VALUE",
                 USAGE, id="attribute without ="),
    pytest.param(["room", "set-attributes", "desk", "alice"], "Missing argument 'PAIRS...'", USAGE,
                 id="set-attributes without pairs"),
    pytest.param(["room", "send", "desk", "alice"], "Missing argument 'TEXT'", USAGE, id="room send without text"),
    pytest.param(["dev"], "Missing argument 'AGENT'", USAGE, id="dev without an agent"),
    pytest.param(["start", "/nonexistent/agent.py"], "AgentLoadError", REFUSED, id="agent file that does not exist"),
    pytest.param(["dev", "no_such_module_for_rayvisor_tests:entrypoint"], "AgentLoadError", REFUSED,
                 id="agent module that cannot be imported"),
    pytest.param(["demo", "--shutdown-timeout", "soon"], "'soon' is not a valid float", USAGE,
                 id="non-numeric demo --shutdown-timeout"),
]


@pytest.mark.parametrize("args,message,exit_code", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_with_a_message_before_ray_is_touched(args, message, exit_code):
    """Each bad command line prints what is wrong and exits non-zero, without a traceback."""
    result, reached = invoke(args)
    assert_refused(result, reached, message, exit_code)


@pytest.mark.parametrize("args,message", [
    pytest.param(["submit"], "Missing option '--room'", id="submit without --room"),
    pytest.param(["dev", "agent.py"], "Got unexpected extra argument (agent.py)", id="dev given an agent"),
    pytest.param(["start", "--agent-name", "x"], ("No such option", "--agent-name"), id="start --agent-name"),
])
def test_an_agent_files_own_cli_refuses_bad_arguments_too(args, message):
    """``cli.run_app(opts)`` serves its own agent: no AGENT argument, no ``--agent-name``."""
    result, reached = invoke(args, opts=WorkerOptions(entrypoint_fnc=entrypoint, ws_url="", api_key="", api_secret=""))
    assert_refused(result, reached, message, USAGE)


def test_an_agent_file_with_a_sync_entrypoint_is_refused_before_serving(tmp_path):
    """An agent that cannot run is an ``InvalidAgent`` message, not a traceback from a worker."""
    agent = tmp_path / "sync_agent.py"
    agent.write_text(textwrap.dedent('''
        def entrypoint(ctx):  # not async
            return None
    '''))
    result, reached = invoke(["dev", str(agent)])
    assert_refused(result, reached, "InvalidAgent", REFUSED)
    assert "async def" in result.output


def test_a_bad_attribute_on_room_join_is_refused_before_ray_is_touched():
    """``--attribute`` without ``=`` is a usage error whether or not a cluster is reachable."""
    result, reached = invoke(["room", "join", "desk", "alice", "--attribute", "no-equals-sign"])
    assert_refused(result, reached, "'no-equals-sign' is not KEY=VALUE", USAGE)


# --------------------------------------------------------------------------- properties


@CLI_PROPERTIES
@given(st.text(TEXT, max_size=30) | st.builds(json.dumps, st.text(TEXT, max_size=10) | st.integers()))
@example("{not json")
@example('{"user_id": 7}')
@example("NaN")
@example("")
def test_submit_metadata_passes_validation_exactly_when_it_is_json(metadata):
    """``--metadata`` is checked as JSON before anything is sent: valid JSON goes on to the
    supervisor (here the stand-in), anything else is ``InvalidMetadata``."""
    try:
        json.loads(metadata)
        is_json = True
    except json.JSONDecodeError:
        is_json = False
    result, reached = invoke(["submit", "--room", "r", f"--metadata={metadata}"])
    assert result.exit_code == REFUSED and "Traceback" not in result.output
    if is_json:
        assert reached == ["connect"] and STAND_IN in result.output
    else:
        assert reached == [] and "InvalidMetadata" in result.output


@CLI_PROPERTIES
@given(st.text(st.characters(), max_size=MAX_ROOM_NAME_CHARS + 3))
@example("")
@example("r" * MAX_ROOM_NAME_CHARS)
@example("r" * (MAX_ROOM_NAME_CHARS + 1))
@example("\udcff")  # what an undecodable byte in argv becomes
def test_submit_room_passes_validation_exactly_when_it_is_a_valid_room_name(room):
    """``--room`` is validated as a ``JobSpec`` before connecting: 1 to 256 characters that
    UTF-8 can carry go on; anything else is ``InvalidJobSpec``."""
    try:
        room.encode("utf-8")
        valid = 1 <= len(room) <= MAX_ROOM_NAME_CHARS
    except UnicodeEncodeError:
        valid = False
    result, reached = invoke(["submit", f"--room={room}"])
    assert result.exit_code == REFUSED and "Traceback" not in result.output
    if valid:
        assert reached == ["connect"]
    else:
        assert reached == [] and "InvalidJobSpec" in result.output


@CLI_PROPERTIES
@given(st.lists(st.text(TEXT, max_size=8), min_size=1, max_size=4))
def test_set_attributes_passes_validation_exactly_when_every_pair_has_an_equals_sign(pairs):
    """``room set-attributes`` parses every KEY=VALUE before connecting; one pair without
    ``=`` is a usage error naming it."""
    result, reached = invoke(["room", "set-attributes", "desk", "alice", "--", *pairs])
    assert "Traceback" not in result.output
    if all("=" in pair for pair in pairs):
        assert result.exit_code == REFUSED and reached == ["local_rooms"]
    else:
        bad = next(pair for pair in pairs if "=" not in pair)
        assert result.exit_code == USAGE and reached == []
        assert f"{bad!r} is not KEY=VALUE" in result.output


# --------------------------------------------------------------------------- real processes


def test_main_refuses_an_unknown_subcommand(monkeypatch, capsys):
    """The console-script entry point exits with click's usage status and message."""
    monkeypatch.setattr(sys, "argv", ["rayvisor", "frobnicate"])
    with ray_stand_ins() as reached, pytest.raises(SystemExit) as exit_info:
        rayvisor.cli.main()
    assert exit_info.value.code == USAGE
    err = capsys.readouterr().err
    assert "No such command 'frobnicate'" in err and "Traceback" not in err
    assert reached == []


@pytest.mark.parametrize("args,message", [
    pytest.param(["frobnicate"], b"No such command 'frobnicate'", id="unknown subcommand"),
    pytest.param(["submit"], b"Missing option '--room'", id="submit without --room"),
    pytest.param(["room", "join", "desk"], b"Missing argument 'IDENTITY'", id="room join without identity"),
])
def test_python_m_rayvisor_refuses_bad_arguments_without_a_traceback(args, message):
    """``python -m rayvisor`` in its own process: non-zero exit, the message on stderr, no traceback."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # never any running cluster, should parsing regress
    proc = subprocess.run([sys.executable, "-m", "rayvisor", *args], capture_output=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == USAGE, proc.stderr
    assert message in proc.stderr
    assert b"Traceback" not in proc.stderr + proc.stdout
