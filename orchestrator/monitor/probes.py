"""Probing one ComfyUI instance: TCP connect, ``GET /system_stats`` and ``/queue``, new log lines.

The HTTP probe asks through :class:`~orchestrator.comfy.client.ComfyClient` over an aiohttp
session the caller owns, and never takes longer than its timeout. :class:`LogScanner` reads only
the bytes written since the last scan, follows rotation and truncation, and turns them into
:class:`~orchestrator.core.health.LogFindings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from orchestrator.comfy.client import ComfyCallError, ComfyClient, Reply, base_url
from orchestrator.comfy.protocol import queue_lengths
from orchestrator.core.gpus import Gpu
from orchestrator.core.health import LogFindings, ProbeResult

_OOM = re.compile(r"OutOfMemoryError|CUDA out of memory")
_IMPORT_FAILED = re.compile(r"\(IMPORT FAILED\):\s*(\S.*?)\s*$")
_IMPORT_BLOCK = "Import times for custom nodes:"
_TRACEBACK = "Traceback (most recent call last):"
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")

# A VRAM total within this fraction of NVML's total is the same GPU (torch reports slightly less).
VRAM_TOLERANCE = 0.06


# ---------------------------------------------------------------- log lines (pure)
def node_name(path: str) -> str:
    """``/x/custom_nodes/ComfyUI-Foo`` → ``ComfyUI-Foo`` (the custom node's folder or file)."""
    return path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def parse_lines(lines: Iterable[str]) -> LogFindings:
    """Out-of-memory errors, failed custom-node imports and the last traceback in ``lines``."""
    oom = 0
    failed: list[str] = []
    block = False
    in_traceback = False
    exception = ""
    count = 0
    for line in lines:
        count += 1
        if _OOM.search(line):
            oom += 1
        if _IMPORT_BLOCK in line:
            # A new start prints the complete list: forget what earlier blocks said.
            block = True
            failed = []
            continue
        match = _IMPORT_FAILED.search(line)
        if match:
            failed.append(node_name(match.group(1)))
            continue
        if line.startswith(_TRACEBACK):
            in_traceback = True
            continue
        if in_traceback and line and not line[0].isspace():
            if line.startswith(_CHAINED):
                continue
            exception = line.strip()[:300]
            in_traceback = False
    return LogFindings(
        oom=oom, import_failed=tuple(dict.fromkeys(failed)), import_block=block, traceback=exception,
        lines=count,
    )


class LogScanner:
    """Reads the lines appended to a log file since the previous :meth:`scan`.

    The first scan catches up on at most ``catch_up`` bytes of history: it keeps the custom-node
    import results but drops out-of-memory lines and tracebacks, which are old news. A scan
    never reads more than ``max_read`` bytes (the rest of a burst is skipped).
    """

    def __init__(self, path: Path, *, max_read: int = 1 << 20, catch_up: int = 256 << 10) -> None:
        self.path = path
        self.max_read = max_read
        self.catch_up = catch_up
        self._pos: int | None = None
        self._ident: tuple[int, int] | None = None
        self._rest = b""

    def scan(self) -> LogFindings:
        try:
            with self.path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                ident = (st.st_dev, st.st_ino)
                initial = self._pos is None
                if initial:
                    start = max(0, st.st_size - self.catch_up)
                elif ident != self._ident or st.st_size < (self._pos or 0):
                    start = 0  # rotated or truncated: the new file from its beginning
                    self._rest = b""
                else:
                    start = self._pos or 0
                skip_partial = initial and start > 0
                if st.st_size - start > self.max_read:
                    start = st.st_size - self.max_read
                    self._rest = b""
                    skip_partial = True
                fh.seek(start)
                data = fh.read(st.st_size - start)
        except OSError:
            return LogFindings()
        self._ident = ident
        self._pos = start + len(data)
        data = self._rest + data
        if skip_partial:
            _, _, data = data.partition(b"\n")
        body, sep, rest = data.rpartition(b"\n")
        if not sep:
            body, rest = b"", data
        self._rest = rest[-65536:]
        if not body:
            return LogFindings()
        found = parse_lines(body.decode("utf-8", "replace").split("\n"))
        if initial:
            return LogFindings(
                import_failed=found.import_failed, import_block=found.import_block, lines=found.lines
            )
        return found


# ---------------------------------------------------------------- device check (pure)
def check_device(stats: Any, gpu: Gpu, mock: bool) -> tuple[str | None, str]:
    """The device /system_stats reports, and why it is not the planned one ("" when it is).

    In mock mode the device must be the CPU; otherwise its name must contain the planned GPU's
    name and its VRAM total must be within :data:`VRAM_TOLERANCE` of NVML's.
    """
    try:
        device = stats["devices"][0]
        name = str(device.get("name", ""))
        dtype = str(device.get("type", ""))
        vram = device.get("vram_total")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None, "/system_stats lists no device"
    if mock:
        if name != "cpu" and dtype != "cpu":
            return name, f"expected the CPU (MOCK_GPU=1), /system_stats reports {name!r}"
        return name, ""
    if gpu.name not in name:
        return name, f"expected {gpu.name} (GPU {gpu.index}, {gpu.uuid}), /system_stats reports {name!r}"
    total = gpu.memory_total
    if isinstance(vram, (int, float)) and total > 0 and abs(vram - total) > VRAM_TOLERANCE * total:
        return name, (
            f"expected {total // 2**20} MiB VRAM on GPU {gpu.index}, "
            f"/system_stats reports {int(vram) // 2**20} MiB"
        )
    return name, ""


# ---------------------------------------------------------------- the probe
async def tcp_connect(host: str, port: int, timeout: float) -> str:
    """"" when a TCP connection to host:port opens within ``timeout``, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return f"TCP connect to port {port} timed out"
    except OSError as exc:
        return f"port {port} not open ({exc.strerror or exc})"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ""


async def probe_http(
    session: aiohttp.ClientSession,
    port: int,
    gpu: Gpu,
    *,
    mock: bool,
    timeout: float,
    host: str = "127.0.0.1",
    clock: Callable[[], float] = time.monotonic,
    tcp: bool = True,
) -> ProbeResult:
    """TCP connect, then ``GET /system_stats`` and ``GET /queue`` together, all within ``timeout``."""
    start = clock()
    if tcp:
        error = await tcp_connect(host, port, timeout)
        if error:
            return ProbeResult(ok=False, error=error, duration=clock() - start)
    left = max(0.05, timeout - (clock() - start))
    comfy = ComfyClient(session, base_url(host, port))
    try:
        async with asyncio.timeout(left):
            stats_resp, queue_resp = await asyncio.gather(
                comfy.system_stats(left), comfy.queue(left), return_exceptions=True
            )
    except TimeoutError:
        error = f"no answer within {timeout:g}s"
        return ProbeResult(ok=False, tcp=True, error=error, duration=clock() - start)
    duration = clock() - start
    if isinstance(stats_resp, BaseException):
        if not isinstance(stats_resp, ComfyCallError):
            raise stats_resp
        if stats_resp.kind == "timeout":
            error = f"no answer within {timeout:g}s"
        else:
            error = f"GET /system_stats failed: {stats_resp.reason}"
        return ProbeResult(ok=False, tcp=True, error=error, duration=duration)
    pending = running = None
    if isinstance(queue_resp, Reply) and queue_resp.ok:
        with contextlib.suppress(ValueError):
            pending, running = queue_lengths(queue_resp.json())
    if not stats_resp.ok:
        return ProbeResult(
            ok=False, tcp=True, status_code=stats_resp.status, duration=duration,
            error=f"GET /system_stats answered {stats_resp.status}",
            queue_pending=pending, queue_running=running,
        )
    try:
        stats = stats_resp.json()
    except ValueError:
        return ProbeResult(
            ok=False, tcp=True, status_code=200, duration=duration, error="GET /system_stats: not JSON"
        )
    device, device_error = check_device(stats, gpu, mock)
    system = stats.get("system") if isinstance(stats, dict) else None
    version = system.get("comfyui_version") if isinstance(system, dict) else None
    return ProbeResult(
        ok=not device_error, tcp=True, status_code=200, duration=duration, device=device,
        device_error=device_error, queue_pending=pending, queue_running=running,
        comfyui_version=str(version) if isinstance(version, str | int | float) and str(version) else None,
    )


async def free_memory(
    session: aiohttp.ClientSession, port: int, timeout: float, host: str = "127.0.0.1"
) -> str:
    """``POST /free`` (unload models, free memory); "" on success, else why it failed."""
    try:
        reply = await ComfyClient(session, base_url(host, port)).free(timeout)
    except ComfyCallError as exc:
        return exc.reason
    return "" if reply.ok else f"answered {reply.status}"
