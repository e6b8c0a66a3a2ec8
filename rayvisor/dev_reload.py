"""Hot reload for ``rayvisor dev``: watch the agent's code, load it again, register it, report.

``rayvisor dev AGENT.py`` (and ``python agent.py dev``) watch the agent's file and its
package (its directory, or the top package directory above it) with ``watchfiles``, in a
background thread of the driver. A burst of ``.py`` changes (an editor's save may write
several times) is one reload: the modules imported from the watched directory are dropped
from ``sys.modules`` so helpers import afresh, the agent file is loaded as a fresh module
(cloudpickle ships it by value, so the new code reaches every node), and the options are
registered with the running supervisor (``Client.register_agent``), which restarts the
agent's warm pool: idle actors prewarmed with the old code are replaced. Sibling modules
travel to job actors by reference (each actor is a fresh process and imports them from
disk), but what the agent module took from them (``from helper import GREETING``) travels
by value with the agent's own code, which is why the driver imports them afresh too.

**Running jobs finish on the old code.** A job actor holds the code it started with; new
jobs, and the refilled pool, run the new code. LiveKit Agents' dev mode (now ``lk agent
dev``) restarts its worker process on a change and re-launches the jobs that were
running, from their entrypoint, on the new code: that is forced by its design (the job
processes are the worker's children and die with it). rayvisor's job actors outlive a
reload, so restarting them would only interrupt a live session (re-greeting, losing its
state); the restart policy is about failures, not edits. To try the new code in a room,
end the old job (``rayvisor shutdown JOB``) and submit again. A job that gets its actor
after the reload (one still starting, or restarted by its restart policy) runs the new
code if it takes a warm-pool actor, and the code it was admitted with on a cold start.

A file that fails to load (a syntax error, an exception at import, no entrypoint) is
reported on stderr in one block (file, line, error) and the previous version keeps
serving; saving the fixed file reloads again. Only ``dev`` reloads, as in LiveKit Agents;
``dev --no-reload`` turns it off.
"""

from __future__ import annotations

import dataclasses
import inspect
import linecache
import logging
import sys
import sysconfig
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import watchfiles

from .agent_loader import load_agent, load_file_module
from .agents.livekit_agents_options import as_rayvisor_options
from .agents.options import WorkerOptions
from .errors import AgentLoadError, RayvisorError
from .messages import JobState
from .supervisor.client import Client

logger = logging.getLogger("rayvisor.dev_reload")

RELOAD_QUIET_MS = 200
"""A burst of file events ends once no new one came for this long (watchfiles' ``step``):
the writes of one save are one reload."""
RELOAD_BURST_MAX_MS = 1600
"""A burst that goes on is reloaded after at most this long (watchfiles' ``debounce``)."""
WATCHER_IDLE_CHECK_MS = 1000
"""How long watchfiles waits inside Rust before coming back to Python when nothing changes
(its ``rust_timeout``); ``stop_event`` is checked every ``RELOAD_QUIET_MS`` regardless."""
WATCHER_STOP_MARGIN = 5.0
"""``DevReloader.stop`` waits for the watcher thread this long plus what a reload in progress
may take (``RELOAD_CALLS`` calls, each bounded by the client's ``call_timeout``); the thread
notices the stop within ``RELOAD_QUIET_MS`` otherwise."""
RELOAD_CALLS = 2
"""Supervisor calls one reload makes: ``register_agent``, then ``list`` for the running jobs."""

Emit = Callable[[str], None]


def _stderr(text: str) -> None:
    click.echo(text, err=True)


@dataclass(frozen=True)
class AgentSource:
    """Where an agent's code lives and how to load it again (a fresh load each call)."""

    file: Path
    """The agent's own file, named in the reload messages."""
    root: Path
    """The directory watched: the file's directory, or the top package directory above it."""
    load: Callable[[], WorkerOptions]


def watch_root(file: Path) -> Path:
    """The file's directory; if that is a package (it has ``__init__.py``), the top package
    directory above it, so every module of the agent's package is watched."""
    root = file.resolve().parent
    while (root / "__init__.py").is_file() and (root.parent / "__init__.py").is_file():
        root = root.parent
    return root


def source_for_target(target: str, *, agent_name: str | None) -> AgentSource:
    """``rayvisor dev TARGET``: a file, or an import path ``package.module:attribute`` whose
    module is a file outside the installed packages. ``AgentLoadError`` if it cannot be watched."""
    if Path(target).is_file():
        file = Path(target).resolve()
    else:
        import importlib.util

        module_name = target.split(":", 1)[0]
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError) as err:
            raise AgentLoadError(f"cannot find {module_name!r} to watch it: {err}") from err
        if spec is None or not spec.origin or not Path(spec.origin).is_file() or _installed(spec.origin):
            raise AgentLoadError(f"{module_name!r} is not a source file of this project (installed, or built in)")
        file = Path(spec.origin).resolve()
    return AgentSource(file=file, root=watch_root(file),
                       load=lambda: load_agent(target, agent_name=agent_name, devmode=True))


def source_for_app(app: Any) -> AgentSource:
    """``cli.run_app(app)`` run as ``python agent.py dev``: the script is loaded again as a
    module (never as ``__main__``). If the script binds ``app`` to a module-level name
    (``opts = WorkerOptions(...)``, ``server = AgentServer()``), that name is read from the new
    module; if ``app`` is built in the ``__main__`` block (``cli.run_app(WorkerOptions(
    entrypoint_fnc=entrypoint))``), the same options are kept and their functions are taken
    by name from the new module. ``AgentLoadError`` when neither is possible."""
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main is None or not main_file or not Path(main_file).is_file():
        raise AgentLoadError("the agent is not run from a script file (`python agent.py dev`)")
    file = Path(main_file).resolve()
    name = next((k for k, v in vars(main).items() if v is app and not k.startswith("_")), None)
    if name is not None:
        def load() -> WorkerOptions:
            module = load_file_module(file)
            if not hasattr(module, name):
                raise AgentLoadError(f"{file} no longer defines {name!r}, the agent `cli.run_app` serves")
            return as_rayvisor_options(getattr(module, name), devmode=True)
    elif dataclasses.is_dataclass(app) and not isinstance(app, type):
        functions = {f.name: getattr(app, f.name) for f in dataclasses.fields(app)
                     if _defined_in_main(getattr(app, f.name))}
        nested = [f"{field}={fn.__qualname__}" for field, fn in functions.items() if fn.__qualname__ != fn.__name__]
        if not functions or nested:
            raise AgentLoadError("the options given to cli.run_app name no function defined at the script's "
                                 "module level" + (f" ({', '.join(nested)})" if nested else ""))

        def load() -> WorkerOptions:
            module = load_file_module(file)
            fresh = {field: _function_named(module, fn.__name__, file) for field, fn in functions.items()}
            return as_rayvisor_options(dataclasses.replace(app, **fresh), devmode=True)
    else:
        raise AgentLoadError(f"{type(app).__name__} given to cli.run_app is not bound to a module-level name "
                             "in the script (e.g. `server = AgentServer()`)")
    return AgentSource(file=file, root=watch_root(file), load=load)


def _defined_in_main(value: Any) -> bool:
    return inspect.isfunction(value) and value.__module__ == "__main__"


def _function_named(module: ModuleType, name: str, file: Path) -> Any:
    value = getattr(module, name, None)
    if not inspect.isfunction(value):
        raise AgentLoadError(f"{file} no longer defines the function {name!r} given to cli.run_app")
    return value


_INSTALLED = tuple({sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")})


def _installed(path: str) -> bool:
    return path.startswith(_INSTALLED)


def _is_under(path: str | None, root: Path) -> bool:
    """Whether ``path`` is a file under ``root`` (not a pseudo-file such as ``<string>``)."""
    if not path or not Path(path).is_absolute():
        return False
    try:
        return Path(path).resolve().is_relative_to(root)
    except (OSError, ValueError):
        return False


def project_modules(root: Path) -> list[str]:
    """The modules imported from ``root`` that a reload imports afresh: everything loaded from
    there but ``__main__`` (the running script), agent files, rayvisor itself and installed
    packages."""
    names = []
    for name, module in list(sys.modules.items()):
        if name == "__main__" or name == "rayvisor" or name.startswith(("rayvisor.", "rayvisor_agent_")):
            continue  # an agent file's module is replaced by its load (and kept if that fails)
        path = getattr(module, "__file__", None)
        if path and not _installed(path) and _is_under(path, root):
            names.append(name)
    return names


def format_load_error(err: BaseException, source: AgentSource) -> str:
    """One block for stderr: the file, the line, the offending code, the error."""
    cause = err.__cause__ if isinstance(err, AgentLoadError) and err.__cause__ is not None else err
    lines = [f"rayvisor dev: reloading {source.file.name} failed; the previous version keeps serving"]
    if isinstance(cause, SyntaxError) and cause.filename:
        lines.append(f'  File "{cause.filename}", line {cause.lineno}')
        if cause.text:
            lines.append("    " + cause.text.strip())
        lines.append(f"  {type(cause).__name__}: {cause.msg}")
    else:
        frames = traceback.extract_tb(cause.__traceback__)
        ours = [f for f in frames if _is_under(f.filename, source.root)]
        frame = (ours or frames or [None])[-1]
        if frame is not None and (ours or cause is not err):
            lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
            code = frame.line or linecache.getline(frame.filename, frame.lineno or 0).strip()
            if code:
                lines.append("    " + code)
        else:
            lines.append(f'  File "{source.file}"')
        lines.append(f"  {type(cause).__name__}: {cause}")
    lines.append("  (fix it and save: the agent is reloaded then)")
    return "\n".join(lines)


class DevReloader:
    """Watches an agent's source in a background thread and reloads it into the running
    supervisor on every change. ``start`` once the agent is served; ``stop`` before the
    supervisor is stopped."""

    def __init__(self, source: AgentSource, *, agent_name: str, emit: Emit = _stderr) -> None:
        self.source = source
        self.agent_name = agent_name
        self._emit = emit
        self._client: Client | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, client: Client) -> "DevReloader":
        """Start watching; reloads register with ``client``'s supervisor."""
        self._client = client
        self._thread = threading.Thread(target=self._watch, name="rayvisor-dev-reload", daemon=True)
        self._thread.start()
        self._emit(f"watching {self.source.root} for changes to {self.source.file.name} and its modules "
                   "(new jobs run the new code; --no-reload turns this off)")
        return self

    def stop(self) -> None:
        """Stop watching and wait (bounded) for the watcher thread to end."""
        self._stop.set()
        if self._thread is not None:
            bound = WATCHER_STOP_MARGIN + RELOAD_CALLS * (self._client.call_timeout if self._client else 0.0)
            self._thread.join(timeout=bound)
            if self._thread.is_alive():
                logger.warning("the dev reload watcher did not stop within %ss", bound)

    def _watch(self) -> None:
        try:
            for changes in watchfiles.watch(
                    self.source.root, watch_filter=watchfiles.PythonFilter(), debounce=RELOAD_BURST_MAX_MS,
                    step=RELOAD_QUIET_MS, rust_timeout=WATCHER_IDLE_CHECK_MS, stop_event=self._stop):
                if not self._stop.is_set():
                    self.reload(path for _change, path in changes)
        except Exception:
            logger.exception("the dev reload watcher failed: edits are no longer reloaded (restart `dev`)")

    def reload(self, changed: Iterable[str] = ()) -> bool:
        """Load the agent again and register it for new jobs; report the outcome on stderr.
        Returns whether the new code now serves."""
        assert self._client is not None, "start() first"
        names = sorted({Path(p).name for p in changed})
        # Helpers import afresh; the agent module is replaced by its load.
        dropped = {name: sys.modules.pop(name) for name in project_modules(self.source.root) if name in sys.modules}
        try:
            opts = self.source.load()
        except Exception as err:  # any failure to load: the previous version keeps serving
            sys.modules.update(dropped)  # with the helpers it was loaded with
            self._emit(format_load_error(err, self.source))
            return False
        if opts.agent_name != self.agent_name:
            self._emit(f"rayvisor dev: not reloading {self.source.file.name}: its agent name changed from "
                       f"{self.agent_name!r} to {opts.agent_name!r}; restart `dev` to rename the agent "
                       "(the previous version keeps serving)")
            return False
        try:
            registered = self._client.register_agent(opts)
            live = sum(1 for job in self._client.list()
                       if job.agent_name == self.agent_name and job.state == JobState.RUNNING)
        except RayvisorError as err:
            self._emit(f"rayvisor dev: reloading {self.source.file.name} failed: the supervisor did not take it "
                       f"({type(err).__name__}: {err}); save again to retry")
            return False
        what = f" ({', '.join(names)} changed)" if names and names != [self.source.file.name] else ""
        running = f"{live} running job finishes" if live == 1 else f"{live} running jobs finish"
        self._emit(f"reloaded {self.source.file.name}{what}: new jobs run the new code ({running} on the old code)")
        if registered.conflicts:
            self._emit("  supervisor-wide settings are kept until `dev` restarts: " + "; ".join(registered.conflicts))
        return True


def dev_reloader(*, serving: WorkerOptions, target: str | None = None, app: Any = None,
                 agent_name: str | None = None, emit: Emit = _stderr) -> DevReloader | None:
    """The reloader for ``rayvisor dev TARGET`` or ``cli.run_app(app)``'s ``dev``, serving
    ``serving``; None (and a line saying why) when the agent's source cannot be watched."""
    try:
        source = source_for_app(app) if target is None else source_for_target(target, agent_name=agent_name)
    except AgentLoadError as err:
        emit(f"rayvisor dev: not reloading on changes: {err}")
        return None
    return DevReloader(source, agent_name=serving.agent_name, emit=emit)
