"""livekit-agents' plugin and inference-runner registries, usable inside Ray actors.

livekit-agents accepts ``Plugin.register_plugin`` and ``_InferenceRunner.register_runner``
only on the main thread: its worker imports every plugin there before it starts jobs. A
Ray actor never runs Python code on its main thread: its arguments (the agent's
functions, which import the plugins they use) are unpickled, and its methods run, on
other threads. So an agent file that imports ``livekit.plugins.openai`` would crash every
rayvisor actor that receives its code with "Plugins must be registered on the main thread".

``install()`` (called where rayvisor's actor classes are defined, in Ray worker processes
only) adds an import hook: when livekit-agents' ``plugin`` and ``inference_runner`` modules
load, their thread check sees the registering thread as the main one. That is the role
the actor's thread plays here: it imports the agent's code before any job runs. Nothing
is imported ahead of time, so actors of agents without livekit-agents do not pay for it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Sequence
from typing import Any

REGISTRY_MODULES = frozenset({"livekit.agents.plugin", "livekit.agents.inference_runner"})
"""The livekit-agents modules whose registries check for the main thread."""

_ACTOR_THREADING = types.SimpleNamespace(current_thread=threading.current_thread, main_thread=threading.current_thread)
"""Stands in for ``threading`` in those modules: the registering thread counts as the main one."""


def _relax(module: types.ModuleType) -> None:
    module.threading = _ACTOR_THREADING  # type: ignore[attr-defined]


class _RelaxingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        _relax(module)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds the registry modules as the other finders would, then relaxes them once loaded."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in REGISTRY_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RelaxingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Let this process's actor thread register livekit-agents plugins and runners (idempotent)."""
    for name in REGISTRY_MODULES:
        if name in sys.modules:
            _relax(sys.modules[name])
    if not any(isinstance(finder, _RegistryFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())


def install_in_ray_workers() -> None:
    """``install()`` when this process is a Ray worker (never in a user's driver)."""
    import ray
    from ray._private.worker import global_worker  # read without connecting (get_runtime_context would)

    if global_worker.mode == ray.WORKER_MODE:
        install()
