"""Tokens the supervisor mints with the LiveKit API secret, so nothing else needs it.

A job actor gets a room token (to join its room as the agent) and a server API token
(for ``ctx.api``), both scoped to its room and short-lived; the worker bridge gets a
token with the agent grant to register on ``/agent``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from livekit import api

from ..agents.options import WorkerOptions, WorkerPermissions

AGENT_KIND = "agent"
WORKER_TOKEN_TTL = datetime.timedelta(minutes=10)
"""A registration token only has to be valid when the websocket opens."""


@dataclass(frozen=True)
class LiveKitCredentials:
    url: str
    api_key: str
    api_secret: str

    @classmethod
    def of(cls, opts: WorkerOptions) -> "LiveKitCredentials | None":
        """The agent's LiveKit credentials, or None when it runs on the local room backend."""
        if not opts.uses_livekit:
            return None
        return cls(url=opts.ws_url, api_key=opts.api_key, api_secret=opts.api_secret)

    def _token(self, ttl: float | datetime.timedelta) -> api.AccessToken:
        lifetime = ttl if isinstance(ttl, datetime.timedelta) else datetime.timedelta(seconds=ttl)
        return api.AccessToken(self.api_key, self.api_secret).with_ttl(lifetime)

    def room_token(self, *, room: str, identity: str, name: str, attributes: dict[str, str], metadata: str,
                   permissions: WorkerPermissions, ttl: float) -> str:
        """The agent participant's token: join ``room`` only, as kind agent, with ``permissions``."""
        grants = api.VideoGrants(
            room_join=True, room=room, agent=True,
            can_publish=permissions.can_publish, can_subscribe=permissions.can_subscribe,
            can_publish_data=permissions.can_publish_data,
            can_update_own_metadata=permissions.can_update_metadata,
            can_publish_sources=list(permissions.can_publish_sources) or None,
            hidden=permissions.hidden,
        )
        token = (self._token(ttl).with_identity(identity).with_name(name).with_kind(AGENT_KIND)
                 .with_metadata(metadata).with_attributes(dict(attributes)).with_grants(grants))
        return token.to_jwt()

    def api_token(self, *, room: str, ttl: float) -> str:
        """``ctx.api``'s token: administer ``room`` (participants, metadata, dispatches) and
        delete it (LiveKit's DeleteRoom asks for ``room_create``)."""
        grants = api.VideoGrants(room_admin=True, room=room, room_create=True)
        return self._token(ttl).with_grants(grants).to_jwt()

    def worker_token(self) -> str:
        """The worker registration's bearer token (the agent grant)."""
        return self._token(WORKER_TOKEN_TTL).with_grants(api.VideoGrants(agent=True)).to_jwt()
