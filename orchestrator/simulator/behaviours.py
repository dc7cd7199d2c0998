"""What each simulated node class does once it runs: the failure it was told to raise, the size of
the image or latent it yields, the PNGs it writes, the VRAM its model takes.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.simulator import folders as fp
from orchestrator.simulator.failures import NodeFailure, fake_traceback, oom_failure
from orchestrator.simulator.graph import is_link, node_inputs
from orchestrator.simulator.nodedefs import NodeDef
from orchestrator.simulator.png import png_bytes, png_size

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


@dataclasses.dataclass(frozen=True)
class NodeResult:
    dims: tuple[int, int, int]  # width, height, batch of the image/latent this node produces
    ui: dict[str, Any] | None = None


def png_metadata(prompt: Mapping[str, Any], extra_data: Mapping[str, Any]) -> dict[str, str]:
    """ComfyUI's PNG text chunks: the prompt and each ``extra_pnginfo`` entry, as JSON."""
    text = {"prompt": json.dumps(prompt)}
    extra = extra_data.get("extra_pnginfo")
    if isinstance(extra, Mapping):
        text.update({str(k): json.dumps(v) for k, v in extra.items()})
    return text


def int_input(node: Mapping[str, Any], name: str, default: int) -> int:
    try:
        return int(node_inputs(node).get(name, default))
    except (TypeError, ValueError, OverflowError):
        return default


def units(node: Mapping[str, Any]) -> int:
    """Shares of the prompt's simulated time this node takes (a KSampler: one per progress step)."""
    if node.get("class_type") == "KSampler":
        return max(1, min(int_input(node, "steps", 20), MAX_PROGRESS_MESSAGES))
    return 1


def planted_failure(
    node_id: str, node: Mapping[str, Any], cls: NodeDef, comfy_dir: Path, vram_total: int
) -> NodeFailure | None:
    """The failure a prompt asked this node for (an ``__oom__``/``__fail__`` input, SimulatedError)."""
    constants = [v for v in node_inputs(node).values() if not is_link(v)]
    if OOM_VALUE in constants:
        return oom_failure(comfy_dir, vram_total)
    if cls.name == "SimulatedError" or FAIL_VALUE in constants:
        message = str(node_inputs(node).get("message") or "simulated failure")
        if FAIL_VALUE in constants:
            message = f"simulated failure: an input of node {node_id} is {FAIL_VALUE!r}"
        return NodeFailure(
            "RuntimeError",
            message,
            fake_traceback(comfy_dir, "custom_nodes/simulated/__init__.py", "run", "raise RuntimeError(message)"),
        )
    return None


def _upstream_dims(node: Mapping[str, Any], cls: NodeDef, results: Mapping[str, NodeResult]) -> tuple[int, int, int]:
    """Size of the first linked image or latent input (model and conditioning inputs carry none)."""
    inputs = node_inputs(node)
    for spec in cls.inputs():
        value = inputs.get(spec.name)
        if spec.type in PIXEL_TYPES and is_link(value) and len(value) == 2 and str(value[0]) in results:
            return results[str(value[0])].dims
    return DEFAULT_DIMS


def node_dims(
    node: Mapping[str, Any], cls: NodeDef, results: Mapping[str, NodeResult], folders: fp.Folders
) -> tuple[int, int, int]:
    """Width, height and batch of what this node yields, from its inputs and upstream results."""
    up = _upstream_dims(node, cls, results)
    if cls.name in ("EmptyLatentImage", "EmptyImage"):
        return (int_input(node, "width", 512), int_input(node, "height", 512), int_input(node, "batch_size", 1))
    if cls.name in ("LatentUpscale", "ImageScale"):
        w, h = int_input(node, "width", 0), int_input(node, "height", 0)
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
        folder = folders.directory_by_type(kind or "input") or folders.input
        try:
            with open(folder / name, "rb") as fh:
                size = png_size(fh.read(32))
        except OSError:
            size = None
        return (*(size or DEFAULT_DIMS[:2]), 1)
    return up


@dataclasses.dataclass(frozen=True)
class ImageWriter:
    """SaveImage and PreviewImage: real PNGs in the output or temp folder, named as ComfyUI names them."""

    folders: fp.Folders
    write_file: Callable[[Path, bytes], None]

    def result(
        self, node: Mapping[str, Any], cls: NodeDef, dims: tuple[int, int, int], sig: str, png_text: Mapping[str, str]
    ) -> NodeResult:
        """The node's result, with the images it wrote as its ``ui`` output when it saves any."""
        if cls.name == "SaveImage":
            return NodeResult(dims, self._save(node, dims, sig, png_text, "output", ""))
        if cls.name == "PreviewImage":
            letters = (random.choice(string.ascii_lowercase) for _ in range(5))  # noqa: S311 - not security
            return NodeResult(dims, self._save(node, dims, sig, png_text, "temp", "_temp_" + "".join(letters)))
        return NodeResult(dims)

    def _save(
        self,
        node: Mapping[str, Any],
        dims: tuple[int, int, int],
        sig: str,
        png_text: Mapping[str, str],
        kind: str,
        suffix: str,
    ) -> dict[str, Any]:
        root = self.folders.output if kind == "output" else self.folders.temp
        width, height, batch = dims
        prefix = str(node_inputs(node).get("filename_prefix", "ComfyUI")) + suffix
        images = []
        try:
            folder, filename, counter, subfolder = fp.save_path(prefix, root, width, height)
            for b in range(max(1, min(batch, MAX_BATCH))):
                name = f"{filename.replace('%batch_num%', str(b))}_{counter:05}_.png"
                side_w, side_h = min(max(width, 1), MAX_SIDE), min(max(height, 1), MAX_SIDE)
                self.write_file(folder / name, png_bytes(side_w, side_h, int(sig[:6], 16) + b, png_text))
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
