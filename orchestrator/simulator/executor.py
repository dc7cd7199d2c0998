"""The prompt queue, history and the (simulated) executor: one prompt at a time, like ComfyUI."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import string
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from orchestrator.machine.fs import atomic_write
from orchestrator.simulator import folders as fp
from orchestrator.simulator.graph import execution_order, is_link, node_inputs, signatures
from orchestrator.simulator.nodes import NodeDef
from orchestrator.simulator.png import png_bytes, png_size

MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
DEFAULT_DIMS = (512, 512, 1)  # width, height, batch
MAX_SIDE = 2048  # pixels; larger images are written at this size to keep the simulator light
MAX_BATCH = 16
MAX_PROGRESS_MESSAGES = 20
LOADER_BYTES = {  # simulated VRAM a loaded model takes, in bytes
    "CheckpointLoaderSimple": 2 * 1024**3,
    "LoraLoader": 150 * 1024**2,
    "VAELoader": 160 * 1024**2,
    "UpscaleModelLoader": 64 * 1024**2,
    "ControlNetLoader": 700 * 1024**2,
}
PIXEL_TYPES = frozenset({"IMAGE", "LATENT", "*"})
FAIL_VALUE = "__fail__"
OOM_VALUE = "__oom__"


class Send(Protocol):
    def __call__(self, event: str, data: Mapping[str, Any], sid: str | None) -> None: ...


@dataclasses.dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    sensitive: dict[str, Any] = dataclasses.field(default_factory=dict)

    def public(self) -> list[Any]:
        """The item as /queue and /history show it (sensitive extra data removed)."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class PromptQueue:
    """Pending prompts ordered by number, the running one, and the history (in memory only)."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self.pending: list[QueueItem] = []
        self.running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, Any] = {}
        self._number = 0
        self._task_counter = 0
        self._wakeup = asyncio.Event()

    def next_number(self, front: bool = False) -> int:
        number = self._number
        self._number += 1
        return -number if front else number

    def put(self, item: QueueItem) -> None:
        index = len(self.pending)
        while index > 0 and self.pending[index - 1].number > item.number:
            index -= 1
        self.pending.insert(index, item)
        self._wakeup.set()
        self._on_change()

    async def get(self) -> tuple[int, QueueItem]:
        while not self.pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        item = self.pending.pop(0)
        self._task_counter += 1
        self.running[self._task_counter] = item
        self._on_change()
        return self._task_counter, item

    def task_done(self, task_id: int, entry: dict[str, Any]) -> None:
        item = self.running.pop(task_id)
        if len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))
        self.history[item.prompt_id] = entry
        self._on_change()

    def remaining(self) -> int:
        return len(self.pending) + len(self.running)

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def wipe_queue(self) -> None:
        self.pending.clear()
        self._on_change()

    def delete_queued(self, prompt_id: str) -> bool:
        for i, item in enumerate(self.pending):
            if item.prompt_id == prompt_id:
                del self.pending[i]
                self._on_change()
                return True
        return False

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        if prompt_id is not None:
            return {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        out: dict[str, Any] = {}
        for i, (key, value) in enumerate(self.history.items()):
            if i >= offset:
                out[key] = value
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def wipe_history(self) -> None:
        self.history.clear()

    def delete_history(self, prompt_id: str) -> None:
        self.history.pop(prompt_id, None)

    def set_flag(self, name: str, value: Any) -> None:
        self.flags[name] = value

    def take_flags(self) -> dict[str, Any]:
        flags, self.flags = self.flags, {}
        return flags


class Interrupted(Exception):
    """POST /interrupt reached the running prompt."""


@dataclasses.dataclass
class NodeFailure(Exception):
    exception_type: str
    message: str
    traceback: list[str]

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True)
class NodeResult:
    dims: tuple[int, int, int]  # width, height, batch of the image/latent this node produces
    ui: dict[str, Any] | None = None


def oom_message(total_bytes: int) -> str:
    total = total_bytes / 1024**3
    return (
        f"CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of {total:.2f} GiB of "
        f"which {min(1.02, total):.2f} GiB is free. Including non-PyTorch memory, this process has "
        f"{max(total - 1.02, 0):.2f} GiB memory in use. Of the allocated memory "
        f"{max(total - 3.5, 0):.2f} GiB is allocated by PyTorch, and 1.98 GiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  "
        "See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html"
        "#environment-variables)"
    )


def fake_traceback(comfy_dir: Path, node_file: str, func: str, line: str) -> list[str]:
    """Traceback frames in ComfyUI's shape (``traceback.format_tb`` strings)."""
    ex = comfy_dir / "execution.py"
    return [
        f'  File "{ex}", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = '
        "await get_output_data(prompt_id, unique_id, obj, input_data_all, "
        "execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
        "hidden_inputs=hidden_inputs)\n",
        f'  File "{ex}", line 315, in get_output_data\n    return_values = await _async_map_node_over_list('
        "prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, "
        "execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
        "hidden_inputs=hidden_inputs)\n",
        f'  File "{ex}", line 289, in _async_map_node_over_list\n    await process_inputs(input_dict, i)\n',
        f'  File "{ex}", line 277, in process_inputs\n    result = f(**inputs)\n',
        f'  File "{comfy_dir / node_file}", line 1525, in {func}\n    {line}\n',
    ]


def format_exception(failure: NodeFailure) -> str:
    return (
        "Traceback (most recent call last):\n"
        + "".join(failure.traceback)
        + (f"{failure.exception_type}: {failure.message}")
    )


def oom_failure(comfy_dir: Path, total_bytes: int) -> NodeFailure:
    return NodeFailure(
        "torch.OutOfMemoryError",
        oom_message(total_bytes),
        fake_traceback(
            comfy_dir,
            "nodes.py",
            "sample",
            "return common_ksampler(model, seed, steps, cfg, "
            "sampler_name, scheduler, positive, negative, latent_image, denoise=denoise)",
        ),
    )


def png_metadata(prompt: Mapping[str, Any], extra_data: Mapping[str, Any]) -> dict[str, str]:
    """ComfyUI's PNG text chunks: the prompt and each ``extra_pnginfo`` entry, as JSON."""
    text = {"prompt": json.dumps(prompt)}
    extra = extra_data.get("extra_pnginfo")
    if isinstance(extra, Mapping):
        text.update({str(k): json.dumps(v) for k, v in extra.items()})
    return text


def _constants(node: Mapping[str, Any]) -> list[Any]:
    return [v for v in node_inputs(node).values() if not is_link(v)]


def _int_input(node: Mapping[str, Any], name: str, default: int) -> int:
    try:
        return int(node_inputs(node).get(name, default))
    except (TypeError, ValueError, OverflowError):
        return default


class Executor:
    """Runs one prompt: events over ``send``, outputs on disk, node results cached by signature."""

    def __init__(
        self,
        folders: fp.Folders,
        defs: Mapping[str, NodeDef],
        send: Send,
        log: Callable[[str], None],
        vram_total: Callable[[], int],
        write_file: Callable[[Path, bytes], None] | None = None,
    ) -> None:
        self.folders = folders
        self.defs = defs
        self.send = send
        self.log = log
        self.vram_total = vram_total
        self.write_file = write_file or (lambda path, data: atomic_write(path, data) and None)
        self.cache: dict[str, NodeResult] = {}
        self.interrupted = False
        self.prompt_id: str | None = None  # the prompt executing now
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.node_progress = False  # the fork's per-node node_executing messages (SIM_PROTOCOL=fork)
        self.loaded: dict[str, int] = {}  # model signature -> simulated VRAM bytes
        self._png_text: dict[str, str] = {}
        self._wake = asyncio.Event()

    def interrupt(self) -> None:
        self.interrupted = True
        self._wake.set()

    async def _work(self, seconds: float) -> None:
        """Simulated work: ``seconds`` of sleep that an interrupt cuts short."""
        if seconds > 0 and not self.interrupted:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._check_interrupt()

    def unload_models(self) -> None:
        self.loaded.clear()

    def loaded_bytes(self) -> int:
        return sum(self.loaded.values())

    def _check_interrupt(self) -> None:
        if self.interrupted:
            raise Interrupted()

    async def execute(self, item: QueueItem, exec_time: float) -> dict[str, Any]:
        """Run ``item``; return its history entry (without ``prompt``)."""
        pid = item.prompt_id
        prompt = item.prompt
        client = item.extra_data.get("client_id")
        self.client_id = client if isinstance(client, str) else None
        self.prompt_id = pid
        self.interrupted = False
        self._wake.clear()
        self._png_text = png_metadata(prompt, item.extra_data)
        messages: list[list[Any]] = []

        def add(event: str, data: dict[str, Any], broadcast: bool = False) -> None:
            stamped = {**data, "timestamp": int(time.time() * 1000)}
            messages.append([event, stamped])
            if self.client_id is not None or broadcast:
                self.send(event, stamped, self.client_id)

        add("execution_start", {"prompt_id": pid})
        sigs = signatures(prompt)
        add("execution_cached", {"nodes": [n for n in prompt if sigs[n] in self.cache], "prompt_id": pid})
        order = execution_order(prompt, item.outputs)
        to_run = [n for n in order if sigs[n] not in self.cache]
        units = sum(self._units(prompt[n]) for n in to_run) or 1
        unit_time = max(exec_time, 0.0) / units
        results: dict[str, NodeResult] = {}
        fresh: dict[str, NodeResult] = {}
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        executed: list[str] = []
        states: dict[str, dict[str, Any]] = {}
        success = False
        node_id = ""
        try:
            for node_id in order:
                node = prompt[node_id]
                cls = self.defs[str(node["class_type"])]
                sig = sigs[node_id]
                result = self.cache.get(sig)
                if result is None:
                    self._check_interrupt()
                    self._node_event(
                        "executing", {"node": node_id, "display_node": node_id, "prompt_id": pid}
                    )
                    if self.node_progress:
                        current = len(executed) + 1
                        self._node_event(
                            "node_executing",
                            {
                                "node": node_id,
                                "prompt_id": pid,
                                "class_type": cls.name,
                                "progress": {
                                    "current": current,
                                    "total": len(to_run),
                                    "percentage": round(100.0 * current / max(len(to_run), 1), 1),
                                },
                            },
                        )
                    self.last_node_id = node_id
                    states[node_id] = self._state(node_id, pid, "running", 0, 1)
                    self._node_event("progress_state", {"prompt_id": pid, "nodes": dict(states)})
                    result = await self._run_node(node_id, node, cls, results, sig, unit_time, pid)
                    fresh[sig] = result
                    executed.append(node_id)
                    states[node_id] = self._state(node_id, pid, "finished", 1, 1)
                    self._node_event("progress_state", {"prompt_id": pid, "nodes": dict(states)})
                results[node_id] = result
                if result.ui:
                    outputs[node_id] = result.ui
                    meta[node_id] = {
                        "node_id": node_id,
                        "display_node": node_id,
                        "parent_node": None,
                        "real_node_id": node_id,
                    }
                    self._node_event(
                        "executed",
                        {"node": node_id, "display_node": node_id, "output": result.ui, "prompt_id": pid},
                    )
            success = True
            add("execution_success", {"prompt_id": pid})
        except Interrupted:
            self.log("Processing interrupted")
            add(
                "execution_interrupted",
                {
                    "prompt_id": pid,
                    "node_id": node_id,
                    "node_type": prompt[node_id]["class_type"],
                    "executed": executed,
                },
                broadcast=True,
            )
        except NodeFailure as failure:
            self.log(f"!!! Exception during processing !!! {failure.message}")
            self.log(format_exception(failure))
            if failure.exception_type == "torch.OutOfMemoryError":
                self.log("")
                self.log("Got an OOM, unloading all loaded models.")
                self.unload_models()
            inputs = node_inputs(prompt[node_id])
            add(
                "execution_error",
                {
                    "prompt_id": pid,
                    "node_id": node_id,
                    "node_type": prompt[node_id]["class_type"],
                    "executed": executed,
                    "exception_message": failure.message,
                    "exception_type": failure.exception_type,
                    "traceback": failure.traceback,
                    "current_inputs": {k: [v] for k, v in inputs.items() if not is_link(v)},
                    "current_outputs": list(item.outputs),
                },
            )
        finally:
            # Like ComfyUI's classic cache: keep only what the latest prompt used.
            live = set(sigs.values())
            self.cache = {s: r for s, r in {**self.cache, **fresh}.items() if s in live}
            self.last_node_id = None
            self.prompt_id = None
        return {
            "outputs": outputs,
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": messages,
            },
            "meta": meta,
        }

    def _node_event(self, event: str, data: dict[str, Any]) -> None:
        if self.client_id is not None:
            self.send(event, data, self.client_id)

    @staticmethod
    def _state(node_id: str, pid: str, state: str, value: int, maximum: int) -> dict[str, Any]:
        return {
            "value": value,
            "max": maximum,
            "state": state,
            "node_id": node_id,
            "prompt_id": pid,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }

    @staticmethod
    def _units(node: Mapping[str, Any]) -> int:
        if node.get("class_type") == "KSampler":
            return max(1, min(_int_input(node, "steps", 20), MAX_PROGRESS_MESSAGES))
        return 1

    def _upstream_dims(
        self, node: Mapping[str, Any], cls: NodeDef, results: Mapping[str, NodeResult]
    ) -> tuple[int, int, int]:
        """Size of the first linked image or latent input (model and conditioning inputs carry none)."""
        inputs = node_inputs(node)
        for spec in cls.inputs():
            value = inputs.get(spec.name)
            if spec.type in PIXEL_TYPES and is_link(value) and len(value) == 2 and str(value[0]) in results:
                return results[str(value[0])].dims
        return DEFAULT_DIMS

    async def _run_node(
        self,
        node_id: str,
        node: Mapping[str, Any],
        cls: NodeDef,
        results: Mapping[str, NodeResult],
        sig: str,
        unit_time: float,
        pid: str,
    ) -> NodeResult:
        constants = _constants(node)
        units = self._units(node)
        if cls.name == "KSampler":
            steps = max(1, _int_input(node, "steps", 20))
            for i in range(units):
                await self._work(unit_time)
                self._node_event(
                    "progress",
                    {
                        "value": max(1, steps * (i + 1) // units),
                        "max": steps,
                        "prompt_id": pid,
                        "node": node_id,
                    },
                )
        else:
            await self._work(unit_time)
        if OOM_VALUE in constants:
            raise oom_failure(self.folders.comfy_dir, self.vram_total())
        if cls.name == "SimulatedError" or FAIL_VALUE in constants:
            message = str(node_inputs(node).get("message") or "simulated failure")
            if FAIL_VALUE in constants:
                message = f"simulated failure: an input of node {node_id} is {FAIL_VALUE!r}"
            raise NodeFailure(
                "RuntimeError",
                message,
                fake_traceback(
                    self.folders.comfy_dir,
                    "custom_nodes/simulated/__init__.py",
                    "run",
                    "raise RuntimeError(message)",
                ),
            )
        if cls.name in LOADER_BYTES:
            self.loaded[sig] = LOADER_BYTES[cls.name]
        dims = self._dims(node, cls, results)
        if cls.name == "SaveImage":
            return NodeResult(dims, self._save(node, dims, sig, self.folders.output, "output", ""))
        if cls.name == "PreviewImage":
            suffix = "_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
            return NodeResult(dims, self._save(node, dims, sig, self.folders.temp, "temp", suffix))
        return NodeResult(dims)

    def _dims(
        self, node: Mapping[str, Any], cls: NodeDef, results: Mapping[str, NodeResult]
    ) -> tuple[int, int, int]:
        up = self._upstream_dims(node, cls, results)
        if cls.name in ("EmptyLatentImage", "EmptyImage"):
            return (
                _int_input(node, "width", 512),
                _int_input(node, "height", 512),
                _int_input(node, "batch_size", 1),
            )
        if cls.name in ("LatentUpscale", "ImageScale"):
            w, h = _int_input(node, "width", 0), _int_input(node, "height", 0)
            if cls.name == "ImageScale" and bool(w) != bool(h):  # one side 0: keep the aspect ratio
                w = w or max(1, round(up[0] * h / max(up[1], 1)))
                h = h or max(1, round(up[1] * w / max(up[0], 1)))
            return (w or up[0], h or up[1], up[2])
        if cls.name == "ImageScaleBy":
            try:
                scale = float(node_inputs(node).get("scale_by", 1.0))
            except (TypeError, ValueError):
                scale = 1.0
            return (max(1, round(up[0] * scale)), max(1, round(up[1] * scale)), up[2])
        if cls.name == "ImageBatch":
            second = node_inputs(node).get("image2")
            extra = results[str(second[0])].dims[2] if is_link(second) and str(second[0]) in results else 1
            return (up[0], up[1], up[2] + extra)
        if cls.name == "ImageUpscaleWithModel":
            return (up[0] * 4, up[1] * 4, up[2])
        if cls.name == "LoadImage":
            name, kind = fp.annotated(str(node_inputs(node).get("image", "")))
            folder = self.folders.directory_by_type(kind or "input") or self.folders.input
            try:
                with open(folder / name, "rb") as fh:
                    size = png_size(fh.read(32))
            except OSError:
                size = None
            return (*(size or DEFAULT_DIMS[:2]), 1)
        return up

    def _save(
        self,
        node: Mapping[str, Any],
        dims: tuple[int, int, int],
        sig: str,
        root: Path,
        kind: str,
        suffix: str,
    ) -> dict[str, Any]:
        width, height, batch = dims
        prefix = str(node_inputs(node).get("filename_prefix", "ComfyUI")) + suffix
        images = []
        try:
            folder, filename, counter, subfolder = fp.save_path(prefix, root, width, height)
            for b in range(max(1, min(batch, MAX_BATCH))):
                name = f"{filename.replace('%batch_num%', str(b))}_{counter:05}_.png"
                side_w, side_h = min(max(width, 1), MAX_SIDE), min(max(height, 1), MAX_SIDE)
                self.write_file(
                    folder / name, png_bytes(side_w, side_h, int(sig[:6], 16) + b, self._png_text)
                )
                images.append({"filename": name, "subfolder": subfolder, "type": kind})
                counter += 1
        except (OSError, ValueError) as exc:
            exc_type = "Exception" if isinstance(exc, ValueError) else type(exc).__name__
            raise NodeFailure(
                exc_type,
                str(exc),
                fake_traceback(
                    self.folders.comfy_dir,
                    "nodes.py",
                    "save_images",
                    "img.save(os.path.join(full_output_folder, file), pnginfo=metadata, "
                    "compress_level=self.compress_level)",
                ),
            ) from None
        return {"images": images}
