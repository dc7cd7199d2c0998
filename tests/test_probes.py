"""Probes: log scanning (rotation, truncation, partial lines), device checks, HTTP probes of a real aiohttp server."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from orchestrator.core.gpus import Gpu
from orchestrator.machine.ports import free_port_block
from orchestrator.monitor.probes import LogScanner, check_device, free_memory, node_name, parse_lines, probe_http

H100 = Gpu(0, "GPU-1234", "00000000:01:00.0", "NVIDIA H100 80GB HBM3", 85520809984, "550.54")
MOCK = Gpu(1, "GPU-mock", "00000000:02:00.0", "Mock GPU (CPU)", 24 * 2**30, "mock", mock=True)

STARTUP_LOG = """\
Setting output directory to: /workspace/comfyui_gpu0/output
Device: cuda:0 NVIDIA H100 80GB HBM3 : cudaMallocAsync
Traceback (most recent call last):
  File "/workspace/ComfyUI/nodes.py", line 2130, in load_custom_node
    module_spec.loader.exec_module(module)
ModuleNotFoundError: No module named 'cv2'

Cannot import /workspace/ComfyUI/custom_nodes/ComfyUI-Broken module for custom nodes: No module named 'cv2'

Import times for custom nodes:
   0.0 seconds: /workspace/ComfyUI/custom_nodes/websocket_image_save.py
   0.0 seconds (IMPORT FAILED): /workspace/ComfyUI/custom_nodes/ComfyUI-Broken
   0.3 seconds (IMPORT FAILED): /workspace/ComfyUI/custom_nodes/was-node-suite-comfyui/
   1.2 seconds: /workspace/ComfyUI/custom_nodes/ComfyUI-Manager

Starting server

To see the GUI go to: http://127.0.0.1:8188
"""

OOM_LOG = """\
got prompt
!!! Exception during processing !!!
Traceback (most recent call last):
  File "/workspace/ComfyUI/execution.py", line 315, in get_output_data
    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB
Prompt executed in 0.51 seconds
"""


# ---------------------------------------------------------------- log lines
def test_parse_lines_finds_failed_node_names_oom_and_the_exception_line() -> None:
    found = parse_lines(STARTUP_LOG.splitlines())
    assert found.import_failed == ("ComfyUI-Broken", "was-node-suite-comfyui")
    assert found.import_block
    assert found.traceback == "ModuleNotFoundError: No module named 'cv2'"
    assert found.oom == 0
    oom = parse_lines(OOM_LOG.splitlines())
    assert oom.oom == 1
    assert oom.traceback.startswith("torch.OutOfMemoryError: CUDA out of memory")


def test_a_later_import_block_replaces_the_earlier_list() -> None:
    second = STARTUP_LOG.replace("(IMPORT FAILED): /workspace/ComfyUI/custom_nodes/ComfyUI-Broken", "")
    text = STARTUP_LOG + second
    assert parse_lines(text.splitlines()).import_failed == ("was-node-suite-comfyui",)


def test_node_name_is_the_last_path_component() -> None:
    assert node_name("/x/custom_nodes/ComfyUI-Foo/") == "ComfyUI-Foo"
    assert node_name(r"C:\x\custom_nodes\bar.py") == "bar.py"


def _append(path: Path, text: str) -> None:
    with path.open("a") as fh:
        fh.write(text)


def test_the_scanner_reads_only_new_complete_lines(tmp_path: Path) -> None:
    log = tmp_path / "output.log"
    log.write_text("")
    scanner = LogScanner(log)
    assert scanner.scan().lines == 0
    _append(log, OOM_LOG)
    assert scanner.scan().oom == 1
    assert scanner.scan().oom == 0  # nothing new
    _append(log, "torch.OutOfMemoryError: CUDA out of mem")  # a line still being written
    assert scanner.scan().oom == 0
    _append(log, "ory.\nmore\n")
    found = scanner.scan()
    assert found.oom == 1
    assert found.lines == 2


def test_the_first_scan_keeps_import_failures_but_not_old_out_of_memory_errors(tmp_path: Path) -> None:
    log = tmp_path / "output.log"
    log.write_text(OOM_LOG + STARTUP_LOG + OOM_LOG)
    found = LogScanner(log).scan()
    assert found.oom == 0
    assert found.traceback == ""
    assert found.import_failed == ("ComfyUI-Broken", "was-node-suite-comfyui")


def test_the_scanner_starts_over_after_truncation_and_rotation(tmp_path: Path) -> None:
    log = tmp_path / "output.log"
    log.write_text("x\n" * 1000)
    scanner = LogScanner(log)
    scanner.scan()
    log.write_text(OOM_LOG)  # truncated (and shorter than before)
    assert scanner.scan().oom == 1
    os.rename(log, tmp_path / "output.log.1")  # supervisord rotates by renaming
    log.write_text(OOM_LOG + OOM_LOG + "\n" * 600)  # a new, longer file: a new inode
    assert scanner.scan().oom == 2


def test_a_burst_larger_than_max_read_is_skipped_to_its_end(tmp_path: Path) -> None:
    log = tmp_path / "output.log"
    log.write_text("")
    scanner = LogScanner(log, max_read=4096)
    scanner.scan()
    _append(log, OOM_LOG * 200 + "tail line\n")
    found = scanner.scan()
    assert 0 < found.lines < 200
    assert found.oom < 200


def test_a_missing_log_is_an_empty_finding(tmp_path: Path) -> None:
    assert LogScanner(tmp_path / "nope.log").scan().lines == 0


# ---------------------------------------------------------------- device check
def _stats(name: str, vram: int, dtype: str = "cuda") -> dict[str, Any]:
    return {"system": {}, "devices": [{"name": name, "type": dtype, "index": 0, "vram_total": vram}]}


def test_the_device_must_be_the_cpu_in_mock_mode() -> None:
    assert check_device(_stats("cpu", 8 * 2**30, "cpu"), MOCK, mock=True) == ("cpu", "")
    device, error = check_device(_stats("cuda:0 NVIDIA A10 : cudaMallocAsync", 2**34), MOCK, mock=True)
    assert "expected the CPU" in error


def test_the_device_must_match_the_planned_gpu_name_and_vram() -> None:
    ok = _stats("cuda:0 NVIDIA H100 80GB HBM3 : cudaMallocAsync", 85031714816)
    assert check_device(ok, H100, mock=False)[1] == ""
    _, wrong_name = check_device(_stats("cuda:0 NVIDIA A10 : cudaMallocAsync", 85031714816), H100, mock=False)
    assert "expected NVIDIA H100 80GB HBM3" in wrong_name
    assert "GPU-1234" in wrong_name
    _, wrong_vram = check_device(_stats("cuda:0 NVIDIA H100 80GB HBM3 : x", 40 * 2**30), H100, mock=False)
    assert "MiB VRAM" in wrong_vram
    assert check_device({"devices": []}, H100, mock=False)[1] == "/system_stats lists no device"


# ---------------------------------------------------------------- real HTTP
class FakeComfy:
    """A tiny ComfyUI stand-in whose behaviour a test switches (answer, hang, fail, wrong device)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.device = "cpu"
        self.freed: list[Any] = []

    async def system_stats(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "hang":
            await asyncio.sleep(30)
        if self.mode == "error":
            return web.Response(status=500, text="boom")
        return web.json_response(_stats(self.device, 8 * 2**30, "cpu" if self.device == "cpu" else "cuda"))

    async def queue(self, request: web.Request) -> web.StreamResponse:
        body = {"queue_running": [[1, "a", {}, {}, []]], "queue_pending": [[2, "b"], [3, "c"]]}
        return web.json_response(body)

    async def free(self, request: web.Request) -> web.StreamResponse:
        self.freed.append(await request.json())
        return web.Response(status=200)


@asynccontextmanager
async def serving(fake: FakeComfy) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/system_stats", fake.system_stats)
    app.router.add_get("/queue", fake.queue)
    app.router.add_post("/free", fake.free)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port
    finally:
        await runner.cleanup()


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())  # type: ignore[arg-type]


def test_a_healthy_instance_probes_ok_with_its_queue_depth() -> None:
    async def main() -> None:
        fake = FakeComfy()
        async with serving(fake) as port, aiohttp.ClientSession() as client:
            result = await probe_http(client, port, MOCK, mock=True, timeout=2)
        assert result.ok
        assert result.tcp
        assert result.status_code == 200
        assert (result.queue_pending, result.queue_running) == (2, 1)
        assert result.device == "cpu"
        assert result.duration > 0

    run(main)


def test_the_probe_samples_the_comfyui_version_the_process_reports() -> None:
    class Versioned(FakeComfy):
        async def system_stats(self, request: web.Request) -> web.StreamResponse:
            stats = _stats("cpu", 8 * 2**30, "cpu")
            stats["system"]["comfyui_version"] = "0.3.12"
            return web.json_response(stats)

    async def main() -> None:
        async with serving(Versioned()) as port, aiohttp.ClientSession() as client:
            assert (await probe_http(client, port, MOCK, mock=True, timeout=2)).comfyui_version == "0.3.12"
        async with serving(FakeComfy()) as port, aiohttp.ClientSession() as client:
            assert (await probe_http(client, port, MOCK, mock=True, timeout=2)).comfyui_version is None

    run(main)


def test_a_hung_instance_fails_the_probe_within_its_timeout() -> None:
    async def main() -> None:
        fake = FakeComfy()
        fake.mode = "hang"
        async with serving(fake) as port, aiohttp.ClientSession() as client:
            # The fake never answers: without the timeout this probe would hang (pytest-timeout ends it).
            result = await probe_http(client, port, MOCK, mock=True, timeout=0.3)
        assert not result.ok
        assert result.tcp  # the port accepts connections; nothing answers
        assert result.error == "no answer within 0.3s"

    run(main)


def test_a_closed_port_fails_the_probe_at_once() -> None:
    async def main() -> None:
        port = free_port_block(1)
        async with aiohttp.ClientSession() as client:
            result = await probe_http(client, port, MOCK, mock=True, timeout=2)
        assert not result.ok
        assert not result.tcp
        assert f"port {port} not open" in result.error

    run(main)


def test_an_error_status_or_a_wrong_device_fails_the_probe() -> None:
    async def main() -> None:
        fake = FakeComfy()
        async with serving(fake) as port, aiohttp.ClientSession() as client:
            fake.mode = "error"
            failed = await probe_http(client, port, MOCK, mock=True, timeout=2)
            fake.mode, fake.device = "ok", "cuda:0 NVIDIA A10 : cudaMallocAsync"
            wrong = await probe_http(client, port, MOCK, mock=True, timeout=2)
        assert failed.error == "GET /system_stats answered 500"
        assert failed.status_code == 500
        assert not wrong.ok
        assert "expected the CPU" in wrong.device_error

    run(main)


def test_free_memory_posts_unload_and_free() -> None:
    async def main() -> None:
        fake = FakeComfy()
        async with serving(fake) as port, aiohttp.ClientSession() as client:
            assert await free_memory(client, port, 2) == ""
        assert fake.freed == [{"unload_models": True, "free_memory": True}]
        async with aiohttp.ClientSession() as client:
            assert await free_memory(client, free_port_block(1), 1) == "connection refused"

    run(main)


def test_probe_results_serialise_for_the_record() -> None:
    # The log findings travel inside the probe result; they are plain data.
    found = parse_lines(STARTUP_LOG.splitlines())
    assert json.dumps(list(found.import_failed))
