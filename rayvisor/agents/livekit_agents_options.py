"""Serve agents written for LiveKit Agents as they are.

``as_rayvisor_options`` turns livekit-agents' ``WorkerOptions``/``ServerOptions`` or an
``AgentServer`` (with its ``@server.rtc_session()`` entrypoint) into rayvisor's
``WorkerOptions``. livekit-agents is imported only when one of its objects is given, so
rayvisor runs without it installed.

An option with a rayvisor counterpart keeps its value (livekit's defaults included, so a
job behaves as it did under LiveKit Agents, e.g. a 10 s ``shutdown_process_timeout``).
One without a counterpart is ignored with a logged warning when it was set to anything but
livekit's default, or refused with ``InvalidAgent`` when ignoring it would change which
jobs the agent runs (``worker_type=ServerType.PUBLISHER``).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidAgent
from .options import WorkerOptions, WorkerPermissions
from .request import LoadInfo

logger = logging.getLogger("rayvisor.livekit_agents")

LIVEKIT_AGENTS_PACKAGE = "livekit.agents"

SAME_MEANING = ("shutdown_process_timeout", "initialize_process_timeout", "job_memory_warn_mb",
                "job_memory_limit_mb", "drain_timeout")
"""livekit-agents options whose value rayvisor takes as is, under the same name."""

CREDENTIALS = ("ws_url", "api_key", "api_secret")
"""Taken when given; otherwise rayvisor reads ``LIVEKIT_URL``/``..._API_KEY``/``..._API_SECRET`` as livekit does."""

_NO_PROMETHEUS = "rayvisor's metrics are read with `rayvisor metrics` / client.metrics()"

IGNORED: dict[str, str] = {
    "job_executor_type": "every job runs in its own Ray actor process (as JobExecutorType.PROCESS)",
    "session_end_timeout": "rayvisor does not run on_session_end; shutdown_process_timeout bounds the whole shutdown",
    "on_session_end": "rayvisor does not run it; register that code with ctx.add_shutdown_callback instead",
    "on_simulation_end": "rayvisor has no simulation mode",
    "max_retry": "rayvisor reconnects to LiveKit without limit, with backoff "
                 "(reconnect_initial_delay, reconnect_max_delay)",
    "log_level": "`rayvisor dev` logs readable text and `rayvisor start` JSON; set levels with Python's logging",
    "http_proxy": "rayvisor has no proxy setting for its LiveKit connections",
    "multiprocessing_context": "jobs run in Ray actors, not multiprocessing children",
    "preload_modules": "jobs run in Ray actors; import heavy modules in prewarm_fnc (the warm pool runs it ahead)",
    "prometheus_port": _NO_PROMETHEUS,
    "prometheus_multiproc_dir": _NO_PROMETHEUS,
}
"""livekit-agents options with no rayvisor counterpart: a warning (with this reason) when set."""

MAPPED = frozenset({"entrypoint_fnc", "prewarm_fnc", "request_fnc", "load_fnc", "load_threshold", "agent_name",
                    "num_idle_processes", "permissions", "worker_type", "host", "port", *SAME_MEANING, *CREDENTIALS})
"""livekit-agents options this module maps (or refuses) explicitly."""

_RTC_SESSION_DEFAULTS: dict[str, Any] = {"entrypoint_fnc": None, "request_fnc": None, "on_session_end": None,
                                         "on_simulation_end": None, "agent_name": ""}
"""What ``AgentServer.rtc_session`` records, before it is called."""

_SERVER_ATTRIBUTES = {"prewarm_fnc": "_setup_fnc", "multiprocessing_context": "_mp_ctx_str",
                      "entrypoint_fnc": "_entrypoint_fnc", "request_fnc": "_request_fnc",
                      "on_session_end": "_session_end_fnc", "on_simulation_end": "_simulation_end_fnc",
                      "agent_name": "_agent_name", "worker_type": "_server_type"}
"""Where an ``AgentServer`` keeps an option (any other ``name`` is kept in ``_name``)."""

_ABSENT = object()


# --------------------------------------------------------------------------- public


@dataclass(frozen=True)
class Conversion:
    """rayvisor options converted from a livekit-agents object, and what was ignored."""

    options: WorkerOptions
    warnings: tuple[str, ...] = ()


def is_livekit_agents_server(obj: object) -> bool:
    """Whether ``obj`` is a livekit-agents ``WorkerOptions``/``ServerOptions`` or ``AgentServer``
    (or a subclass's instance); livekit-agents is imported only if ``obj``'s type derives from
    one of its classes."""
    if not any(_from_livekit_agents(cls) for cls in type(obj).__mro__):
        return False
    from livekit.agents import worker

    return isinstance(obj, (worker.ServerOptions, worker.AgentServer))


def _from_livekit_agents(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module == LIVEKIT_AGENTS_PACKAGE or module.startswith(LIVEKIT_AGENTS_PACKAGE + ".")


def convert(obj: object, *, devmode: bool = False) -> Conversion:
    """rayvisor ``WorkerOptions`` for ``obj`` (returned unchanged if it already is one), with
    the warnings about livekit-agents options rayvisor ignores. ``devmode`` picks the
    ``dev_default`` of a livekit ``ServerEnvOption`` (``rayvisor dev``), else ``prod_default``."""
    if isinstance(obj, WorkerOptions):
        return Conversion(obj)
    if not is_livekit_agents_server(obj):
        raise InvalidAgent(
            "expected rayvisor WorkerOptions, or livekit-agents WorkerOptions/ServerOptions/AgentServer; "
            f"got {type(obj).__module__}.{type(obj).__qualname__}"
        )
    settings = _settings_of(obj)
    _refuse_unsupported(settings)
    warnings = (*_ignored(settings), *_unused_load_threshold(settings))
    kwargs = {**_functions(settings), **_same_meaning(settings), **_credentials(settings),
              **_load(settings, devmode), **_pool(settings, devmode), **_http(settings, devmode),
              "permissions": _permissions(settings.values["permissions"])}
    try:
        # written for LiveKit Agents: its code finds its job with get_job_context(), wherever it lives
        return Conversion(WorkerOptions(**kwargs, livekit_agents_context=True), warnings)
    except InvalidAgent as err:
        raise InvalidAgent(f"livekit-agents {settings.kind}: {err}") from None


def as_rayvisor_options(obj: object, *, devmode: bool = False) -> WorkerOptions:
    """``convert``'s options, each ignored livekit-agents option logged as a warning."""
    conversion = convert(obj, devmode=devmode)
    for warning in conversion.warnings:
        logger.warning(warning)
    return conversion.options


# --------------------------------------------------------------------------- reading livekit's objects


@dataclass(frozen=True)
class _Settings:
    """A livekit-agents object's options by ``ServerOptions`` field name, with livekit's defaults."""

    kind: str
    values: dict[str, Any]
    defaults: dict[str, Any]

    def is_set(self, name: str) -> bool:
        """Whether the option differs from livekit's default (an empty value counts as unset)."""
        value, default = self.values.get(name, _ABSENT), self.defaults.get(name, _ABSENT)
        if value is _ABSENT or value is default or (_blank(value) and _blank(default)):
            return False
        try:
            return bool(value != default)
        except Exception:  # an __eq__ that cannot compare: take it as set
            return True


def _blank(value: object) -> bool:
    from livekit.agents.types import NOT_GIVEN

    return value is None or value is NOT_GIVEN or value == "" or value == []


def _settings_of(obj: object) -> _Settings:
    from livekit.agents import worker

    if isinstance(obj, worker.AgentServer):
        return _server_settings(obj)
    return _options_settings(obj)


def _options_settings(opts: Any) -> _Settings:
    """A ``ServerOptions`` (alias ``WorkerOptions``): its fields, and ``agent_name`` resolved
    from the environment as ``AgentServer.rtc_session`` resolves it."""
    values = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    defaults = {f.name: _field_default(f) for f in dataclasses.fields(opts)}
    values["agent_name"] = _livekit_agent_name(values.get("agent_name") or "")
    return _Settings(kind=type(opts).__name__, values=values, defaults=defaults)


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _ABSENT


def _livekit_agent_name(given: str) -> str:
    """The name livekit-agents registers: ``LIVEKIT_AGENT_NAME_OVERRIDE``, else the one given,
    else ``LIVEKIT_AGENT_NAME``."""
    return os.environ.get("LIVEKIT_AGENT_NAME_OVERRIDE") or given or os.environ.get("LIVEKIT_AGENT_NAME") or ""


def _server_settings(server: Any) -> _Settings:
    """An ``AgentServer``: its constructor's options and what ``rtc_session`` recorded."""
    from livekit.agents.worker import AgentServer

    defaults = {("prewarm_fnc" if name == "setup_fnc" else name): p.default
                for name, p in inspect.signature(AgentServer.__init__).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    defaults.update(_RTC_SESSION_DEFAULTS, worker_type=_room_type())
    values = {name: getattr(server, _SERVER_ATTRIBUTES.get(name, "_" + name), _ABSENT) for name in defaults}
    if values.get("http_proxy") == (os.environ.get("HTTPS_PROXY") or os.environ.get("HTTP_PROXY")):
        values["http_proxy"] = defaults.get("http_proxy")  # read from the environment, not set in code
    if values["entrypoint_fnc"] in (None, _ABSENT):
        raise InvalidAgent("the AgentServer has no entrypoint: decorate one with @server.rtc_session()")
    return _Settings(kind="AgentServer", values=values, defaults=defaults)


def _room_type() -> Any:
    from livekit.agents.worker import ServerType

    return ServerType.ROOM


def _env_value(value: Any, devmode: bool) -> Any:
    """A livekit ``ServerEnvOption``'s value for the mode; any other value as is."""
    from livekit.agents.worker import ServerEnvOption

    return ServerEnvOption.getvalue(value, devmode)


def _livekit_default_functions() -> list[Any]:
    """livekit-agents' own prewarm, request and load functions (the "not given" values)."""
    from livekit.agents import worker

    names = ("_default_setup_fnc", "_default_request_fnc")
    found = [getattr(worker, name, None) for name in names]
    load_calc = getattr(worker, "_DefaultLoadCalc", None)
    return [f for f in [*found, getattr(load_calc, "get_load", None)] if f is not None]


def _user_function(value: Any) -> Any:
    """``value`` unless it is unset or one of livekit's defaults (then None)."""
    if value is None or value is _ABSENT or any(value == f for f in _livekit_default_functions()):
        return None
    return value


# --------------------------------------------------------------------------- the mapping


def _refuse_unsupported(settings: _Settings) -> None:
    if settings.is_set("worker_type"):
        raise InvalidAgent(
            f"livekit-agents {settings.kind}: worker_type={settings.values['worker_type']!r} is not supported: "
            "rayvisor runs room jobs only (one per room, JT_ROOM); a publisher agent (JT_PUBLISHER) "
            "would run once per room instead of once per publisher"
        )


def _ignored(settings: _Settings) -> Iterator[str]:
    """A warning per option without a rayvisor counterpart that is set to a non-default value."""
    for name, value in settings.values.items():
        if name in MAPPED or not settings.is_set(name):
            continue
        reason = IGNORED.get(name, "rayvisor has no counterpart")
        yield f"livekit-agents {settings.kind} option {name}={value!r} is ignored: {reason}"


def _functions(settings: _Settings) -> dict[str, Any]:
    values = settings.values
    return {"entrypoint_fnc": values["entrypoint_fnc"], "prewarm_fnc": _user_function(values["prewarm_fnc"]),
            "request_fnc": _user_function(values["request_fnc"]), "agent_name": values["agent_name"] or ""}


def _same_meaning(settings: _Settings) -> dict[str, Any]:
    return {name: settings.values[name] for name in SAME_MEANING if settings.values.get(name, _ABSENT) is not _ABSENT}


def _credentials(settings: _Settings) -> dict[str, str]:
    return {name: settings.values[name] for name in CREDENTIALS if settings.values.get(name)}


def _unused_load_threshold(settings: _Settings) -> Iterator[str]:
    """A warning for a ``load_threshold`` set without a ``load_fnc`` (livekit's default load,
    this host's CPU, is not carried over)."""
    if _user_function(settings.values["load_fnc"]) is None and settings.is_set("load_threshold"):
        yield (f"livekit-agents {settings.kind} option load_threshold={settings.values['load_threshold']!r} "
               "is ignored: without a load_fnc rayvisor admits jobs by max_jobs and Ray resources, "
               "not by this host's CPU load")


def _load(settings: _Settings, devmode: bool) -> dict[str, Any]:
    """``load_fnc`` adapted to rayvisor's call (see ``LivekitLoadFnc``), with its threshold.
    A threshold above 1 (``inf``: never full, livekit's ``dev`` default) becomes rayvisor's 1
    with the load divided by it: the same loads are refused."""
    fnc = _user_function(settings.values["load_fnc"])
    if fnc is None:
        return {}
    threshold = _env_value(settings.values["load_threshold"], devmode)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise InvalidAgent(f"livekit-agents {settings.kind}: load_threshold must be a positive number, got {threshold!r}")
    scale = float(threshold) if threshold > 1 else 1.0
    return {"load_fnc": LivekitLoadFnc(fnc, takes_worker=_takes_argument(fnc), scale=scale),
            "load_threshold": min(float(threshold), 1.0)}


def _takes_argument(fnc: Callable[..., Any]) -> bool:
    """Whether livekit would call ``fnc(worker)`` rather than ``fnc()`` (it looks at the signature)."""
    try:
        return len(inspect.signature(fnc).parameters) > 0
    except (TypeError, ValueError):
        return True


def _pool(settings: _Settings, devmode: bool) -> dict[str, int]:
    """``num_idle_processes`` as the warm pool's floor (and a ceiling at least that high);
    0 turns the pool off. Unset: rayvisor's pool defaults."""
    if not settings.is_set("num_idle_processes"):
        return {}
    count = _env_value(settings.values["num_idle_processes"], devmode)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InvalidAgent(f"livekit-agents {settings.kind}: num_idle_processes must be a non-negative integer, "
                           f"got {count!r}")
    ceiling = max(count, _rayvisor_default("max_idle_actors")) if count else 0
    return {"num_idle_actors": count, "max_idle_actors": ceiling}


def _http(settings: _Settings, devmode: bool) -> dict[str, Any]:
    """``host`` and ``port`` of the health endpoint, as given; a ``ServerEnvOption`` port is
    resolved for the mode. Unset: rayvisor's defaults, which are livekit's (every interface;
    8081 in ``start``, a free port in ``dev``)."""
    http: dict[str, Any] = {}
    if settings.is_set("host"):
        http["host"] = settings.values["host"]
    if settings.is_set("port"):
        http["port"] = _env_value(settings.values["port"], devmode)
    return http


def _rayvisor_default(name: str) -> Any:
    return WorkerOptions.__dataclass_fields__[name].default


def _permissions(permissions: Any) -> WorkerPermissions:
    """livekit's ``WorkerPermissions`` (track sources as ``TrackSource`` numbers) as rayvisor's
    (track sources by lower-case name, e.g. ``"microphone"``)."""
    if isinstance(permissions, WorkerPermissions):
        return permissions
    from livekit.agents.worker import WorkerPermissions as LivekitPermissions

    if not isinstance(permissions, LivekitPermissions):
        raise InvalidAgent(f"permissions must be a livekit.agents.WorkerPermissions, got {type(permissions).__name__}")
    return WorkerPermissions(
        can_publish=bool(permissions.can_publish), can_subscribe=bool(permissions.can_subscribe),
        can_publish_data=bool(permissions.can_publish_data),
        can_update_metadata=bool(permissions.can_update_metadata),
        can_publish_sources=[_track_source_name(s) for s in permissions.can_publish_sources],
        hidden=bool(permissions.hidden))


def _track_source_name(source: Any) -> str:
    if isinstance(source, str):
        return source.lower()
    from livekit.protocol import models

    try:
        return models.TrackSource.Name(int(source)).lower()
    except (TypeError, ValueError):
        raise InvalidAgent(f"permissions.can_publish_sources: {source!r} is not a TrackSource") from None


# --------------------------------------------------------------------------- load_fnc


class ActiveJobs:
    """``worker.active_jobs`` for a livekit ``load_fnc``: its ``len()`` is the number of live jobs;
    the jobs themselves are not available."""

    def __init__(self, count: int) -> None:
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Any]:
        raise TypeError("under rayvisor, load_fnc's worker.active_jobs supports len() only")

    def __repr__(self) -> str:
        return f"ActiveJobs({self._count})"


class WorkerView:
    """What a livekit ``load_fnc(worker)`` gets under rayvisor in place of the ``AgentServer``:
    ``len(worker.active_jobs)``, ``worker.max_jobs``, ``worker.idle_actors`` and ``worker.info``
    (the ``LoadInfo``)."""

    def __init__(self, info: LoadInfo) -> None:
        self.info = info
        self.active_jobs = ActiveJobs(info.active_jobs)
        self.max_jobs = info.max_jobs
        self.idle_actors = info.idle_actors

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"under rayvisor, load_fnc's worker has only active_jobs (len), max_jobs, "
                             f"idle_actors and info (a rayvisor LoadInfo), not {name!r}")


@dataclass(frozen=True)
class LivekitLoadFnc:
    """A livekit-agents ``load_fnc`` (``load_fnc(worker)`` or ``load_fnc()``) called as rayvisor
    calls one, ``load_fnc(info: LoadInfo)``: the worker is a ``WorkerView``. Its load is divided
    by ``scale`` (a livekit ``load_threshold`` above 1, rayvisor's being at most 1)."""

    fnc: Callable[..., Any]
    takes_worker: bool = True
    scale: float = 1.0

    def __call__(self, info: LoadInfo) -> float:
        load = self.fnc(WorkerView(info)) if self.takes_worker else self.fnc()
        return float(load) / self.scale
