"""The HTTP health endpoint of ``rayvisor dev``/``start``, as LiveKit Agents' worker serves it.

Served from the driver process (what a Kubernetes probe reaches), on aiohttp in a thread
of its own with its own event loop, so neither the CLI's main thread nor Ray's calls can
stall it, and it cannot stall them. The routes and codes are LiveKit Agents' (1.x,
``AgentServer.run``):

- ``GET /``: 200 ``OK`` while the supervisor answers within ``health_check_timeout`` and,
  for an agent served through LiveKit, its worker registration is up; otherwise 503 with a
  one-line reason. Draining is healthy (a liveness probe must not kill a draining pod).
- ``GET /worker``: JSON about the worker (LiveKit Agents' ``WorkerInfo`` keys and a few
  more, see ``worker_info``); 503 with ``{"healthy": false, "error": ...}`` when the
  supervisor does not answer.

The socket is bound when the server is built, before anything is served: a port that is
taken fails with ``HealthServerError`` before a supervisor is started.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import importlib.metadata
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from .agents.options import WorkerOptions
from .errors import HealthServerError
from .messages import BridgeState, SupervisorHealth

logger = logging.getLogger("rayvisor.health")

WORKER_TYPE = "JT_ROOM"
"""``/worker``'s ``worker_type``: LiveKit Agents writes ``agent.JobType.Name(...)``; rayvisor runs room jobs only."""
PROJECT_TYPE = "python"
HEALTH_CALL_SLACK = 1.0
"""Seconds a probe waits past ``health_check_timeout`` for the client's own deadline to fire
before answering 503 itself (a bound on the bound)."""
PROBE_THREADS = 4
"""Threads running the blocking supervisor calls of concurrent probes; probes beyond wait their turn."""
SHUTDOWN_GRACE = 1.0
"""Seconds ``stop`` lets in-flight probes finish before cancelling them."""
START_TIMEOUT = 5.0
"""Bound on ``start``: the server accepts requests within this long or ``HealthServerError``."""
STOP_TIMEOUT = 5.0
"""Bound on ``stop``: past it the server thread (a daemon) is abandoned with a warning."""
ALL_INTERFACES = ("", "0.0.0.0", "::")


class HealthSource(Protocol):
    """What the endpoint asks: ``rayvisor.Client.health`` (a fake in tests)."""

    def health(self, agent_name: str | None = None, *, with_load: bool = False,
               timeout: float | None = None) -> SupervisorHealth: ...


@dataclass(frozen=True)
class Verdict:
    """``GET /``'s answer: healthy or not, and the text it sends ("OK", or why not)."""

    healthy: bool
    reason: str

    @property
    def status(self) -> int:
        return 200 if self.healthy else 503


def health_verdict(report: SupervisorHealth | BaseException, *, uses_livekit: bool) -> Verdict:
    """Healthy when the supervisor answered (``report`` is its answer, or the error its call
    raised) and, for an agent served through LiveKit, its registration is ``REGISTERED``."""
    if isinstance(report, BaseException):
        lines = str(report).strip().splitlines()  # Ray's errors run to a dozen lines: the first says it
        return Verdict(False, f"supervisor unavailable: {lines[0] if lines else type(report).__name__}")
    if uses_livekit and report.livekit_state != BridgeState.REGISTERED:
        state = report.livekit_state.value if report.livekit_state is not None else "none"
        return Verdict(False, f"livekit worker not registered: state={state}")
    return Verdict(True, "OK")


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def worker_info(report: SupervisorHealth, verdict: Verdict) -> dict[str, Any]:
    """``/worker``'s JSON: LiveKit Agents' keys (agent_name, worker_type, active_jobs,
    worker_load, sdk_version) and draining, worker_id, livekit_state, healthy.

    ``worker_load`` is the load the worker bridge reports to LiveKit: ``load_fnc`` if the
    agent has one, else live jobs over capacity (``max_jobs``, else the cluster's
    ``rayvisor_slot``s), 1.0 when a job would be refused. ``active_jobs`` counts the
    supervisor's non-terminal jobs (every agent's, as the job count sent to LiveKit)."""
    from . import __version__

    info: dict[str, Any] = {
        "agent_name": report.agent_name, "worker_type": WORKER_TYPE, "active_jobs": report.active_jobs,
        "worker_load": report.worker_load if report.worker_load is not None else 0.0, "full": report.full,
        "draining": report.draining, "worker_id": report.worker_id,
        "livekit_state": report.livekit_state.value if report.livekit_state is not None else None,
        "sdk_version": __version__, "project_type": PROJECT_TYPE, "healthy": verdict.healthy,
    }
    livekit_agents = _installed_version("livekit-agents")
    if livekit_agents is not None:
        info["livekit_agents_version"] = livekit_agents
    if not verdict.healthy:
        info["error"] = verdict.reason
    return info


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port; "": every interface, IPv6 and
    IPv4 on one socket where the system can, so one port is reported). ``HealthServerError``
    if it cannot be had."""
    try:
        if host == "":
            if socket.has_dualstack_ipv6():
                try:
                    return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
                except OSError as err:
                    if err.errno == errno.EADDRINUSE:
                        raise
                    # IPv6 turned off in this container: IPv4 only, below
            return socket.create_server(("0.0.0.0", port))
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as err:
        where = f"{host or '*'}:{port}"
        raise HealthServerError(
            f"cannot serve the health endpoint on {where}: {err.strerror or err}; choose another port with "
            "--http-port (0: any free port) or WorkerOptions(port=...), or turn the endpoint off with --no-http"
        ) from None


class HealthServer:
    """``GET /`` and ``GET /worker`` for one agent, from a thread of its own.

    Built (and its port bound) before the supervisor is served; ``start(source)`` serves
    with the supervisor's client; ``stop()`` is bounded and idempotent. Usable as a context
    manager that stops it."""

    def __init__(self, *, host: str, port: int, agent_name: str, uses_livekit: bool, timeout: float,
                 load_timeout: float = 0.0) -> None:
        self._sock = bind(host, port)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._agent_name = agent_name
        self._uses_livekit = uses_livekit
        self._timeout = timeout
        self._load_timeout = load_timeout
        self._source: HealthSource | None = None
        self._executor = ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="rayvisor-health-probe")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @classmethod
    def for_agent(cls, opts: WorkerOptions, *, devmode: bool) -> HealthServer:
        """The endpoint ``dev`` (``devmode``) or ``start`` serves for ``opts``: its ``host``,
        its ``port`` (or the mode's default) and its ``health_check_timeout``."""
        return cls(host=opts.host, port=opts.http_port(devmode=devmode), agent_name=opts.agent_name,
                   uses_livekit=opts.uses_livekit, timeout=opts.health_check_timeout,
                   load_timeout=opts.load_timeout if opts.load_fnc is not None else 0.0)

    @property
    def url(self) -> str:
        """The endpoint's base url (``localhost`` when bound to every interface)."""
        host = "localhost" if self.host in ALL_INTERFACES else self.host
        return f"http://[{host}]:{self.port}/" if ":" in host else f"http://{host}:{self.port}/"

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, source: HealthSource) -> None:
        """Serve, asking ``source``; returns once the server accepts requests."""
        if self._thread is not None:
            raise RuntimeError("HealthServer already started")
        self._source = source
        ready = threading.Event()
        failure: list[BaseException] = []
        # Made here, before the thread, so that ``stop`` can always reach them.
        loop = self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()

        def run() -> None:
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as err:  # reported to start(), or logged once serving
                failure.append(err)
                if ready.is_set():
                    logger.exception("the health endpoint stopped")
            finally:
                ready.set()
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="rayvisor-health", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT) or failure:
            self.stop()
            raise HealthServerError(f"the health endpoint did not start: {failure[0] if failure else 'timed out'}")

    def stop(self) -> None:
        """Stop serving (in-flight probes get ``SHUTDOWN_GRACE``) and close the socket; never
        waits longer than ``STOP_TIMEOUT``."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the loop already closed
        if thread is not None:
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                logger.warning("the health endpoint did not stop within %ss; abandoning its thread", STOP_TIMEOUT)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._sock.close()

    async def _serve(self, ready: threading.Event) -> None:
        assert self._stop is not None
        app = web.Application()
        app.add_routes([web.get("/", self._health), web.get("/worker", self._worker)])
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        try:
            await web.SockSite(runner, self._sock).start()
            ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    # -- routes ---------------------------------------------------------------------------

    async def _ask(self, *, with_load: bool) -> SupervisorHealth | BaseException:
        """The supervisor's report, or the error that stood in for it; the blocking Ray call
        runs on a probe thread, bounded by ``health_check_timeout`` (plus ``load_timeout`` when
        the load is asked for: the supervisor runs ``load_fnc`` for it)."""
        assert self._source is not None
        timeout = self._timeout + (self._load_timeout if with_load else 0.0)
        call = functools.partial(self._source.health, self._agent_name, with_load=with_load, timeout=timeout)
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._executor, call),
                                          timeout + HEALTH_CALL_SLACK)
        except asyncio.TimeoutError:
            load = f" + load_timeout={self._load_timeout}s" if with_load and self._load_timeout else ""
            return TimeoutError(f"no answer within health_check_timeout={self._timeout}s{load}")
        except Exception as err:
            return err

    async def _health(self, _request: web.Request) -> web.Response:
        try:
            verdict = health_verdict(await self._ask(with_load=False), uses_livekit=self._uses_livekit)
        except Exception as err:  # a bug here must still answer
            logger.exception("health check failed")
            verdict = Verdict(False, f"health check failed: {type(err).__name__}: {err}")
        return web.Response(status=verdict.status, text=verdict.reason)

    async def _worker(self, _request: web.Request) -> web.Response:
        try:
            report = await self._ask(with_load=True)
            verdict = health_verdict(report, uses_livekit=self._uses_livekit)
            if isinstance(report, BaseException):
                return web.json_response({"healthy": False, "error": verdict.reason}, status=503)
            return web.json_response(worker_info(report, verdict))
        except Exception as err:
            logger.exception("/worker failed")
            return web.json_response({"healthy": False, "error": f"{type(err).__name__}: {err}"}, status=503)
