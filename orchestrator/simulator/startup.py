"""What the simulator does and prints before it binds its port: paths, device, custom nodes."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

DEFAULT_VERSION = "0.3.64"
FRONTEND_VERSION = "1.27.10"
PYTORCH_VERSION = "2.8.0+cu128"
_VERSION_RE = re.compile(r"""__version__\s*=\s*["']([^"']+)["']""")


def comfyui_version(comfy_dir: Path) -> str:
    """The tree's ``comfyui_version.py`` version (read as text), else the simulated default."""
    try:
        match = _VERSION_RE.search((comfy_dir / "comfyui_version.py").read_text(errors="replace"))
    except OSError:
        return DEFAULT_VERSION
    return match.group(1) if match else DEFAULT_VERSION


@dataclasses.dataclass(frozen=True)
class NodeImport:
    path: Path
    ok: bool
    log: tuple[str, ...] = ()  # lines printed while importing (tracebacks, warnings)
    seconds: float = 0.0
    classes: tuple[str, ...] = ()  # the literal keys of its NODE_CLASS_MAPPINGS (shown in /object_info)


def declared_classes(text: str) -> tuple[str, ...]:
    """The string keys of a literal ``NODE_CLASS_MAPPINGS = {...}`` (never executed; () otherwise)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return ()
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
            isinstance(t, ast.Name) and t.id == "NODE_CLASS_MAPPINGS" for t in node.targets
        ):
            return tuple(k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return ()


def _failed(
    path: Path, comfy_dir: Path, exc_line: str, message: str, frames: Sequence[str] = ()
) -> NodeImport:
    tb = [
        "Traceback (most recent call last):",
        f'  File "{comfy_dir / "nodes.py"}", line 2131, in load_custom_node',
        "    module_spec.loader.exec_module(module)",
        '  File "<frozen importlib._bootstrap_external>", line 995, in exec_module',
        '  File "<frozen importlib._bootstrap>", line 488, in _call_with_frames_removed',
        *frames,
        exc_line,
        "",
        f"Cannot import {path} module for custom nodes: {message}",
    ]
    return NodeImport(path, False, tuple(tb))


def _raises_at_import(text: str, init: Path) -> tuple[str, str, list[str]] | None:
    """A module that cannot run: a syntax error, or a ``raise`` among its top-level statements.

    Returns (exception line, message, traceback frames) as ComfyUI would print them, else None.
    The code is parsed, never executed.
    """
    try:
        tree = ast.parse(text, filename=str(init))
    except (SyntaxError, ValueError) as err:
        message = f"{getattr(err, 'msg', err)} ({init.name}, line {getattr(err, 'lineno', 0) or 0})"
        return f"{type(err).__name__}: {message}", message, []
    for stmt in tree.body:
        if not isinstance(stmt, ast.Raise):
            continue
        kind, message = "RuntimeError", "No active exception to reraise"
        exc = stmt.exc
        if isinstance(exc, ast.Call):
            exc = exc.func if not exc.args else exc
            if isinstance(exc, ast.Call):
                if isinstance(exc.func, ast.Name):
                    kind = exc.func.id
                arg = exc.args[0]
                message = str(arg.value) if isinstance(arg, ast.Constant) else ast.unparse(arg)
        if isinstance(exc, ast.Name):
            kind, message = exc.id, ""
        line = text.splitlines()[stmt.lineno - 1].strip() if stmt.lineno else "raise"
        frames = [f'  File "{init}", line {stmt.lineno}, in <module>', f"    {line}"]
        return (f"{kind}: {message}" if message else kind), message, frames
    return None


def import_node(path: Path, comfy_dir: Path, fail: bool) -> NodeImport:
    """Decide, without executing it, whether ComfyUI would import the custom node at ``path``.

    A node fails when it is named in SIM_IMPORT_FAILED (``fail``), when a folder has no
    ``__init__.py``, or when its code declares neither NODE_CLASS_MAPPINGS nor
    comfy_entrypoint; these mirror ComfyUI's own failure paths.
    """
    init = path if path.is_file() else path / "__init__.py"
    if fail:
        missing = f"{path.stem.replace('-', '_').lower()}_dependency"
        return _failed(
            path,
            comfy_dir,
            f"ModuleNotFoundError: No module named '{missing}'",
            f"No module named '{missing}'",
            [f'  File "{init}", line 1, in <module>', f"    import {missing}"],
        )
    try:
        text = init.read_text(errors="replace")
    except FileNotFoundError:
        message = f"[Errno 2] No such file or directory: '{init}'"
        return _failed(path, comfy_dir, f"FileNotFoundError: {message}", message)
    except OSError as exc:
        message = f"[Errno {exc.errno}] {exc.strerror}: '{init}'"
        return _failed(path, comfy_dir, f"OSError: {message}", message)
    raised = _raises_at_import(text, init)
    if raised is not None:
        exc_line, message, frames = raised
        return _failed(path, comfy_dir, exc_line, message, frames)
    if "NODE_CLASS_MAPPINGS" not in text and "comfy_entrypoint" not in text:
        return NodeImport(
            path,
            False,
            (
                f"Skip {path} module for custom nodes due to the lack of NODE_CLASS_MAPPINGS or NODES_LIST "
                "(need one).",
            ),
        )
    return NodeImport(path, True, classes=declared_classes(text))


def scan_custom_nodes(
    dirs: Iterable[Path],
    comfy_dir: Path,
    failed: Iterable[str],
    disable_all: bool = False,
    whitelist: Sequence[str] = (),
) -> tuple[list[NodeImport], list[str]]:
    """Every custom node ComfyUI would try to load, plus the "Skipping ..." lines for disabled ones.

    Names in ``failed`` that match no folder still get an IMPORT FAILED entry (under the
    first folder), so a test can simulate a broken node without creating one.
    """
    failed_names = {n for n in failed if n}
    dir_list = list(dirs)
    results: list[NodeImport] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for root in dir_list:
        try:
            entries = sorted(os.listdir(root))
        except OSError:
            continue
        for name in entries:
            path = root / name
            if name == "__pycache__" or name.startswith(".") or name.endswith(".disabled"):
                continue
            if path.is_file() and path.suffix != ".py":
                continue
            if disable_all and name not in whitelist:
                skipped.append(f"Skipping {name} due to disable_all_custom_nodes and whitelist_custom_nodes")
                continue
            key = path.stem if path.is_file() else name
            seen.add(key)
            results.append(import_node(path, comfy_dir, key in failed_names or name in failed_names))
    if dir_list and not disable_all:
        for name in sorted(failed_names - seen):
            results.append(import_node(dir_list[0] / name, comfy_dir, True))
    return results, skipped


def import_times(results: Sequence[NodeImport]) -> list[str]:
    """The ``Import times for custom nodes:`` block, sorted by time then path as ComfyUI does."""
    if not results:
        return []
    lines = ["", "Import times for custom nodes:"]
    for r in sorted(results, key=lambda r: (r.seconds, str(r.path))):
        lines.append(f"{r.seconds:6.1f} seconds{'' if r.ok else ' (IMPORT FAILED)'}: {r.path}")
    lines.append("")
    return lines


def memory_bytes() -> tuple[int, int]:
    """Total and available RAM in bytes (from /proc/meminfo, like psutil)."""
    total = available = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == "MemAvailable":
                    available = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if not total:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, available or total // 2


def crash_text(comfy_dir: Path, exc_line: str) -> str:
    """A traceback as an uncaught exception in ComfyUI's main.py prints it."""
    return "\n".join(
        [
            "Traceback (most recent call last):",
            f'  File "{comfy_dir / "main.py"}", line 401, in <module>',
            "    event_loop.run_until_complete(x)",
            f'  File "{Path(sys.base_prefix) / "lib" / _pyver() / "asyncio" / "base_events.py"}", '
            "line 654, in run_until_complete",
            "    return future.result()",
            "           ^^^^^^^^^^^^^^^",
            exc_line,
        ]
    )


def _pyver() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def device_lines(cpu: bool, gpu_name: str, vram_total: int, ram_total: int, vram_state: str) -> list[str]:
    """ComfyUI's device banner (comfy/model_management.py at import)."""
    total_vram = (ram_total if cpu else vram_total) / (1024 * 1024)
    lines = [
        "Checkpoint files will always be loaded safely.",
        f"Total VRAM {total_vram:0.0f} MB, total RAM {ram_total / (1024 * 1024):0.0f} MB",
        f"pytorch version: {PYTORCH_VERSION}",
        f"Set vram state to: {vram_state}",
        f"Device: {'cpu' if cpu else device_name(gpu_name)}",
    ]
    if cpu:
        lines.append(
            "Using sub quadratic optimization for attention, if you have memory or speed issues try "
            "using: --use-split-cross-attention"
        )
    else:
        lines.append("Using pytorch attention")
    return lines


def device_name(gpu_name: str) -> str:
    return f"cuda:0 {gpu_name} : cudaMallocAsync"


def vram_state(args_cpu: bool, lowvram: bool, novram: bool, highvram: bool, gpu_only: bool) -> str:
    if args_cpu:
        return "DISABLED"
    if novram:
        return "NO_VRAM"
    if lowvram:
        return "LOW_VRAM"
    if highvram or gpu_only:
        return "HIGH_VRAM"
    return "NORMAL_VRAM"
