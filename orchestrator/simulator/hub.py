"""The /ws hub: every connected socket, the outbox that serialises messages to them, both dialects.

"upstream": /ws honours ``?clientId=`` and ignores client messages but ``feature_flags``.
"fork" (stakeordie/ComfyUI master): /ws assigns its own id (a ``client_id`` message first),
answers ``ping`` and ``prompt`` messages (``prompt_queued`` or ``error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import aiohttp
from aiohttp import web

SEND_ERRORS = (aiohttp.ClientError, ConnectionError, RuntimeError)
PROMPT_KEYS = ("prompt", "prompt_id", "number", "front", "partial_execution_targets")


class Server(Protocol):
    """What the hub asks of the server it belongs to."""

    def queue_info(self) -> dict[str, Any]: ...

    def queue_prompt(self, body: Any) -> tuple[int, dict[str, Any]]: ...

    def server_features(self) -> dict[str, Any]: ...

    def running_node(self, sid: str) -> str | None:
        """The node executing now for a prompt of client ``sid`` (None when there is none)."""
        ...


class Hub:
    """The sockets by client id and their outbox; ``websocket`` is the /ws handler."""

    def __init__(self, protocol: str, server: Server, log: Callable[[str], None]) -> None:
        self.protocol = protocol
        self.server = server
        self.log = log
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.outbox: asyncio.Queue[tuple[str, Any, str | None]] = asyncio.Queue()

    def send(self, event: str, data: Any, sid: str | None) -> None:
        """Queue a ``{"type", "data"}`` message for one socket, or for all when ``sid`` is None."""
        self.outbox.put_nowait((event, data, sid))

    def send_raw(self, message: dict[str, Any], sid: str) -> None:
        self.outbox.put_nowait(("", message, sid))

    async def publisher(self) -> None:
        while True:
            event, data, sid = await self.outbox.get()
            message = data if event == "" else {"type": event, "data": data}
            for ws in self._targets(sid):
                with contextlib.suppress(*SEND_ERRORS):
                    await ws.send_json(message)

    def _targets(self, sid: str | None) -> list[web.WebSocketResponse]:
        if sid is None:
            return list(self.sockets.values())
        return [self.sockets[sid]] if sid in self.sockets else []

    async def close_all(self) -> None:
        for ws in list(self.sockets.values()):
            with contextlib.suppress(*SEND_ERRORS):
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        fork = self.protocol == "fork"
        # The fork ignores ?clientId= and always assigns its own id.
        sid = uuid.uuid4().hex if fork else request.rel_url.query.get("clientId", "") or uuid.uuid4().hex
        old = self.sockets.pop(sid, None)
        if old is not None:
            await old.close()
        self.sockets[sid] = ws
        try:
            if fork:
                await ws.send_json({"type": "client_id", "data": {"client_id": sid}})
            await ws.send_json({"type": "status", "data": {"status": self.server.queue_info(), "sid": sid}})
            node = self.server.running_node(sid)
            if node is not None:
                await ws.send_json({"type": "executing", "data": {"node": node}})
            first = True
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._message(sid, msg.data, first)
                    first = False
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    self.log(f"ws connection closed with exception {ws.exception()}")
        except SEND_ERRORS:
            pass
        finally:
            if self.sockets.get(sid) is ws:
                del self.sockets[sid]
        return ws

    def _message(self, sid: str, text: str, first: bool) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            self.log(f"Invalid JSON received from client {sid}: {text}")
            return
        if not isinstance(data, Mapping):
            return
        kind = data.get("type")
        if kind == "feature_flags" and first:
            self.send("feature_flags", self.server.server_features(), sid)
        elif self.protocol != "fork":
            return  # upstream ignores every other client message
        elif kind == "ping":
            self.send_raw({"type": "pong"}, sid)
        elif kind == "prompt":
            raw = data.get("data")
            payload: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
            body: dict[str, Any] = {k: payload[k] for k in PROMPT_KEYS if k in payload}
            body["extra_data"] = payload.get("extra_data") if isinstance(payload.get("extra_data"), Mapping) else {}
            body["client_id"] = sid
            status, result = self.server.queue_prompt(body)
            self.send("prompt_queued" if status == 200 else "error", result, sid)
