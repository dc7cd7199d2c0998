"""The one ComfyUI client: every HTTP call and the /ws connection, over an aiohttp session.

A call either answers (a :class:`Reply`: any HTTP status, the raw body) or raises
:class:`ComfyCallError` (no answer: refused, disconnected, timed out, or an answer we could not
read). Which statuses are fine is the caller's decision, except where a method says otherwise.
The caller owns the session (:func:`new_session`) and closes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, Literal, TypeVar

import aiohttp

from orchestrator.comfy.protocol import Dialect, QueuePosition, greeting, history_entry, queue_position
from orchestrator.core.errors import OrchestratorError
from orchestrator.core.workflow import Workflow

log = logging.getLogger(__name__)

CallErrorKind = Literal["connect", "disconnected", "timeout", "answer", "other"]
GREETING_TIMEOUT = 2.0  # seconds to wait for the socket's first status (and the fork's client_id)
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
_WS_CLOSED = frozenset(
    {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR}
)
T = TypeVar("T")


class ComfyCallError(OrchestratorError):
    """A call to a ComfyUI instance got no usable answer.

    ``kind``: connect (nothing listens), disconnected (the connection dropped), timeout,
    answer (a status or body the method cannot use), other. ``reason`` is a short phrase;
    ``__cause__`` keeps the transport's exception.
    """

    def __init__(self, reason: str, kind: CallErrorKind) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind: CallErrorKind = kind

    @property
    def gone(self) -> bool:
        """The instance is not there (refused or dropped the connection), not merely slow."""
        return self.kind in {"connect", "disconnected"}


def describe(exc: BaseException) -> str:
    """A short reason for a failed call to an instance."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        return "connection refused" if refused else f"cannot connect ({exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _kind(exc: BaseException) -> CallErrorKind:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionError):
        return "disconnected"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "other"


async def _guard(call: Awaitable[T]) -> T:
    try:
        return await call
    except _TRANSPORT_ERRORS as exc:
        raise ComfyCallError(describe(exc), _kind(exc)) from exc


@dataclasses.dataclass(frozen=True)
class Reply:
    """An HTTP answer: its status and raw body."""

    status: int
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON. Raises ValueError when it is not."""
        return json.loads(self.body)


def new_session(*, total: float = 60.0, connect: float = 5.0) -> aiohttp.ClientSession:
    """A session for many instances at once (no connection limit); call inside the event loop."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=total, connect=connect),
    )


def base_url(host: str, port: int) -> str:
    """``http://host:port`` (IPv6 hosts bracketed)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


class ComfySocket:
    """An open ``/ws``: the client id our events are sent to, and the dialect it spoke."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, client_id: str) -> None:
        self._ws = ws
        self.client_id = client_id  # ours (upstream) or the one the fork assigned
        self.dialect: Dialect = ""

    async def read_greeting(self, timeout: float = GREETING_TIMEOUT) -> tuple[str, Dialect]:
        """The id the server delivers our events to, and its dialect ("" when unknown).

        No greeting in time (or a closed socket) keeps our own id: /history covers that case.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.receive(timeout)
                    if message is None:
                        break
                    found = greeting(message, self.client_id)
                    if found is not None:
                        return found
        except (*_TRANSPORT_ERRORS, ComfyCallError):
            pass
        return self.client_id, ""

    async def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next JSON object the server sends (binary previews are skipped); None once closed.

        Raises:
            TimeoutError: nothing within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                msg = await self._ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        message = json.loads(msg.data)
                    except ValueError:
                        continue
                    if isinstance(message, dict):
                        return message
                elif msg.type in _WS_CLOSED:
                    return None

    async def close(self) -> None:
        await self._ws.close()

    async def __aenter__(self) -> ComfySocket:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class ComfyClient:
    """One ComfyUI instance at ``base_url``, over a session the caller owns.

    ``timeout`` arguments are seconds for the whole call; None uses the session's default.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url.rstrip("/")

    def _timeout(self, timeout: float | None) -> aiohttp.ClientTimeout | None:
        return None if timeout is None else aiohttp.ClientTimeout(total=max(0.05, timeout))

    async def _call(self, method: str, path: str, timeout: float | None, **kw: Any) -> Reply:
        async def call() -> Reply:
            options: dict[str, Any] = dict(kw)
            limit = self._timeout(timeout)
            if limit is not None:
                options["timeout"] = limit
            async with self.session.request(method, f"{self.url}{path}", **options) as resp:
                return Reply(resp.status, await resp.read())

        return await _guard(call())

    async def _json(self, method: str, path: str, timeout: float | None, **kw: Any) -> Any:
        reply = await self._call(method, path, timeout, **kw)
        if not reply.ok:
            raise ComfyCallError(f"{method} {path} answered HTTP {reply.status}", "answer")
        try:
            return reply.json()
        except ValueError:
            raise ComfyCallError(f"{method} {path}: the answer is not JSON", "answer") from None

    # ------------------------------------------------------------ any other call
    async def request(self, method: str, path: str, timeout: float | None = None, **kw: Any) -> Reply:
        """Any call, sent as given (``json=``, ``data=``, ``params=``, ``headers=`` as in aiohttp).

        For what the named methods below do not cover: other routes (``/object_info``, ``/api/...``)
        and the malformed requests the conformance suite sends. Raises ComfyCallError without an answer.
        """
        return await self._call(method, path, timeout, **kw)

    # ------------------------------------------------------------ health and memory
    async def system_stats(self, timeout: float | None = None) -> Reply:
        """``GET /system_stats``: readiness (the first 200), devices, comfyui_version."""
        return await self._call("GET", "/system_stats", timeout)

    async def queue(self, timeout: float | None = None) -> Reply:
        """``GET /queue``: ``queue_running`` and ``queue_pending`` (see ``protocol.queue_lengths``)."""
        return await self._call("GET", "/queue", timeout)

    async def free(
        self, timeout: float | None = None, *, unload_models: bool = True, free_memory: bool = True
    ) -> Reply:
        """``POST /free``: unload models and free memory (200 with an empty body)."""
        body = {"unload_models": unload_models, "free_memory": free_memory}
        return await self._call("POST", "/free", timeout, json=body)

    # ------------------------------------------------------------ prompts
    async def upload_image(self, name: str, data: bytes, timeout: float | None = None) -> Reply:
        """``POST /upload/image`` into the input folder (overwriting a file of that name)."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
        form.add_field("overwrite", "true")
        form.add_field("type", "input")
        return await self._call("POST", "/upload/image", timeout, data=form)

    async def post_prompt(self, workflow: Workflow, client_id: str, timeout: float | None = None) -> Reply:
        """``POST /prompt``: 200 ``{prompt_id, number, node_errors}``, 400 a refusal."""
        return await self._call("POST", "/prompt", timeout, json={"prompt": workflow, "client_id": client_id})

    async def history(self, prompt_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """The prompt's ``/history`` entry; None while it has not ended (or is unknown).

        Raises:
            ComfyCallError: no answer, or not a 200 with JSON (kind ``answer``).
        """
        return history_entry(await self._json("GET", f"/history/{prompt_id}", timeout), prompt_id)

    async def queue_position(self, prompt_id: str, timeout: float | None = None) -> QueuePosition:
        """Whether ``GET /queue`` lists the prompt as running, pending, or not at all."""
        return queue_position(await self._json("GET", "/queue", timeout), prompt_id)

    async def view(
        self, filename: str, subfolder: str = "", type_: str = "output", timeout: float | None = None
    ) -> bytes:
        """An output file's bytes (``GET /view``). Raises ComfyCallError unless 200."""
        params = {"filename": filename, "subfolder": subfolder, "type": type_}
        reply = await self._call("GET", "/view", timeout, params=params)
        if not reply.ok:
            raise ComfyCallError(f"HTTP {reply.status}", "answer")
        return reply.body

    async def interrupt(self, prompt_id: str | None = None, timeout: float | None = None) -> Reply:
        """``POST /interrupt`` (only that prompt when named)."""
        body = {} if prompt_id is None else {"prompt_id": prompt_id}
        return await self._call("POST", "/interrupt", timeout, json=body)

    async def delete_queued(self, prompt_ids: list[str], timeout: float | None = None) -> Reply:
        """``POST /queue {"delete": [...]}``: drop prompts that have not started."""
        return await self._call("POST", "/queue", timeout, json={"delete": prompt_ids})

    # ------------------------------------------------------------ the socket
    async def connect(self, client_id: str | None = None, *, greet: bool = True) -> ComfySocket:
        """Open ``/ws?clientId=`` and (``greet``) read the greeting, adopting the fork's own id.

        Connect before queueing a prompt so none of its events can be missed.

        Raises:
            ComfyCallError: the socket could not be opened.
        """
        own = client_id or uuid.uuid4().hex
        ws = await _guard(
            self.session.ws_connect(
                f"{self.url}/ws", params={"clientId": own}, timeout=aiohttp.ClientWSTimeout(ws_close=5)
            )
        )
        socket = ComfySocket(ws, own)
        if greet:
            socket.client_id, socket.dialect = await socket.read_greeting()
            if socket.client_id != own:
                log.debug("%s assigned client id %s", self.url, socket.client_id)
        return socket

