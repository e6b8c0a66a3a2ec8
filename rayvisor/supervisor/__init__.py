"""The control plane: the supervisor actor, its job table, and the client.

Its names load when first asked for: a job actor imports this package to rebuild its
supervisor's handle (``supervisor.py``) and must not pay for the client or the core.
"""

import importlib
from typing import Any

__all__ = ["Client", "Supervisor", "SupervisorSettings", "connect", "local_rooms", "serve"]

_HOMES = {"Client": ".client", "connect": ".client", "local_rooms": ".client", "serve": ".client",
          "SupervisorSettings": ".settings", "Supervisor": ".supervisor"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
