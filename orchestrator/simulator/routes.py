"""The HTTP handlers, in ComfyUI's shapes: the queue side (stats, prompts, history, interrupt,
free) and the file side (node info, images, model lists). ``app.py`` mounts them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from orchestrator.machine.fs import atomic_write
from orchestrator.simulator import folders as fp
from orchestrator.simulator import startup
from orchestrator.simulator.instance import Simulator

BASELINE_VRAM = 300 * 1024**2  # bytes the CUDA context takes before any model is loaded
MODEL_TYPES = frozenset({
    "checkpoints", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision", "style_models",
    "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models", "hypernetworks",
    "photomaker", "classifiers", "model_patches", "audio_encoders",
})  # the folder keys /models lists, besides those of extra search paths


async def json_body(request: web.Request) -> Any:
    """The request's JSON body; None when it is empty or not JSON."""
    text = await request.text()
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


async def json_object(request: web.Request) -> Mapping[str, Any]:
    """The request's JSON body when it is an object, else an empty one."""
    body = await json_body(request)
    return body if isinstance(body, Mapping) else {}


class QueueRoutes:
    """/system_stats, /queue, /prompt, /history, /interrupt and /free."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def device_info(self) -> dict[str, Any]:
        ram_total, ram_free = startup.memory_bytes()
        if self.sim.args.cpu:
            return {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": ram_total,
                "vram_free": ram_free,
                "torch_vram_total": ram_total,
                "torch_vram_free": ram_free,
            }
        total = self.sim.faults.gpu_vram
        loaded = self.sim.executor.loaded_bytes()
        reserved = loaded + (64 * 1024**2 if loaded else 0)
        return {
            "name": startup.device_name(self.sim.faults.gpu_name),
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
                    "comfyui_version": self.sim.version,
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
        queue = self.sim.queue
        return web.json_response(
            {
                "queue_running": [item.public() for item in queue.running.values()],
                "queue_pending": [item.public() for item in queue.pending],
            }
        )

    async def get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.sim.queue.queue_info())

    async def post_prompt(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        if body is None:
            # ComfyUI's handler lets the JSONDecodeError escape: aiohttp answers its plain 500 page.
            self.sim.log("got prompt")
            return web.Response(
                status=500, text="500 Internal Server Error\n\nServer got itself in trouble", content_type="text/plain"
            )
        status, payload = self.sim.queue_prompt(body)
        return web.json_response(payload, status=status)

    async def post_queue(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        if body.get("clear"):
            self.sim.queue.wipe_queue()
        for prompt_id in body.get("delete") or []:
            self.sim.queue.delete_queued(str(prompt_id))
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        try:
            max_items = int(query["max_items"]) if "max_items" in query else None
            offset = int(query.get("offset", -1))
        except ValueError:
            return web.Response(status=400)
        return web.json_response(self.sim.queue.get_history(max_items=max_items, offset=offset))

    async def get_history_item(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.sim.queue.get_history(prompt_id=request.match_info["prompt_id"]))

    async def post_history(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        if body.get("clear"):
            self.sim.queue.wipe_history()
        for prompt_id in body.get("delete") or []:
            self.sim.queue.delete_history(str(prompt_id))
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        prompt_id = body.get("prompt_id")
        executor = self.sim.executor
        if prompt_id:
            if executor.prompt_id == prompt_id:
                self.sim.log(f"Interrupting prompt {prompt_id}")
                executor.interrupt()
            else:
                self.sim.log(f"Prompt {prompt_id} is not currently running, skipping interrupt")
        else:
            self.sim.log("Global interrupt (no prompt_id specified)")
            executor.interrupt()
        return web.Response(status=200)

    async def free(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        self.sim.request_free(bool(body.get("unload_models", False)), bool(body.get("free_memory", False)))
        return web.Response(status=200)


class FileRoutes:
    """/object_info, /view, /upload/image, the model lists, /features and the index page."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.folders = sim.folders

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            text=f"<!doctype html><title>ComfyUI</title><p>ComfyUI simulator {self.sim.version}</p>",
            content_type="text/html",
        )

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
        return web.json_response({name: d.to_info(list_files) for name, d in self.sim.defs.items()})

    async def object_info_one(self, request: web.Request) -> web.StreamResponse:
        node = self.sim.defs.get(request.match_info["node_class"])
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

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        names = fp.list_models(self.folders.model_dirs("embeddings"))
        return web.json_response([os.path.splitext(n)[0] for n in names])

    async def extensions(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([])

    async def model_types(self, request: web.Request) -> web.StreamResponse:
        keys = set(MODEL_TYPES)
        keys |= {
            sp.key
            for sp in self.folders.extra
            if sp.key not in ("custom_nodes", "input", "user", "workflows")
        }
        return web.json_response(sorted(keys))

    async def model_list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(fp.list_models(self.folders.model_dirs(request.match_info["folder"])))

    async def features(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.sim.server_features())
