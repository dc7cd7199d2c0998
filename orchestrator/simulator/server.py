"""The ComfyUI API simulator: an aiohttp server started exactly as ComfyUI is (``python main.py``).

It serves ComfyUI's HTTP and WebSocket API (COMFYUI_API.md); with ``SIM_PROTOCOL=fork`` its
/ws behaves as the fleet fork's does (own client ids, ping, prompt messages, node_executing).
It writes real PNGs to the output folder, and can be told to start slowly, crash, hang or
print CUDA out-of-memory errors (see ``faults.py``). It stands in for ComfyUI in tests and
in ``orchestrator demo`` only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

import aiohttp
from aiohttp import web

from orchestrator.machine.fs import atomic_write
from orchestrator.simulator import cli_args, startup
from orchestrator.simulator import faults as faultlib
from orchestrator.simulator import folders as fp
from orchestrator.simulator.executor import (
    SENSITIVE_EXTRA_DATA_KEYS,
    Executor,
    PromptQueue,
    QueueItem,
    format_exception,
    oom_failure,
)
from orchestrator.simulator.graph import validate
from orchestrator.simulator.nodes import NodeDef, catalogue

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SEND_ERRORS = (aiohttp.ClientError, ConnectionError, RuntimeError)
FAULT_POLL_SECONDS = 0.5
BASELINE_VRAM = 300 * 1024**2  # bytes the CUDA context takes before any model is loaded
PROTOCOLS = ("upstream", "fork")  # SIM_PROTOCOL: whose /ws dialect to speak (COMFYUI_API.md)


class Console:
    """ComfyUI's console: bare messages, one line each, flushed at once."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, message: str) -> None:
        try:
            self.stream.write(message + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed: keep serving


class Stopper:
    """SIGTERM/SIGINT land here. A plain ``signal.signal`` handler still runs while the loop is hung."""

    def __init__(self) -> None:
        self.requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self._loop, self._event = loop, event
        if self.requested:
            event.set()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self._loop is not None and self._event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._event.set)


class StartupFailure(Exception):
    """Initialisation failed; ``exc_line`` is the last line of the traceback ComfyUI would print."""

    def __init__(self, exc_line: str) -> None:
        super().__init__(exc_line)
        self.exc_line = exc_line


def load_extra_paths(configs: Sequence[str], comfy_dir: Path, log: Console) -> list[fp.SearchPath]:
    """Every --extra-model-paths-config file (plus the tree's own extra_model_paths.yaml), logged.

    A missing file is a warning (ComfyUI itself would die on it).

    Raises:
        StartupFailure: a file is not valid YAML, or PyYAML is missing (ComfyUI dies too).
    """
    try:
        import yaml
    except ImportError:
        raise StartupFailure("ModuleNotFoundError: No module named 'yaml'") from None

    own = comfy_dir / "extra_model_paths.yaml"
    out: list[fp.SearchPath] = []
    for path in [*([str(own)] if own.is_file() else []), *configs]:
        try:
            with open(path, encoding="utf-8") as fh:
                config = yaml.safe_load(fh)
        except OSError as exc:
            log(f"WARNING: cannot read extra model paths config {path}: {exc.strerror}")
            continue
        except yaml.YAMLError as exc:
            raise StartupFailure(f"{type(exc).__module__}.{type(exc).__name__}: {exc}") from None
        for entry in fp.extra_search_paths(config, Path(os.path.abspath(path)).parent):
            log(f"Adding extra search path {entry.key} {entry.path}")
            out.append(entry)
    return out


def _remove_temp(temp: Path) -> None:
    shutil.rmtree(temp, ignore_errors=True)


class Simulator:
    """All state of one running simulator: flags, folders, faults, queue, sockets."""

    def __init__(
        self,
        args: argparse.Namespace,
        folders: fp.Folders,
        env_faults: faultlib.Faults,
        defs: Mapping[str, NodeDef],
        log: Console,
        stopper: Stopper,
        version: str,
        protocol: str = "upstream",
    ) -> None:
        self.args = args
        # "upstream": /ws honours ?clientId= and ignores client messages but feature_flags.
        # "fork" (stakeordie/ComfyUI master): /ws assigns its own id (client_id message first),
        # answers ping and prompt messages, and sends node_executing per node.
        self.protocol = protocol
        self.folders = folders
        self.env_faults = env_faults
        self.faults = env_faults
        self.defs = defs
        self.log = log
        self.stopper = stopper
        self.version = version
        self.fault_file = folders.user / faultlib.FAULTS_FILE
        self._fault_warnings: list[str] = []
        self.fault_file_stamp: tuple[int, int, int] | None = None  # (inode, mtime, size) at the last read
        self.ready_at: float | None = None
        self.stop = asyncio.Event()
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.outbox: asyncio.Queue[tuple[str, Any, str | None]] = asyncio.Queue()
        self.queue = PromptQueue(self._queue_updated)
        self.executor = Executor(folders, defs, self.send, log, lambda: self.faults.gpu_vram)
        self.executor.node_progress = protocol == "fork"
        self.free_requests: list[dict[str, Any]] = []
        self.tasks: list[asyncio.Task[None]] = []

    # ---- faults -------------------------------------------------------------------------
    def reload_faults(self) -> None:
        try:
            st = os.stat(self.fault_file)
            self.fault_file_stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            self.fault_file_stamp = None
        values, warnings = faultlib.read_file(self.fault_file)
        faults, more = faultlib.overlay(self.env_faults, values, str(self.fault_file))
        warnings += more
        if warnings != self._fault_warnings:
            for w in warnings:
                self.log(w)
            self._fault_warnings = warnings
        self.faults = faults

    def since_ready(self) -> float:
        return 0.0 if self.ready_at is None else time.monotonic() - self.ready_at

    def crash(self) -> None:
        self.log(
            startup.crash_text(
                self.folders.comfy_dir,
                f"RuntimeError: simulated crash {self.since_ready():.1f} s after start (crash_after fault)",
            )
        )
        os._exit(1)

    def print_oom(self) -> None:
        failure = oom_failure(self.folders.comfy_dir, self.faults.gpu_vram)
        self.log(f"!!! Exception during processing !!! {failure.message}")
        self.log(format_exception(failure))
        self.log("")
        self.log("Got an OOM, unloading all loaded models.")

    def hang(self) -> None:
        """Block the event loop thread: the port still accepts TCP, but nothing answers.

        Returns only when a stop signal arrives or the fault file no longer asks for a hang.
        """
        last_read = time.monotonic()
        while not self.stopper.requested:
            time.sleep(0.05)
            if time.monotonic() - last_read >= FAULT_POLL_SECONDS:
                last_read = time.monotonic()
                self.reload_faults()
                if self.faults.hang_after is None:
                    return

    async def fault_monitor(self) -> None:
        last_read = time.monotonic()
        last_oom: float | None = None
        seen_stamp: tuple[int, int, int] | None = None
        while not self.stop.is_set():
            if time.monotonic() - last_read >= FAULT_POLL_SECONDS:
                last_read = time.monotonic()
                self.reload_faults()
            if self.fault_file_stamp != seen_stamp:
                # A new write of the fault file re-arms "once" faults (oom: 0), even when the
                # write that removed it in between came and went before this loop read the file.
                seen_stamp = self.fault_file_stamp
                last_oom = None
            since = self.since_ready()
            due = faultlib.due(self.faults, since, last_oom)
            if due.crash:
                self.crash()
            if due.oom:
                last_oom = since
                self.print_oom()
            if due.hang:
                self.hang()
            if self.faults.oom is None:
                last_oom = None
            await asyncio.sleep(0.05)

    def task_died(self, task: asyncio.Task[None]) -> None:
        """A background task must never end while serving: die loudly, like a crashed ComfyUI."""
        if task.cancelled() or self.stop.is_set():
            return
        exc = task.exception()
        text = "".join(traceback.format_exception(exc)) if exc else f"task {task.get_name()} ended\n"
        self.log("simulator internal error:\n" + text.rstrip())
        os._exit(1)

    # ---- messaging ----------------------------------------------------------------------
    def send(self, event: str, data: Any, sid: str | None) -> None:
        """Queue a ``{"type", "data"}`` message for one socket, or for all when ``sid`` is None."""
        self.outbox.put_nowait((event, data, sid))

    def send_raw(self, message: dict[str, Any], sid: str) -> None:
        self.outbox.put_nowait(("", message, sid))

    async def publisher(self) -> None:
        while True:
            event, data, sid = await self.outbox.get()
            message = data if event == "" else {"type": event, "data": data}
            targets = (
                list(self.sockets.values())
                if sid is None
                else [self.sockets[sid]]
                if sid in self.sockets
                else []
            )
            for ws in targets:
                with contextlib.suppress(*_SEND_ERRORS):
                    await ws.send_json(message)

    def _queue_updated(self) -> None:
        self.send("status", {"status": self.queue.queue_info()}, None)

    # ---- prompts ------------------------------------------------------------------------
    def queue_prompt(self, body: Any) -> tuple[int, dict[str, Any]]:
        """POST /prompt's logic, shared with the fork's WebSocket ``prompt`` message."""
        self.log("got prompt")
        if not isinstance(body, Mapping):
            body = {}
        if "number" in body:
            try:
                number: float = float(body["number"])
            except (TypeError, ValueError, OverflowError):
                number = self.queue.next_number()
        else:
            number = self.queue.next_number(bool(body.get("front")))
        if "prompt" not in body:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return 400, {"error": error, "node_errors": {}}
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        partial = body.get("partial_execution_targets")
        result = validate(
            prompt,
            self.defs,
            partial if isinstance(partial, list) else None,
            fp.list_input_images(self.folders.input),
        )
        extra_data = dict(body["extra_data"]) if isinstance(body.get("extra_data"), Mapping) else {}
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not result.ok:
            self.log(f"invalid prompt: {result.error}")
            for node_id, err in result.node_errors.items():
                self.log(f"* {err['class_type']} {node_id}:")
                for reason in err["errors"]:
                    self.log(f"  - {reason['message']}: {reason['details']}")
            return 400, {"error": result.error, "node_errors": result.node_errors}
        sensitive = {k: extra_data.pop(k) for k in SENSITIVE_EXTRA_DATA_KEYS if k in extra_data}
        extra_data["create_time"] = int(time.time() * 1000)
        self.queue.put(QueueItem(number, prompt_id, dict(prompt), extra_data, result.outputs, sensitive))
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}

    async def worker(self) -> None:
        while True:
            task_id, item = await self.queue.get()
            started = time.perf_counter()
            entry = await self.executor.execute(item, self.faults.exec_time)
            self.queue.task_done(task_id, {"prompt": item.public(), **entry})
            client = item.extra_data.get("client_id")
            if isinstance(client, str):
                self.send("executing", {"node": None, "prompt_id": item.prompt_id}, client)
            self.log(f"Prompt executed in {time.perf_counter() - started:.2f} seconds")
            self.apply_free_flags()

    def apply_free_flags(self) -> None:
        flags = self.queue.take_flags()
        if flags.get("unload_models", flags.get("free_memory", False)):
            self.executor.unload_models()

    # ---- HTTP ---------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        middlewares = [self._cors_middleware if self.args.enable_cors_header else self._origin_middleware]
        app = web.Application(
            client_max_size=int(self.args.max_upload_size * 1024 * 1024), middlewares=middlewares
        )
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/ws", self.websocket),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/queue", self.get_queue),
            ("POST", "/queue", self.post_queue),
            ("GET", "/prompt", self.get_prompt),
            ("POST", "/prompt", self.post_prompt),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history_item),
            ("POST", "/history", self.post_history),
            ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_one),
            ("GET", "/view", self.view),
            ("POST", "/upload/image", self.upload_image),
            ("POST", "/interrupt", self.interrupt),
            ("POST", "/free", self.free),
            ("GET", "/embeddings", self.embeddings),
            ("GET", "/extensions", self.extensions),
            ("GET", "/models", self.model_types),
            ("GET", "/models/{folder}", self.model_list),
            ("GET", "/features", self.features),
        ]
        for method, path, handler in routes:
            for prefix in ("", "/api"):
                app.router.add_route(method, prefix + path, handler)
        app.router.add_get("/", self.index)
        return app

    @web.middleware
    async def _origin_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # A browser on a foreign site may POST to 127.0.0.1; ComfyUI refuses when the Origin's
        # host differs from Host, and only checks that for loopback hosts.
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if host and origin and origin_mismatch(host, origin):
            self.log(f"WARNING: request with non matching host and origin {host} != {origin}, returning 403")
            return web.Response(status=403)
        if request.method == "OPTIONS":
            return web.Response()
        return await handler(request)

    @web.middleware
    async def _cors_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = web.Response() if request.method == "OPTIONS" else await handler(request)
        response.headers["Access-Control-Allow-Origin"] = str(self.args.enable_cors_header)
        response.headers["Access-Control-Allow-Methods"] = "POST, GET, DELETE, PUT, OPTIONS, PATCH"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        return response

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            text=f"<!doctype html><title>ComfyUI</title><p>ComfyUI simulator {self.version}</p>",
            content_type="text/html",
        )

    def device_info(self) -> dict[str, Any]:
        ram_total, ram_free = startup.memory_bytes()
        if self.args.cpu:
            return {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": ram_total,
                "vram_free": ram_free,
                "torch_vram_total": ram_total,
                "torch_vram_free": ram_free,
            }
        total = self.faults.gpu_vram
        loaded = self.executor.loaded_bytes()
        reserved = loaded + (64 * 1024**2 if loaded else 0)
        return {
            "name": startup.device_name(self.faults.gpu_name),
            "type": "cuda",
            "index": 0,
            "vram_total": total,
            "vram_free": max(total - BASELINE_VRAM - reserved, 0),
            "torch_vram_total": reserved,
            "torch_vram_free": reserved - loaded,
        }

    async def system_stats(self, request: web.Request) -> web.StreamResponse:
        ram_total, ram_free = startup.memory_bytes()
        return web.json_response(
            {
                "system": {
                    "os": os.name,  # ComfyUI reports os.name ("posix")
                    "ram_total": ram_total,
                    "ram_free": ram_free,
                    "comfyui_version": self.version,
                    "required_frontend_version": startup.FRONTEND_VERSION,
                    "installed_templates_version": "0.1.94",
                    "required_templates_version": "0.1.94",
                    "python_version": sys.version,
                    "pytorch_version": startup.PYTORCH_VERSION,
                    "embedded_python": False,
                    "argv": sys.argv,
                },
                "devices": [self.device_info()],
            }
        )

    async def get_queue(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "queue_running": [item.public() for item in self.queue.running.values()],
                "queue_pending": [item.public() for item in self.queue.pending],
            }
        )

    async def get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.queue.queue_info())

    async def post_prompt(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        if body is None:
            # ComfyUI's handler lets the JSONDecodeError escape: aiohttp answers its plain 500 page.
            self.log("got prompt")
            return web.Response(
                status=500, text="500 Internal Server Error\n\nServer got itself in trouble", content_type="text/plain"
            )
        status, payload = self.queue_prompt(body)
        return web.json_response(payload, status=status)

    async def post_queue(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        if body.get("clear"):
            self.queue.wipe_queue()
        for prompt_id in body.get("delete") or []:
            self.queue.delete_queued(str(prompt_id))
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        try:
            max_items = int(query["max_items"]) if "max_items" in query else None
            offset = int(query.get("offset", -1))
        except ValueError:
            return web.Response(status=400)
        return web.json_response(self.queue.get_history(max_items=max_items, offset=offset))

    async def get_history_item(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.queue.get_history(prompt_id=request.match_info["prompt_id"]))

    async def post_history(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        if body.get("clear"):
            self.queue.wipe_history()
        for prompt_id in body.get("delete") or []:
            self.queue.delete_history(str(prompt_id))
        return web.Response(status=200)

    def _list_files(self) -> Callable[[str], list[str]]:
        memo: dict[str, list[str]] = {}

        def list_files(folder: str) -> list[str]:
            if folder not in memo:
                memo[folder] = (
                    fp.list_input_images(self.folders.input)
                    if folder == "input"
                    else fp.list_models(self.folders.model_dirs(folder))
                )
            return memo[folder]

        return list_files

    async def object_info(self, request: web.Request) -> web.StreamResponse:
        list_files = self._list_files()
        return web.json_response({name: d.to_info(list_files) for name, d in self.defs.items()})

    async def object_info_one(self, request: web.Request) -> web.StreamResponse:
        node = self.defs.get(request.match_info["node_class"])
        return web.json_response({} if node is None else {node.name: node.to_info(self._list_files())})

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        filename, kind = fp.annotated(query["filename"])
        if not filename:
            return web.Response(status=400)
        if filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        folder = self.folders.directory_by_type(kind or query.get("type") or "output")
        if folder is None:
            return web.Response(status=400)
        if "subfolder" in query:
            sub = folder / query["subfolder"]
            if not fp.inside(folder, sub):
                return web.Response(status=403)
            folder = sub
        name = os.path.basename(filename)
        path = folder / name
        if not path.is_file():
            return web.Response(status=404)
        return web.FileResponse(path, headers={"Content-Disposition": f'filename="{name}"'})

    async def upload_image(self, request: web.Request) -> web.StreamResponse:
        post = await request.post()
        image = post.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        kind = str(post.get("type") or "input")
        root = self.folders.directory_by_type(kind)
        if root is None:
            return web.Response(status=400)
        subfolder = str(post.get("subfolder", ""))
        folder = root / os.path.normpath(subfolder) if subfolder else root
        filename = image.filename
        path = folder / filename
        if not fp.inside(root, path) or "/" in filename:
            return web.Response(status=400)
        data = image.file.read()
        if str(post.get("overwrite", "")) not in ("true", "1"):
            stem, ext = os.path.splitext(filename)
            i = 1
            while path.exists() and path.read_bytes() != data:
                filename = f"{stem} ({i}){ext}"
                path = folder / filename
                i += 1
        if not path.exists() or path.read_bytes() != data:
            atomic_write(path, data)
        return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})

    async def interrupt(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        prompt_id = body.get("prompt_id")
        if prompt_id:
            if self.executor.prompt_id == prompt_id:
                self.log(f"Interrupting prompt {prompt_id}")
                self.executor.interrupt()
            else:
                self.log(f"Prompt {prompt_id} is not currently running, skipping interrupt")
        else:
            self.log("Global interrupt (no prompt_id specified)")
            self.executor.interrupt()
        return web.Response(status=200)

    async def free(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        unload = bool(body.get("unload_models", False))
        free_memory = bool(body.get("free_memory", False))
        self.free_requests.append({"unload_models": unload, "free_memory": free_memory})
        self.log(f"Free request: unload_models={unload} free_memory={free_memory}")
        if unload:
            self.queue.set_flag("unload_models", unload)
        if free_memory:
            self.queue.set_flag("free_memory", free_memory)
        if not self.queue.running:
            self.apply_free_flags()
        return web.Response(status=200)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        names = fp.list_models(self.folders.model_dirs("embeddings"))
        return web.json_response([os.path.splitext(n)[0] for n in names])

    async def extensions(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([])

    async def model_types(self, request: web.Request) -> web.StreamResponse:
        keys = {
            "checkpoints",
            "loras",
            "vae",
            "text_encoders",
            "diffusion_models",
            "clip_vision",
            "style_models",
            "embeddings",
            "diffusers",
            "vae_approx",
            "controlnet",
            "gligen",
            "upscale_models",
            "hypernetworks",
            "photomaker",
            "classifiers",
            "model_patches",
            "audio_encoders",
        }
        keys |= {
            sp.key
            for sp in self.folders.extra
            if sp.key not in ("custom_nodes", "input", "user", "workflows")
        }
        return web.json_response(sorted(keys))

    async def model_list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(fp.list_models(self.folders.model_dirs(request.match_info["folder"])))

    async def features(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.server_features())

    def server_features(self) -> dict[str, Any]:
        return {
            "supports_preview_metadata": True,
            "max_upload_size": int(self.args.max_upload_size * 1024 * 1024),
        }

    # ---- WebSocket ----------------------------------------------------------------------
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
            await ws.send_json({"type": "status", "data": {"status": self.queue.queue_info(), "sid": sid}})
            if self.executor.client_id == sid and self.executor.last_node_id is not None:
                await ws.send_json({"type": "executing", "data": {"node": self.executor.last_node_id}})
            first = True
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._ws_message(sid, msg.data, first)
                    first = False
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    self.log(f"ws connection closed with exception {ws.exception()}")
        except _SEND_ERRORS:
            pass
        finally:
            if self.sockets.get(sid) is ws:
                del self.sockets[sid]
        return ws

    def _ws_message(self, sid: str, text: str, first: bool) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            self.log(f"Invalid JSON received from client {sid}: {text}")
            return
        if not isinstance(data, Mapping):
            return
        kind = data.get("type")
        if kind == "feature_flags" and first:
            self.send("feature_flags", self.server_features(), sid)
        elif self.protocol != "fork":
            return  # upstream ignores every other client message
        elif kind == "ping":
            self.send_raw({"type": "pong"}, sid)
        elif kind == "prompt":
            raw = data.get("data")
            payload: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
            body: dict[str, Any] = {
                k: payload[k]
                for k in ("prompt", "prompt_id", "number", "front", "partial_execution_targets")
                if k in payload
            }
            body["extra_data"] = (
                payload.get("extra_data") if isinstance(payload.get("extra_data"), Mapping) else {}
            )
            body["client_id"] = sid
            status, result = self.queue_prompt(body)
            self.send("prompt_queued" if status == 200 else "error", result, sid)


async def _json_body(request: web.Request) -> Any:
    """The request's JSON body; None when it is empty or not JSON."""
    text = await request.text()
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


async def _json_object(request: web.Request) -> Mapping[str, Any]:
    """The request's JSON body when it is an object, else an empty one."""
    body = await _json_body(request)
    return body if isinstance(body, Mapping) else {}


def origin_mismatch(host: str, origin: str) -> bool:
    """ComfyUI's rule: for a loopback Host, the Origin's host[:port] must match it."""
    from urllib.parse import urlparse, urlsplit

    host_domain = host.lower()
    parsed = urlparse(origin)
    origin_domain = parsed.netloc.lower()
    host_parsed = urlsplit("//" + host_domain)
    try:
        origin_port, host_port = parsed.port, host_parsed.port
    except ValueError:
        return True
    if not _is_loopback(host_parsed.hostname):
        return False
    if origin_port is None:
        host_domain = host_parsed.hostname or ""
    if host_port is None:
        origin_domain = parsed.hostname or ""
    return bool(host_domain) and bool(origin_domain) and host_domain != origin_domain


def _is_loopback(hostname: str | None) -> bool:
    import ipaddress

    if not hostname:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname.strip("[]")).is_loopback
    except ValueError:
        return False


async def _serve(sim: Simulator, addresses: list[str], port: int) -> int:
    """Bind, serve until stopped; the exit code."""
    loop = asyncio.get_running_loop()
    sim.stopper.attach(loop, sim.stop)
    delay = sim.faults.start_delay
    if delay > 0:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(sim.stop.wait(), timeout=delay)
    if sim.stop.is_set():
        _remove_temp(sim.folders.temp)
        return 0
    if sim.args.quick_test_for_ci:
        _remove_temp(sim.folders.temp)
        return 0
    runner = web.AppRunner(sim.build_app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    sim.log("Starting server\n")
    try:
        for address in addresses:
            await web.TCPSite(runner, address, port).start()
            shown = f"[{address}]" if ":" in address else address
            sim.log(f"To see the GUI go to: http://{shown}:{port}")
    except OSError:
        sim.log(traceback.format_exc().rstrip())
        await runner.cleanup()
        return 1
    sim.ready_at = time.monotonic()
    sim.tasks = [asyncio.create_task(c) for c in (sim.publisher(), sim.worker(), sim.fault_monitor())]
    for task in sim.tasks:
        task.add_done_callback(sim.task_died)
    await sim.stop.wait()
    for task in sim.tasks:
        task.cancel()
    for ws in list(sim.sockets.values()):
        with contextlib.suppress(*_SEND_ERRORS):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
    await runner.cleanup()
    _remove_temp(sim.folders.temp)
    sim.log("\nStopped server")
    return 0


def run(
    comfy_dir: str | os.PathLike[str] | None = None,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    stream: IO[str] | None = None,
) -> int:
    """Start the simulator as ``python main.py <argv>`` would; returns the exit code.

    Args:
        comfy_dir: the code tree (main.py's folder); default the current directory.
        argv: flags (default ``sys.argv[1:]``). Bad flags exit 2, as argparse does.
        env: environment for faults (default ``os.environ``).
        stream: where the log goes (default stdout).
    """
    args = cli_args.parse_args(argv)
    environ = os.environ if env is None else env
    log = Console(stream)
    root = Path(os.path.abspath(comfy_dir or os.getcwd()))
    stopper = Stopper()
    env_faults, warnings = faultlib.from_env(environ)
    for w in warnings:
        log(w)
    # Install both handlers unconditionally: a parent that ignored SIGINT (a background job of a
    # non-interactive shell, ``make test </dev/null &``) passes SIG_IGN on through exec, and
    # Python would then leave SIGINT ignored, so only SIGKILL could stop an ignore_sigterm run.
    signal.signal(signal.SIGINT, stopper)
    # ComfyUI installs no SIGTERM handler: the default action ends it at once (exit -15, temp folder
    # left behind), hung or not. Only SIGINT is a graceful stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN if env_faults.ignore_sigterm else signal.SIG_DFL)

    try:
        extra = load_extra_paths(list(itertools.chain(*(args.extra_model_paths_config or []))), root, log)
    except StartupFailure as exc:
        log(startup.crash_text(root, exc.exc_line))
        return 1
    folders = fp.resolve(args, root, extra)
    if args.output_directory:
        log(f"Setting output directory to: {folders.output}")
    if args.input_directory:
        log(f"Setting input directory to: {folders.input}")
    if args.user_directory:
        log(f"Setting user directory to: {folders.user}")
    if args.temp_directory:
        log(f"Setting temp directory to: {folders.temp}")
    _remove_temp(folders.temp)
    for d in (folders.output, folders.input, folders.temp, folders.user):
        d.mkdir(parents=True, exist_ok=True)

    file_values, warnings = faultlib.read_file(folders.user / faultlib.FAULTS_FILE)
    faults, more = faultlib.overlay(env_faults, file_values, str(folders.user / faultlib.FAULTS_FILE))
    for w in warnings + more:
        log(w)
    if faults.ignore_sigterm and not env_faults.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    if not args.cpu:
        if args.cuda_device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.cuda_device)
            log(f"Set cuda device to: {args.cuda_device}")
        visible = environ.get("CUDA_VISIBLE_DEVICES") if args.cuda_device is None else str(args.cuda_device)
        if visible is not None and visible.strip() in ("", "-1"):
            log(startup.crash_text(root, "RuntimeError: No CUDA GPUs are available"))
            return 1
    ram_total, _ = startup.memory_bytes()
    state = startup.vram_state(args.cpu, args.lowvram, args.novram, args.highvram, args.gpu_only)
    for line in startup.device_lines(args.cpu, faults.gpu_name, faults.gpu_vram, ram_total, state):
        log(line)
    version = startup.comfyui_version(root)
    log(f"Python version: {sys.version}")
    log(f"ComfyUI version: {version}")
    log(f"ComfyUI frontend version: {startup.FRONTEND_VERSION}")
    log(f"[Prompt Server] web root: {Path(sys.prefix) / 'comfyui_frontend_package' / 'static'}")
    if folders.database is not None:
        try:
            folders.database.touch()
        except OSError as exc:
            log(
                "Failed to initialize database. Please ensure you have installed the latest requirements. "
                "If the error persists, please report this as in future the database will be required: "
                f"(sqlite3.OperationalError) unable to open database file ({exc.strerror})"
            )

    extra_nodes = [n for n in environ.get("SIM_EXTRA_NODES", "").split(",") if n.strip()]
    results, skipped = startup.scan_custom_nodes(
        folders.custom_node_dirs(),
        root,
        faults.import_failed,
        args.disable_all_custom_nodes,
        args.whitelist_custom_nodes,
    )
    for line in skipped:
        log(line)
    for r in results:
        for line in r.log:
            log(line)
    for line in startup.import_times(results):
        log(line)

    protocol = environ.get("SIM_PROTOCOL", "").strip().lower() or "upstream"
    if protocol not in PROTOCOLS:
        log(f"simulator: ignoring SIM_PROTOCOL={protocol!r} (expected one of {', '.join(PROTOCOLS)}); using upstream")
        protocol = "upstream"
    sim = Simulator(args, folders, env_faults, catalogue(extra_nodes), log, stopper, version, protocol)
    sim.faults = faults
    addresses = [a.strip() for a in str(args.listen).split(",") if a.strip()]
    return asyncio.run(_serve(sim, addresses, args.port))


def main(comfy_dir: str | os.PathLike[str] | None = None) -> None:
    """Entry point of the tree's ``main.py`` and of ``python -m orchestrator.simulator``."""
    sys.exit(run(comfy_dir))
