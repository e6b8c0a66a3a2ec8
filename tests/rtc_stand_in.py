"""``StandInRoom``: a stand-in for ``livekit.rtc.Room`` (livekit 1.2.1) over a JSON websocket.

LiveKit's media and signalling cannot be served locally, so a job's room connects to
``tests/livekit_server.LocalLiveKitServer``'s ``/rtc-standin`` channel instead (its docstring
describes the messages). Only the part of the Room API a job uses is offered, with rtc's
signatures, event names and event argument shapes; there is no media (``track_publications`` is
always empty).

Self-contained on purpose (stdlib, aiohttp, livekit.rtc, livekit.protocol only): it is shipped by
value to Ray worker processes with ``cloudpickle.register_pickle_by_value``.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from livekit import rtc
from livekit.protocol import models
from livekit.rtc.participant import PublishDataError
from livekit.rtc.room import EventTypes

logger = logging.getLogger("tests.rtc_stand_in")

STANDIN_PATH = "/rtc-standin"

# The channel carries models.ParticipantInfo.Kind values; rtc numbers CONNECTOR/BRIDGE differently.
_KIND_TO_RTC: dict[int, int] = {
    int(models.ParticipantInfo.Kind.Value(name)): int(rtc.ParticipantKind.Value("PARTICIPANT_KIND_" + name))
    for name in models.ParticipantInfo.Kind.keys()
    if "PARTICIPANT_KIND_" + name in rtc.ParticipantKind.keys()
}


def standin_url(url: str) -> str:
    """The ``/rtc-standin`` websocket URL for a LiveKit URL (``ws[s]://`` or ``http[s]://``)."""
    if url.startswith("http"):
        url = "ws" + url[len("http") :]
    return url.rstrip("/") + STANDIN_PATH


class StandInParticipant:
    """A participant as rtc exposes it: identity, sid, name, kind, attributes, metadata."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        self._identity = str(info.get("identity", ""))
        self._sid = ""
        self._name = ""
        self._kind = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
        self._attributes: dict[str, str] = {}
        self._metadata = ""
        self._state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self._disconnect_reason = rtc.DisconnectReason.UNKNOWN_REASON
        self._update(info)

    def _update(self, info: Mapping[str, Any]) -> None:
        self._sid = str(info.get("sid", self._sid))
        self._name = str(info.get("name", self._name))
        if "kind" in info:
            self._kind = _KIND_TO_RTC.get(int(info["kind"]), rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD)  # type: ignore[assignment]
        if "attributes" in info:
            self._attributes = {str(k): str(v) for k, v in dict(info["attributes"]).items()}
        self._metadata = str(info.get("metadata", self._metadata))

    @property
    def sid(self) -> str:
        return self._sid

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def name(self) -> str:
        return self._name

    @property
    def metadata(self) -> str:
        return self._metadata

    @property
    def attributes(self) -> dict[str, str]:
        """A copy, like rtc's."""
        return dict(self._attributes)

    @property
    def kind(self) -> int:
        """An ``rtc.ParticipantKind`` value."""
        return self._kind

    @property
    def kind_details(self) -> list[int]:
        return []

    @property
    def state(self) -> int:
        return self._state

    @property
    def disconnect_reason(self) -> int | None:
        """None unless disconnected (as in rtc)."""
        if self._disconnect_reason == rtc.DisconnectReason.UNKNOWN_REASON:
            return None
        return self._disconnect_reason

    @property
    def track_publications(self) -> Mapping[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sid={self.sid}, identity={self.identity}, name={self.name})"


class StandInRemoteParticipant(StandInParticipant):
    """Stands in for ``rtc.RemoteParticipant``."""


class StandInLocalParticipant(StandInParticipant):
    """Stands in for ``rtc.LocalParticipant``: attributes, metadata, data and text."""

    def __init__(self, room: StandInRoom, info: Mapping[str, Any]) -> None:
        super().__init__(info)
        self._room = room

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        """Merge ``attributes`` (an empty value deletes). Like rtc, a refusal is not raised (it is logged)."""
        error = await self._room._request({"type": "set_attributes", "attributes": dict(attributes)})
        if error:
            logger.warning("set_attributes failed: %s", error)

    async def set_metadata(self, metadata: str) -> None:
        """Set own metadata. Like rtc, a refusal is not raised (it is logged)."""
        error = await self._room._request({"type": "set_metadata", "metadata": metadata})
        if error:
            logger.warning("set_metadata failed: %s", error)

    async def set_name(self, name: str) -> None:
        """Set own name. Like rtc, a refusal is not raised (it is logged)."""
        error = await self._room._request({"type": "set_name", "name": name})
        if error:
            logger.warning("set_name failed: %s", error)

    async def publish_data(
        self,
        payload: bytes | str,
        *,
        reliable: bool = True,
        destination_identities: list[str] = [],  # noqa: B006 - rtc's exact signature
        topic: str = "",
    ) -> None:
        """Send a data packet to the room (or to ``destination_identities``); PublishDataError on failure."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        error = await self._room._request(
            {
                "type": "publish_data",
                "topic": topic,
                "data_b64": base64.b64encode(payload).decode(),
                "destination_identities": list(destination_identities),
                "reliable": reliable,
            }
        )
        if error:
            raise PublishDataError(error)

    async def send_text(
        self,
        text: str,
        *,
        destination_identities: list[str] | None = None,
        topic: str = "",
        attributes: dict[str, str] | None = None,
        reply_to_id: str | None = None,
        compress: bool = True,
    ) -> rtc.TextStreamInfo:
        """Send a one-shot text stream; returns its ``rtc.TextStreamInfo``; rtc.StreamError on failure."""
        info = rtc.TextStreamInfo(
            stream_id=str(uuid.uuid4()),
            mime_type="text/plain",
            topic=topic,
            timestamp=int(time.time() * 1000),
            size=len(text.encode("utf-8")),
            attributes=dict(attributes or {}),
            attachments=[],
        )
        error = await self._room._request(
            {
                "type": "send_text",
                "topic": topic,
                "text": text,
                "destination_identities": list(destination_identities or []),
                "stream_id": info.stream_id,
                "attributes": info.attributes,
                "timestamp": info.timestamp,
            }
        )
        if error:
            raise rtc.StreamError(error)
        return info


class StandInTextStreamReader:
    """An incoming (complete) text stream, offering rtc.TextStreamReader's reading API."""

    def __init__(self, info: rtc.TextStreamInfo, text: str) -> None:
        self._info = info
        self._text: str | None = text

    @property
    def info(self) -> rtc.TextStreamInfo:
        return self._info

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if self._text is None:
            raise StopAsyncIteration
        text, self._text = self._text, None
        return text

    async def read_all(self) -> str:
        return "".join([chunk async for chunk in self])

    def close(self) -> None:
        self._text = None

    async def aclose(self) -> None:
        self.close()


TextStreamHandler = Callable[[StandInTextStreamReader, str], Any]


class StandInRoom(rtc.EventEmitter[EventTypes]):
    """Stands in for ``rtc.Room``: connect/disconnect, participants, events, data and text streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__()
        self._loop = loop
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._options = rtc.RoomOptions()
        self._token: str | None = None
        self._server_url: str | None = None
        self._name = ""
        self._sid = ""
        self._metadata = ""
        self._connection_state = rtc.ConnectionState.CONN_DISCONNECTED
        self._local: StandInLocalParticipant | None = None
        self._remote: dict[str, StandInRemoteParticipant] = {}
        self._text_stream_handlers: dict[str, TextStreamHandler] = {}
        self._byte_stream_handlers: dict[str, Callable[..., Any]] = {}
        self._pending: dict[int, asyncio.Future[str | None]] = {}
        self._next_request = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._leaving = False

    # ------------------------------------------------------------------ rtc.Room surface

    @property
    async def sid(self) -> str:
        """Awaitable, as in rtc 1.2.1 (``await room.sid``)."""
        if not self._sid:
            raise RuntimeError("cannot get sid of a disconnected room")
        return self._sid

    @property
    def name(self) -> str:
        return self._name

    @property
    def metadata(self) -> str:
        return self._metadata

    @property
    def connection_state(self) -> int:
        return self._connection_state

    @property
    def local_participant(self) -> StandInLocalParticipant:
        if self._local is None:
            raise Exception("cannot access local participant before connecting")
        return self._local

    @property
    def remote_participants(self) -> Mapping[str, StandInRemoteParticipant]:
        return self._remote

    @property
    def num_participants(self) -> int:
        return len(self._remote) + (1 if self._local is not None and self.isconnected() else 0)

    @property
    def auto_subscribe(self) -> bool:
        """``RoomOptions.auto_subscribe`` given to connect (stored only: there is no media)."""
        return self._options.auto_subscribe

    def isconnected(self) -> bool:
        return self._ws is not None and self._connection_state != rtc.ConnectionState.CONN_DISCONNECTED

    def on(self, event: EventTypes, callback: Callable | None = None) -> Callable:
        return super().on(event, callback)

    def register_text_stream_handler(self, topic: str, handler: TextStreamHandler) -> None:
        if topic in self._text_stream_handlers:
            raise ValueError("text stream handler for topic '%s' already set" % topic)
        self._text_stream_handlers[topic] = handler

    def unregister_text_stream_handler(self, topic: str) -> None:
        self._text_stream_handlers.pop(topic, None)

    def register_byte_stream_handler(self, topic: str, handler: Callable[..., Any]) -> None:
        """Accepted for API parity; the channel carries no byte streams."""
        if topic in self._byte_stream_handlers:
            raise ValueError("byte stream handler for topic '%s' already set" % topic)
        self._byte_stream_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self._byte_stream_handlers.pop(topic, None)

    async def connect(self, url: str, token: str, options: rtc.RoomOptions = rtc.RoomOptions()) -> None:
        """Join the room of ``token``; raises ``rtc.ConnectError`` when refused or unreachable."""
        if self.isconnected():
            raise RuntimeError("room is already connected")
        self._loop = self._loop or asyncio.get_running_loop()
        self._options = options
        self._token = token
        self._server_url = url
        timeout = options.connect_timeout or 10.0
        session = aiohttp.ClientSession()
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(standin_url(url), headers={"Authorization": f"Bearer {token}"}), timeout
            )
            frame = await asyncio.wait_for(ws.receive(), timeout)
        except aiohttp.WSServerHandshakeError as exc:
            await session.close()
            raise rtc.ConnectError(f"failed to connect to {url}: server refused ({exc.status}) {exc.message}") from exc
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            await session.close()
            raise rtc.ConnectError(f"failed to connect to {url}: {exc!r}") from exc
        except BaseException:
            await session.close()
            raise
        joined: dict[str, Any] = {}
        if frame.type == aiohttp.WSMsgType.TEXT:
            joined = json.loads(frame.data)
        if joined.get("type") != "joined":
            await ws.close()
            await session.close()
            raise rtc.ConnectError(f"failed to connect to {url}: expected 'joined', got {frame.type.name} {frame.data!r}")

        self._session, self._ws = session, ws
        room = joined["room"]
        self._name, self._sid, self._metadata = room["name"], room["sid"], room.get("metadata", "")
        self._local = StandInLocalParticipant(self, joined["local"])
        self._remote = {}
        for info in joined["participants"]:
            self._remote[info["identity"]] = StandInRemoteParticipant(info)
        self._leaving = False
        self._connection_state = rtc.ConnectionState.CONN_CONNECTED
        self._reader = self._loop.create_task(self._read_loop(ws, session))
        # rtc 1.2.1 emits connection_state_changed on connect; it never emits "connected".
        self.emit("connection_state_changed", self._connection_state)

    async def disconnect(self, *, reason: int = rtc.DisconnectReason.CLIENT_INITIATED) -> None:
        """Leave the room; emits connection_state_changed and disconnected(reason) as rtc does."""
        if not self.isconnected():
            return
        self._leaving = True
        assert self._ws is not None
        await self._ws.close()
        if self._reader is not None:
            await self._reader
        if self._connection_state != rtc.ConnectionState.CONN_DISCONNECTED:
            self._set_disconnected(reason)

    # ------------------------------------------------------------------ internals

    async def _request(self, message: dict[str, Any]) -> str | None:
        """Send a request and wait for its ack; returns the server's error, if any."""
        ws = self._ws
        if ws is None or not self.isconnected():
            return "room is not connected"
        self._next_request += 1
        request_id = self._next_request
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        try:
            await ws.send_str(json.dumps({**message, "id": request_id}))
            return await fut
        except (ConnectionError, RuntimeError) as exc:
            return f"room connection lost: {exc!r}"
        finally:
            self._pending.pop(request_id, None)

    def _set_disconnected(self, reason: int) -> None:
        self._connection_state = rtc.ConnectionState.CONN_DISCONNECTED
        if self._local is not None:
            self._local._disconnect_reason = reason  # type: ignore[assignment]
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result("room disconnected")
        self.emit("connection_state_changed", self._connection_state)
        self.emit("disconnected", reason)

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession) -> None:
        try:
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    self._on_message(json.loads(frame.data))
                except Exception:
                    logger.exception("stand-in room %s: failed to handle %.200s", self._name, frame.data)
        finally:
            await session.close()
            if not self._leaving and self._connection_state != rtc.ConnectionState.CONN_DISCONNECTED:
                # the server went away without saying why (dropped connection, shutdown)
                self._set_disconnected(rtc.DisconnectReason.UNKNOWN_REASON)

    def _participant(self, info: Mapping[str, Any]) -> StandInParticipant:
        """The participant object for ``info`` (kept one per identity, updated in place)."""
        identity = info["identity"]
        if self._local is not None and identity == self._local.identity:
            participant: StandInParticipant = self._local
        else:
            participant = self._remote.get(identity) or StandInRemoteParticipant(info)
        participant._update(info)
        return participant

    def _spawn(self, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "ack":
            fut = self._pending.get(msg["id"])
            if fut is not None and not fut.done():
                fut.set_result(msg.get("error"))
        elif kind == "participant_connected":
            info = msg["participant"]
            participant = self._remote.get(info["identity"])
            if participant is None:
                participant = self._remote[info["identity"]] = StandInRemoteParticipant(info)
            else:
                participant._update(info)
            self.emit("participant_connected", participant)
        elif kind == "participant_disconnected":
            info = msg["participant"]
            gone = self._remote.pop(info["identity"], None)
            if gone is not None:
                gone._update(info)
                gone._state = rtc.ParticipantState.PARTICIPANT_STATE_DISCONNECTED
                gone._disconnect_reason = int(msg.get("reason", 0))  # type: ignore[assignment]
                self.emit("participant_disconnected", gone)
        elif kind == "participant_attributes_changed":
            participant = self._participant(msg["participant"])
            self.emit("participant_attributes_changed", dict(msg["changed"]), participant)
        elif kind == "participant_metadata_changed":
            participant = self._participant(msg["participant"])
            self.emit("participant_metadata_changed", participant, msg["old"], msg["new"])
        elif kind == "participant_name_changed":
            participant = self._participant(msg["participant"])
            self.emit("participant_name_changed", participant, msg["old"], msg["new"])
        elif kind == "room_metadata_changed":
            old, self._metadata = self._metadata, msg["new"]
            self.emit("room_metadata_changed", old, self._metadata)
        elif kind == "data_received":
            sender = self._remote.get(msg["participant"]["identity"])
            packet = rtc.DataPacket(
                data=base64.b64decode(msg["data_b64"]),
                kind=rtc.DataPacketKind.KIND_RELIABLE if msg.get("reliable", True) else rtc.DataPacketKind.KIND_LOSSY,
                participant=sender,  # type: ignore[arg-type]
                topic=msg.get("topic", ""),
            )
            self.emit("data_received", packet)
        elif kind == "text_received":
            self._on_text(msg)
        elif kind == "disconnected":
            if self._connection_state != rtc.ConnectionState.CONN_DISCONNECTED:
                self._set_disconnected(int(msg.get("reason", rtc.DisconnectReason.UNKNOWN_REASON)))
        else:
            logger.debug("stand-in room %s: ignoring %r", self._name, kind)

    def _on_text(self, msg: dict[str, Any]) -> None:
        topic = msg.get("topic", "")
        handler = self._text_stream_handlers.get(topic)
        if handler is None:
            logger.info("ignoring text stream with topic '%s', no callback attached", topic)
            return
        text = msg["text"]
        info = rtc.TextStreamInfo(
            stream_id=msg.get("stream_id", ""),
            mime_type="text/plain",
            topic=topic,
            timestamp=int(msg.get("timestamp", 0)),
            size=len(text.encode("utf-8")),
            attributes=dict(msg.get("attributes") or {}),
            attachments=[],
        )
        result = handler(StandInTextStreamReader(info, text), msg["participant"]["identity"])
        if inspect.isawaitable(result):
            self._spawn(result)

    def __repr__(self) -> str:
        state = rtc.ConnectionState.Name(self._connection_state)  # type: ignore[arg-type]
        return f"StandInRoom(sid={self._sid or 'unknown'}, name={self._name}, metadata={self._metadata}, connection_state={state})"
