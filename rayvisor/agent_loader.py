"""Find the ``WorkerOptions`` of an agent given as ``AGENT.py`` or ``module:attribute``.

The agent may be written for rayvisor or for LiveKit Agents (its ``WorkerOptions``/
``ServerOptions`` or an ``AgentServer``, converted by ``as_rayvisor_options``). A file is
imported under its own module name, never as ``__main__``, so its
``if __name__ == "__main__": cli.run_app(...)`` does not run.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .agents.livekit_agents_options import as_rayvisor_options, is_livekit_agents_server
from .agents.options import WorkerOptions
from .errors import AgentLoadError, InvalidAgent


def load_agent(target: str, *, agent_name: str | None = None, devmode: bool = False) -> WorkerOptions:
    """Load an agent: a file defining ``WorkerOptions`` (rayvisor's or livekit-agents'), a
    livekit-agents ``AgentServer``, or ``entrypoint`` (and maybe ``prewarm``), or an import
    path ``package.module:attribute`` naming one of them. ``devmode``: resolve livekit
    ``ServerEnvOption`` values for ``dev``."""
    attribute: str | None = None
    if Path(target).is_file():
        module = load_file_module(Path(target))
    elif ":" in target:
        module_name, attribute = target.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except Exception as err:
            raise AgentLoadError(f"cannot import {module_name!r}: {err}") from err
    else:
        raise AgentLoadError(f"{target!r} is neither a Python file nor a module:attribute import path")
    opts = _options_from(module, attribute, devmode)
    if agent_name is not None and agent_name != opts.agent_name:
        opts = dataclasses.replace(opts, agent_name=agent_name)
    return opts


def load_file_module(path: Path) -> ModuleType:
    """Import ``path`` as a fresh module named ``rayvisor_agent_<stem>`` (replacing an earlier
    one in ``sys.modules`` once it loaded), its directory first on ``sys.path`` for its sibling
    modules. A fresh module object is what lets ``rayvisor dev`` reload an edited file."""
    name = "rayvisor_agent_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    if spec is None or spec.loader is None:
        raise AgentLoadError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    directory = str(path.resolve().parent)
    if sys.path[:1] != [directory]:  # the agent's sibling modules first, as `python AGENT.py` would
        sys.path.insert(0, directory)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        if previous is None:
            sys.modules.pop(name, None)
        else:  # a failed reload leaves the loaded version in place
            sys.modules[name] = previous
        raise AgentLoadError(f"{path} raised while loading: {type(err).__name__}: {err}") from err
    return module


def _options_from(module: ModuleType, attribute: str | None, devmode: bool) -> WorkerOptions:
    if attribute is not None:
        value: Any = getattr(module, attribute, None)
        if value is None:
            raise AgentLoadError(f"{module.__name__} has no attribute {attribute!r}")
        return _as_options(value, module, devmode)
    found = list({id(v): v for v in vars(module).values() if _is_agent(v)}.values())
    if len(found) == 1:
        return as_rayvisor_options(found[0], devmode=devmode)
    if len(found) > 1:
        raise AgentLoadError(f"{module.__name__} defines several WorkerOptions/AgentServers; "
                             "name one with module:attribute")
    entrypoint = getattr(module, "entrypoint", None)
    if entrypoint is None:
        raise AgentLoadError(
            f"{module.__name__} defines no WorkerOptions, no AgentServer and no `entrypoint` function"
        )
    return _as_options(entrypoint, module, devmode)


def _is_agent(value: Any) -> bool:
    """rayvisor ``WorkerOptions``, or livekit-agents' options or ``AgentServer``."""
    return isinstance(value, WorkerOptions) or is_livekit_agents_server(value)


def _as_options(value: Any, module: ModuleType, devmode: bool) -> WorkerOptions:
    if _is_agent(value):
        return as_rayvisor_options(value, devmode=devmode)
    if inspect.isfunction(value):
        prewarm = getattr(module, "prewarm", None)
        return WorkerOptions(entrypoint_fnc=value, prewarm_fnc=prewarm if inspect.isfunction(prewarm) else None)
    raise InvalidAgent(f"{value!r} is neither WorkerOptions, an AgentServer nor an entrypoint function")
