"""The control plane: the supervisor actor, its job table, and the client."""

from .client import Client, connect, local_rooms, serve
from .supervisor import Supervisor

__all__ = ["Client", "Supervisor", "connect", "local_rooms", "serve"]
