"""The control plane: the supervisor actor, its job table, and the client."""

from .client import Client, connect, local_rooms, serve
from .settings import SupervisorSettings
from .supervisor import Supervisor

__all__ = ["Client", "Supervisor", "SupervisorSettings", "connect", "local_rooms", "serve"]
