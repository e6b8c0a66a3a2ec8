"""The ``rayvisor`` command and ``cli.run_app(opts)`` (``python agent.py dev|start|submit ...``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click
import ray
from livekit import rtc
from ray.util.annotations import RayDeprecationWarning

from . import logs
from .agent_loader import load_agent
from .agents.livekit_agents_options import as_rayvisor_options, convert
from .agents.options import WorkerOptions
from .errors import InvalidMetadata, RayvisorError, SupervisorUnavailable
from .messages import JobInfo, JobSpec, Transition
from .rooms.local import DEFAULT_NAMESPACE, LocalRooms
from .supervisor.client import Client, connect, local_rooms, serve

if TYPE_CHECKING:  # aiohttp's server and watchfiles load with dev/start only: agents import this module
    from .dev_reload import DevReloader

KINDS = {
    "standard": rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
    "sip": rtc.ParticipantKind.PARTICIPANT_KIND_SIP,
    "agent": rtc.ParticipantKind.PARTICIPANT_KIND_AGENT,
    "ingress": rtc.ParticipantKind.PARTICIPANT_KIND_INGRESS,
    "egress": rtc.ParticipantKind.PARTICIPANT_KIND_EGRESS,
}
EVENT_POLL_TIMEOUT = 1.0
"""How long one long-poll for lifecycle events waits in ``dev``/``start`` before re-polling."""
RAY_QUIET_LOGGING_LEVEL = logging.ERROR
"""Level of this process's ``ray`` logger without ``--verbose``: Ray's warnings (token auth
turned on, several local Rays found, ...) stay out of the CLI's output, Ray's errors do not."""
RAY_VERBOSE_LOGGING_LEVEL = logging.INFO
"""Level of this process's ``ray`` logger with ``--verbose``: Ray's own default."""


@dataclass(frozen=True)
class RayOutput:
    """How much of Ray's own output a command lets through (``rayvisor --verbose``).

    It configures Ray where Ray is configured, before Ray is started or attached to: the
    driver's ``ray`` logger through ``ray.init(logging_level=...)`` and Python's warning
    filters. Token auth and every other Ray setting are left as they are: only the text of
    Ray's warnings is hidden. Output forwarded from Ray workers (``dev``) is the jobs' own
    and is not touched.
    """

    verbose: bool = False

    @property
    def logging_level(self) -> int:
        return RAY_VERBOSE_LOGGING_LEVEL if self.verbose else RAY_QUIET_LOGGING_LEVEL

    def configure_warnings(self) -> None:
        """Without ``--verbose``, ignore Ray's deprecation warnings and any warning raised by
        Ray's own modules in this process (a filter, not a rewrite of its output)."""
        if not self.verbose:
            warnings.filterwarnings("ignore", category=RayDeprecationWarning)
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")


def _ray_output() -> RayOutput:
    """The running command's ``RayOutput`` (set by the ``rayvisor`` group from ``--verbose``)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(RayOutput) if ctx is not None else None
    return found if found is not None else RayOutput()


def _connect(address: str, namespace: str) -> Client:
    """``connect`` with Ray's logging set by ``--verbose`` (used when this call attaches)."""
    return connect(address, namespace=namespace, logging_level=_ray_output().logging_level)


def _local_rooms(address: str, namespace: str) -> LocalRooms:
    """``local_rooms`` with Ray's logging set by ``--verbose`` (used when this call attaches)."""
    return local_rooms(address, namespace=namespace, logging_level=_ray_output().logging_level)


# --------------------------------------------------------------------------- output


def format_transition(t: Transition) -> str:
    """One line per state transition, as ``dev`` and the demo print them."""
    clock = datetime.fromtimestamp(t.at).strftime("%H:%M:%S.%f")[:-3]
    parts = [f"{clock}  job {t.job_id}  {t.state.value:<13} room={t.room}"]
    if t.cause:
        parts.append(f"cause={t.cause.value}")
    if t.reason:
        parts.append(f"reason={t.reason!r}")
    if t.pid:
        parts.append(f"pid={t.pid}")
    if t.error:
        parts.append("error=" + t.error.strip().splitlines()[-1])
    return "  ".join(parts)


def format_info(info: JobInfo) -> str:
    cause = info.cause.value if info.cause else "-"
    return f"{info.id}  {info.state.value:<13} {cause:<18} room={info.room}  pid={info.pid or '-'}"


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@contextmanager
def _errors_as_messages() -> Iterator[None]:
    """Typed errors become a one-line message and a non-zero exit, never a traceback."""
    try:
        yield
    except RayvisorError as err:
        raise click.ClickException(f"{type(err).__name__}: {err}") from None
    except ConnectionError as err:
        raise click.ClickException(
            f"cannot reach a Ray cluster ({err}); start one with `rayvisor dev AGENT.py` or `ray start --head`; "
            "a cluster with token auth also needs RAY_AUTH_MODE=token and its token (~/.ray/auth_token) here"
        ) from None


def follow_lifecycle(client: Client, stop: threading.Event, emit: Callable[[str], None] = click.echo,
                     after_seq: int = -1) -> int:
    """Print every job transition as it happens until ``stop`` is set; returns the last seq."""
    while not stop.is_set():
        try:
            events = client.events(after_seq, timeout=EVENT_POLL_TIMEOUT)
        except SupervisorUnavailable:
            break
        for event in events:
            emit(format_transition(event))
            after_seq = event.seq
    return after_seq


# --------------------------------------------------------------------------- run modes


def _run_worker(opts: WorkerOptions, *, mode: str, address: str | None, namespace: str,
                ray_output: RayOutput = RayOutput(), http: bool = True, reloader: DevReloader | None = None) -> None:
    """``dev``/``start``: serve the agent and print the lifecycle. SIGINT, or a second
    SIGTERM, shuts every job down through the protocol at once; a first SIGTERM drains
    (no new jobs, running ones get ``drain_timeout``). Ray is stopped if we started it.
    ``http``: serve the health endpoint (``rayvisor.health``) on ``opts.host``/``opts.port``.
    ``reloader``: ``dev``'s hot reload (``rayvisor.dev_reload``), watching while the agent is served."""
    from .health import HealthServer

    logs.configure(mode)
    # Its port is bound first: a taken port fails here, before a supervisor is started.
    health = HealthServer.for_agent(opts, devmode=mode == "dev") if http else None
    started_ray = not ray.is_initialized() and address is None
    try:
        client = serve(opts, address=address, namespace=namespace, log_format="json" if mode == "start" else "text",
                       register_worker=opts.uses_livekit, logging_level=ray_output.logging_level)
    except BaseException:
        if health is not None:
            health.stop()
        raise
    stop = threading.Event()
    draining = threading.Event()

    def drain_then_stop() -> None:
        try:
            result = client.drain(timeout=opts.drain_timeout)
            click.echo(f"drained: {result.ended_on_their_own} jobs ended on their own, "
                       f"{result.shut_down} were shut down", err=True)
        except RayvisorError as err:
            click.echo(f"drain failed: {err}", err=True)
        stop.set()

    def on_signal(signum: int, _frame: Any) -> None:
        if signum == signal.SIGTERM and not draining.is_set():
            draining.set()
            click.echo(f"SIGTERM: draining for up to {opts.drain_timeout}s (send it again to stop at once)", err=True)
            threading.Thread(target=drain_then_stop, name="rayvisor-drain", daemon=True).start()
        else:
            stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    click.echo(f"rayvisor {mode}: agent {opts.agent_name or '(default)'} serving namespace {namespace!r}; "
               f"submit with `rayvisor submit --room ROOM`; Ctrl-C to stop", err=True)
    if opts.uses_livekit:
        click.echo(f"registering with LiveKit at {opts.ws_url} (jobs join LiveKit rooms; "
                   f"see `rayvisor worker-status`)", err=True)
    try:
        if health is not None:
            health.start(client)
            click.echo(f"health: {health.url}", err=True)
        if reloader is not None:
            reloader.start(client)
        follow_lifecycle(client, stop)
    finally:
        if reloader is not None:
            reloader.stop()  # no reload races the supervisor's removal
        click.echo("stopping: shutting jobs down through the protocol", err=True)
        if health is not None:
            health.stop()  # probes see the pod stopping (connection refused), not a half-removed supervisor
        client.stop()
        if started_ray:
            ray.shutdown()


def _parse_attributes(pairs: tuple[str, ...]) -> dict[str, str]:
    attributes = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        attributes[key] = value
    return attributes


def _check_json(metadata: str) -> str:
    try:
        json.loads(metadata)
    except json.JSONDecodeError as err:
        raise InvalidMetadata(f"--metadata must be JSON ({err}); use --raw-metadata for free-form text") from None
    return metadata


# --------------------------------------------------------------------------- commands


address_option = click.option("--address", default=None, help="Ray address (default: start a local Ray).")
namespace_option = click.option("--namespace", default=DEFAULT_NAMESPACE, show_default=True,
                                help="rayvisor namespace (one supervisor per namespace).")
attach_option = click.option("--address", default="auto", show_default=True, help="Ray address to attach to.")


def http_options(command: click.Command) -> click.Command:
    """``dev``/``start``'s health endpoint flags (they override ``WorkerOptions.host``/``port``)."""
    command = click.option("--http-host", default=None,
                           help="Interface of the health endpoint (default: the agent's host; \"\": every interface).")(command)
    command = click.option("--http-port", type=click.IntRange(0, 65535), default=None,
                           help="Port of the health endpoint, 0 for a free one (default: the agent's port, "
                                "else 8081 for start, a free port for dev).")(command)
    return click.option("--no-http", is_flag=True, help="Serve no health endpoint.")(command)


def with_http(opts: WorkerOptions, host: str | None, port: int | None) -> WorkerOptions:
    """``opts`` with the health endpoint's host and port given on the command line, if any."""
    given = {name: value for name, value in (("host", host), ("port", port)) if value is not None}
    return dataclasses.replace(opts, **given) if given else opts


def build_cli(opts: WorkerOptions | Any = None) -> click.Group:
    """The command group; with ``opts`` (``cli.run_app``) ``dev``/``start`` run that agent.
    ``opts`` may also be livekit-agents' ``WorkerOptions``/``ServerOptions`` or ``AgentServer``."""

    @click.group(help="Run LiveKit-Agents-style jobs on a Ray cluster.")
    @click.option("--verbose", is_flag=True,
                  help="Show Ray's own warnings and log lines (token auth, deprecations, ...); hidden by default.")
    @click.pass_context
    def group(ctx: click.Context, verbose: bool) -> None:
        ctx.obj = RayOutput(verbose=verbose)
        ctx.obj.configure_warnings()  # before any command starts or attaches to Ray

    def worker_command(mode: str, help_text: str) -> None:
        params = [] if opts is not None else [click.Argument(["agent"])]

        @click.pass_context
        def run(ctx: click.Context, address: str | None, namespace: str, agent: str | None = None,
                agent_name: str | None = None, http_host: str | None = None, http_port: int | None = None,
                no_http: bool = False, reload: bool = False) -> None:
            with _errors_as_messages():
                logs.configure(mode)  # before loading: warnings about ignored options use the mode's format
                devmode = mode == "dev"
                loaded = (as_rayvisor_options(opts, devmode=devmode) if opts is not None
                          else load_agent(agent or "", agent_name=agent_name, devmode=devmode))
                reloader = None
                if reload:
                    from .dev_reload import dev_reloader

                    reloader = dev_reloader(serving=loaded, target=agent, app=opts, agent_name=agent_name)
                _run_worker(with_http(loaded, http_host, http_port), mode=mode, address=address,
                            namespace=namespace, ray_output=_ray_output(), http=not no_http, reloader=reloader)

        command = click.Command(mode, callback=run, help=help_text, params=params)
        command = http_options(address_option(namespace_option(command)))
        if opts is None:
            command = click.option("--agent-name", default=None, help="Override the agent's name.")(command)
        if mode == "dev":  # LiveKit Agents' flag; only dev reloads, as there
            command = click.option("--reload/--no-reload", default=True, show_default=True,
                                   help="Reload the agent's code for new jobs when its .py files change.")(command)
        group.add_command(command)

    worker_command("dev", "Serve an agent with readable logs, printing each job's lifecycle.")
    worker_command("start", "Serve an agent in production mode (JSON logs).")

    @group.command(help="Submit a job to a room.")
    @click.option("--room", required=True, help="Room name (1-256 characters).")
    @click.option("--metadata", default=None, help="Job metadata, as JSON.")
    @click.option("--raw-metadata", default=None, help="Job metadata, any text.")
    @click.option("--agent-name", default=None, help="Agent to dispatch (if several are registered).")
    @click.option("--restart", type=click.Choice(["temporary", "transient", "permanent"]), default=None,
                  help="Override the agent's restart policy for this job.")
    @click.option("--wait", "wait_seconds", type=float, default=None, help="Wait this long for the job to end.")
    @attach_option
    @namespace_option
    def submit(room: str, metadata: str | None, raw_metadata: str | None, agent_name: str | None,
               restart: str | None, wait_seconds: float | None, address: str, namespace: str) -> None:
        with _errors_as_messages():
            if metadata is not None and raw_metadata is not None:
                raise click.UsageError("give --metadata or --raw-metadata, not both")
            text = _check_json(metadata) if metadata is not None else (raw_metadata or "")
            if opts is not None and agent_name is None:
                agent_name = convert(opts).options.agent_name  # quietly: this command does not serve it
            spec = JobSpec(room=room, metadata=text, agent_name=agent_name, restart=restart)
            client = _connect(address, namespace)
            job_id = client.submit(spec)
            click.echo(job_id)
            if wait_seconds is not None:
                click.echo(format_info(client.wait(job_id, timeout=wait_seconds)))

    @group.command(help="List jobs.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @attach_option
    @namespace_option
    def jobs(as_json: bool, address: str, namespace: str) -> None:
        with _errors_as_messages():
            infos = _connect(address, namespace).list()
            if as_json:
                _echo_json([i.model_dump(mode="json") for i in infos])
            else:
                for info in infos:
                    click.echo(format_info(info))

    @group.command(help="Show one job's record.")
    @click.argument("job_id")
    @attach_option
    @namespace_option
    def status(job_id: str, address: str, namespace: str) -> None:
        with _errors_as_messages():
            _echo_json(_connect(address, namespace).status(job_id).model_dump(mode="json"))

    @group.command(help="Shut a job down through the shutdown protocol.")
    @click.argument("job_id")
    @click.option("--reason", default="", help="Reason passed to shutdown callbacks.")
    @click.option("--wait", "wait_seconds", type=float, default=None, help="Wait this long for the job to end.")
    @attach_option
    @namespace_option
    def shutdown(job_id: str, reason: str, wait_seconds: float | None, address: str, namespace: str) -> None:
        with _errors_as_messages():
            client = _connect(address, namespace)
            info = client.shutdown(job_id, reason=reason)
            if wait_seconds is not None:
                info = client.wait(job_id, timeout=wait_seconds)
            click.echo(format_info(info))

    @group.command(help="Stop admitting jobs, let running ones end, shut the rest down at the deadline.")
    @click.option("--timeout", type=float, default=600.0, show_default=True,
                  help="Seconds running jobs may keep going before they are shut down.")
    @attach_option
    @namespace_option
    def drain(timeout: float, address: str, namespace: str) -> None:
        with _errors_as_messages():
            result = _connect(address, namespace).drain(timeout=timeout)
            click.echo(f"drained: {result.ended_on_their_own} ended on their own, {result.shut_down} shut down")

    @group.command("worker-status", help="The agent's LiveKit worker registration (state, worker id, last error).")
    @click.option("--agent-name", default=None, help="Agent (if several are registered).")
    @attach_option
    @namespace_option
    def worker_status(agent_name: str | None, address: str, namespace: str) -> None:
        with _errors_as_messages():
            _echo_json(_connect(address, namespace).worker_status(agent_name).model_dump(mode="json"))

    @group.command(help="The supervisor's counters, gauges and latency summaries.")
    @attach_option
    @namespace_option
    def metrics(address: str, namespace: str) -> None:
        with _errors_as_messages():
            _echo_json(_connect(address, namespace).metrics().model_dump(mode="json"))

    @group.group(help="Simulated participants in the local room backend.")
    def room() -> None:
        pass

    @room.command("join", help="Join ROOM as IDENTITY (stays until `room leave`).")
    @click.argument("room_name")
    @click.argument("identity")
    @click.option("--kind", type=click.Choice(sorted(KINDS)), default="standard", show_default=True)
    @click.option("--attribute", "attributes", multiple=True, help="KEY=VALUE (repeatable).")
    @click.option("--metadata", default="", help="Participant metadata.")
    @attach_option
    @namespace_option
    def room_join(room_name: str, identity: str, kind: str, attributes: tuple[str, ...], metadata: str,
                  address: str, namespace: str) -> None:
        with _errors_as_messages():
            parsed = _parse_attributes(attributes)  # before connecting: a typo is not "Ray unreachable"
            _local_rooms(address, namespace).join(
                room_name, identity, kind=KINDS[kind], attributes=parsed, metadata=metadata)
            click.echo(f"{identity} joined {room_name}")

    @room.command("leave", help="IDENTITY leaves ROOM.")
    @click.argument("room_name")
    @click.argument("identity")
    @attach_option
    @namespace_option
    def room_leave(room_name: str, identity: str, address: str, namespace: str) -> None:
        with _errors_as_messages():
            _local_rooms(address, namespace).participant(room_name, identity).leave()
            click.echo(f"{identity} left {room_name}")

    @room.command("set-attributes", help="Set IDENTITY's attributes (KEY=VALUE ...; empty value deletes).")
    @click.argument("room_name")
    @click.argument("identity")
    @click.argument("pairs", nargs=-1, required=True)
    @attach_option
    @namespace_option
    def room_set_attributes(room_name: str, identity: str, pairs: tuple[str, ...], address: str,
                            namespace: str) -> None:
        with _errors_as_messages():
            attributes = _parse_attributes(pairs)
            participant = _local_rooms(address, namespace).participant(room_name, identity)
            participant.set_attributes(attributes)

    @room.command("send", help="IDENTITY sends TEXT to the room.")
    @click.argument("room_name")
    @click.argument("identity")
    @click.argument("text")
    @click.option("--topic", default="", help="Text stream topic.")
    @attach_option
    @namespace_option
    def room_send(room_name: str, identity: str, text: str, topic: str, address: str, namespace: str) -> None:
        with _errors_as_messages():
            _local_rooms(address, namespace).participant(room_name, identity).send_text(text, topic=topic)

    @room.command("messages", help="What IDENTITY received: SENDER [TOPIC] TEXT per line.")
    @click.argument("room_name")
    @click.argument("identity")
    @attach_option
    @namespace_option
    def room_messages(room_name: str, identity: str, address: str, namespace: str) -> None:
        with _errors_as_messages():
            for sender, topic, payload in _local_rooms(address, namespace).participant(
                    room_name, identity).messages():
                click.echo(f"{sender} [{topic}] {payload!r}" if isinstance(payload, bytes) else f"{sender} [{topic}] {payload}")

    @room.command("participants", help="List ROOM's participants.")
    @click.argument("room_name")
    @attach_option
    @namespace_option
    def room_participants(room_name: str, address: str, namespace: str) -> None:
        with _errors_as_messages():
            for info in _local_rooms(address, namespace).participants(room_name):
                kind = rtc.ParticipantKind.Name(info.kind).removeprefix("PARTICIPANT_KIND_").lower()
                click.echo(f"{info.identity}  kind={kind}  attributes={info.attributes}")

    @room.command("delete", help="Delete ROOM (disconnects everyone; its jobs end with room_deleted).")
    @click.argument("room_name")
    @attach_option
    @namespace_option
    def room_delete(room_name: str, address: str, namespace: str) -> None:
        with _errors_as_messages():
            _local_rooms(address, namespace).delete_room(room_name)

    @group.command(help="Run a built-in simulated session on a local Ray and exit: `lifecycle`, three "
                        "support-desk jobs ending three ways; `voice`, a text conversation with the LiveKit "
                        "Agents voice agent examples/voice_agent.py (needs `pip install -e '.[agents]'`).")
    @click.option("--scenario", type=click.Choice(["lifecycle", "voice"]), default="lifecycle", show_default=True,
                  help="Which session to run.")
    @click.option("--shutdown-timeout", type=float, default=1.0, show_default=True,
                  help="Shutdown budget of the lifecycle demo's misbehaving job.")
    def demo(scenario: str, shutdown_timeout: float) -> None:
        with _errors_as_messages():
            if scenario == "voice":
                from .voice_demo import run_voice_demo

                sys.exit(run_voice_demo(ray_logging_level=_ray_output().logging_level))
            from .demo import run_demo

            sys.exit(run_demo(hang_budget=shutdown_timeout, ray_logging_level=_ray_output().logging_level))

    return group


def run_app(opts: WorkerOptions | Any) -> None:
    """``python agent.py dev|start|submit|jobs|status|shutdown|room ...`` for this agent
    (rayvisor ``WorkerOptions``, or livekit-agents' ``WorkerOptions``/``ServerOptions``/``AgentServer``)."""
    build_cli(opts)(prog_name=sys.argv[0] if sys.argv else "agent")


def main() -> None:
    """Entry point of the ``rayvisor`` console script."""
    logging.basicConfig(level=logging.WARNING)
    build_cli()(prog_name="rayvisor")


if __name__ == "__main__":
    main()
