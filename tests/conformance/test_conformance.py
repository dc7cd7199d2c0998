"""What the orchestrator relies on in ComfyUI's behaviour, asserted on the simulator and on real ComfyUI.

Every test runs against both servers (see conftest.py). A difference is a bug in the simulator: fix
it there (orchestrator/simulator/), never by loosening the assertion for one server.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from real.comfy_env import READY_LINE
from support import ComfyServer

from orchestrator.comfy.client import ComfyClient, new_session
from orchestrator.monitor.probes import parse_lines
from orchestrator.simulator.png import png_bytes, png_size

from .conftest import BROKEN_NODE

pytestmark = pytest.mark.integration

WAIT = 60.0  # seconds a prompt may take on a loaded 2-core machine (real ComfyUI on CPU)
T = TypeVar("T")


def talk(server: ComfyServer, scenario: Callable[[ComfyClient], Awaitable[T]]) -> T:
    """Run ``scenario`` against ``server`` through the orchestrator's one ComfyUI client."""

    async def main() -> T:
        async with new_session(total=30) as session:
            return await scenario(ComfyClient(session, server.url))

    return asyncio.run(main())


async def wait_for(check: Callable[[], Awaitable[T]]) -> T:
    """Await ``check()`` every 0.1 s until it is truthy (at most WAIT seconds), and return that."""
    deadline = time.monotonic() + WAIT
    while not (result := await check()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert result, f"timed out after {WAIT} s"
    return result


def image_graph(prefix: str, color: int | None = None, width: int = 64, height: int = 48) -> dict[str, Any]:
    """EmptyImage → ImageInvert → SaveImage: model-free, runs in milliseconds on CPU."""
    color = random.randint(0, 0xFFFFFF) if color is None else color
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


async def run_prompt(c: ComfyClient, prompt: dict[str, Any], client_id: str = "conformance") -> tuple[str, dict[str, Any]]:
    r = await c.post_prompt(prompt, client_id)
    assert r.status == 200, r.text
    answer = r.json()
    assert set(answer) == {"prompt_id", "number", "node_errors"}
    assert answer["node_errors"] == {}
    pid = answer["prompt_id"]
    entry = await wait_for(lambda: c.history(pid))
    return pid, entry


# ---------------------------------------------------------------- startup and probes
def test_startup_log_names_folders_device_version_and_the_gui_line(server: ComfyServer) -> None:
    log = server.log()
    assert f"{READY_LINE}: http://127.0.0.1:{server.port}" in log
    assert f"Setting output directory to: {server.base / 'output'}" in log
    assert f"Setting temp directory to: {server.base / 'temp' / 'temp'}" in log
    assert "Device: cpu" in log
    assert "ComfyUI version: 0.3.64" in log
    # The GUI line comes after initialisation: after the custom-node import block.
    assert log.index("Import times for custom nodes:") < log.index(READY_LINE)


def test_a_custom_node_that_raises_at_import_is_named_in_an_import_failed_line(server: ComfyServer) -> None:
    lines = server.log().splitlines()
    failed = [ln for ln in lines if "(IMPORT FAILED)" in ln]
    path = server.tree / "custom_nodes" / BROKEN_NODE
    assert any(re.fullmatch(rf"\s+\d+\.\d seconds \(IMPORT FAILED\): {re.escape(str(path))}", ln) for ln in failed), failed
    assert "RuntimeError: broken on purpose" in server.log()
    assert BROKEN_NODE in parse_lines(lines).import_failed


def test_system_stats_has_the_fields_the_probe_reads_and_a_cpu_device(server: ComfyServer) -> None:
    async def scenario(c: ComfyClient) -> tuple[Any, int]:
        stats = (await c.system_stats()).json()
        return stats, (await c.request("GET", "/api/system_stats")).status

    stats, api_status = talk(server, scenario)
    assert api_status == 200  # every route is also under /api
    system = stats["system"]
    for key in ("os", "ram_total", "ram_free", "comfyui_version", "python_version", "pytorch_version",
                "embedded_python", "argv"):
        assert key in system, key
    assert system["comfyui_version"] == "0.3.64"
    assert system["os"] == "posix"
    assert system["argv"][0] == "main.py"
    assert str(server.port) in system["argv"]
    (dev,) = stats["devices"]
    assert {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"} <= set(dev)
    assert (dev["name"], dev["type"], dev["index"]) == ("cpu", "cpu", None)
    assert dev["vram_total"] == system["ram_total"]


def test_queue_and_prompt_info_shapes(server: ComfyServer) -> None:
    async def scenario(c: ComfyClient) -> tuple[Any, Any]:
        return (await c.queue()).json(), (await c.request("GET", "/prompt")).json()

    q, info = talk(server, scenario)
    assert set(q) == {"queue_running", "queue_pending"}
    assert isinstance(q["queue_running"], list)
    assert isinstance(q["queue_pending"], list)
    assert isinstance(info["exec_info"]["queue_remaining"], int)


def test_a_foreign_origin_gets_403_with_an_empty_body(server: ComfyServer) -> None:
    r = talk(server, lambda c: c.request("GET", "/system_stats", headers={"Origin": "http://evil.example"}))
    assert r.status == 403
    assert r.body == b""


# ---------------------------------------------------------------- prompts
def test_a_model_free_prompt_writes_its_png_and_records_history(server: ComfyServer) -> None:
    prefix = f"conf_{random.randint(0, 10**9)}"
    graph = image_graph(prefix, width=40, height=24)

    async def scenario(c: ComfyClient) -> None:
        pid, entry = await run_prompt(c, graph, client_id="conformance")
        assert entry["status"]["status_str"] == "success"
        assert entry["status"]["completed"] is True
        events = [m[0] for m in entry["status"]["messages"]]
        assert events[0] == "execution_start"
        assert events[-1] == "execution_success"
        number, prompt_id, prompt, extra, outputs = entry["prompt"]
        assert prompt_id == pid
        assert prompt == graph
        assert outputs == ["3"]
        assert extra["client_id"] == "conformance"
        (image,) = entry["outputs"]["3"]["images"]
        assert image == {"filename": f"{prefix}_00001_.png", "subfolder": "", "type": "output"}
        data = (server.output / image["filename"]).read_bytes()
        assert png_size(data) == (40, 24)
        view = await c.request("GET", "/view", params=image)
        assert view.status == 200
        assert view.body == data
        assert await c.view(image["filename"], image["subfolder"], image["type"]) == data
        missing = await c.request("GET", "/view", params={"filename": "missing.png", "type": "output"})
        assert missing.status == 404
        assert (await c.request("GET", "/history/no-such-id")).json() == {}
        assert await c.history("no-such-id") is None
        assert len((await c.request("GET", "/history", params={"max_items": 1})).json()) == 1

    talk(server, scenario)


def test_an_identical_prompt_is_served_from_cache_without_a_new_file(server: ComfyServer) -> None:
    prefix = f"cache_{random.randint(0, 10**9)}"
    graph = image_graph(prefix)

    async def scenario(c: ComfyClient) -> tuple[dict[str, Any], dict[str, Any]]:
        _, first = await run_prompt(c, graph)
        _, second = await run_prompt(c, graph)
        return first, second

    first, second = talk(server, scenario)
    assert second["outputs"] == first["outputs"]
    cached = dict(second["status"]["messages"])["execution_cached"]["nodes"]
    assert sorted(cached) == ["1", "2", "3"]
    assert len(list(server.output.glob(f"{prefix}_*.png"))) == 1


def test_prompt_errors_have_comfyui_types_and_node_errors(server: ComfyServer) -> None:
    graph = image_graph("errors")

    async def scenario(c: ComfyClient) -> None:
        r = await c.request("POST", "/prompt", json={})
        assert r.status == 400
        assert r.json()["error"]["type"] == "no_prompt"

        r = await c.post_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}}, "conformance")
        assert r.status == 400
        assert r.json()["error"] == {
            "type": "invalid_prompt", "message": "Cannot execute because node NoSuchNode does not exist.",
            "details": "Node ID '#1'", "extra_info": {},
        }

        r = await c.post_prompt({"1": graph["1"]}, "conformance")
        assert r.status == 400
        assert r.json()["error"]["type"] == "prompt_no_outputs"

        bad = json.loads(json.dumps(graph))
        bad["1"]["inputs"]["width"] = 0
        r = await c.post_prompt(bad, "conformance")
        assert r.status == 400
        body = r.json()
        assert body["error"]["type"] == "prompt_outputs_failed_validation"
        (err,) = body["node_errors"]["1"]["errors"]
        assert err["type"] == "value_smaller_than_min"
        assert err["details"] == "width"
        assert err["extra_info"]["input_config"][0] == "INT"
        assert err["extra_info"]["received_value"] == 0
        assert body["node_errors"]["1"]["dependent_outputs"] == ["3"]
        assert body["node_errors"]["1"]["class_type"] == "EmptyImage"

        missing = json.loads(json.dumps(graph))
        del missing["1"]["inputs"]["height"]
        r = await c.post_prompt(missing, "conformance")
        (err,) = r.json()["node_errors"]["1"]["errors"]
        assert r.status == 400
        assert err["type"] == "required_input_missing"
        assert err["details"] == "height"

        r = await c.post_prompt({"1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
                                 "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}, "conformance")
        assert r.status == 400
        assert r.json()["error"]["type"] == "prompt_outputs_failed_validation"
        assert "1" in r.json()["node_errors"]

        r = await c.request("POST", "/prompt", data=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status == 500
        assert b"prompt_id" not in r.body
        assert (await c.system_stats()).status == 200  # and it keeps serving

    talk(server, scenario)


def test_upload_image_then_load_and_scale_it(server: ComfyServer) -> None:
    name = f"up_{random.randint(0, 10**9)}.png"
    data = png_bytes(30, 20, seed=5)
    prefix = f"scaled_{random.randint(0, 10**9)}"
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                     "width": 60, "height": 0, "crop": "disabled"}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 1, "sigma": 1.0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }

    async def scenario(c: ComfyClient) -> dict[str, Any]:
        r = await c.upload_image(name, data)
        assert r.status == 200
        assert r.json() == {"name": name, "subfolder": "", "type": "input"}
        assert (server.input / name).read_bytes() == data
        assert (await c.request("POST", "/upload/image", data={"x": "1"})).status == 400
        info = (await c.request("GET", "/object_info/LoadImage")).json()
        choices = info["LoadImage"]["input"]["required"]["image"][0]
        assert name in choices
        _, entry = await run_prompt(c, graph)
        return entry

    entry = talk(server, scenario)
    (image,) = entry["outputs"]["4"]["images"]
    assert png_size((server.output / image["filename"]).read_bytes()) == (60, 40)  # height 0 keeps the aspect


def test_interrupt_free_and_queue_and_history_posts_answer_200_with_an_empty_body(server: ComfyServer) -> None:
    async def scenario(c: ComfyClient) -> None:
        pid, _ = await run_prompt(c, image_graph("posts"))
        calls = (
            ("/interrupt", lambda: c.request("POST", "/interrupt")),
            ("/interrupt", lambda: c.interrupt("x")),
            ("/free", lambda: c.free(unload_models=True, free_memory=True)),
            ("/queue", lambda: c.request("POST", "/queue", json={"clear": True})),
            ("/history", lambda: c.request("POST", "/history", json={"delete": [pid]})),
        )
        for path, call in calls:
            r = await call()
            assert (r.status, r.body) == (200, b""), (path, r.status, r.body)
        assert (await c.request("GET", f"/history/{pid}")).json() == {}

    talk(server, scenario)


# Input names, their types (a list = a combo) and outputs, read from ComfyUI 0.3.64's nodes.py and
# comfy_extras/nodes_post_processing.py.
NODES: dict[str, tuple[dict[str, Any], list[str], bool]] = {
    "EmptyImage": ({"width": "INT", "height": "INT", "batch_size": "INT", "color": "INT"}, ["IMAGE"], False),
    "SaveImage": ({"images": "IMAGE", "filename_prefix": "STRING"}, [], True),
    "PreviewImage": ({"images": "IMAGE"}, [], True),
    "LoadImage": ({"image": list}, ["IMAGE", "MASK"], False),
    "ImageScale": ({"image": "IMAGE", "upscale_method": list, "width": "INT", "height": "INT", "crop": list},
                   ["IMAGE"], False),
    "ImageScaleBy": ({"image": "IMAGE", "upscale_method": list, "scale_by": "FLOAT"}, ["IMAGE"], False),
    "ImageInvert": ({"image": "IMAGE"}, ["IMAGE"], False),
    "ImageBatch": ({"image1": "IMAGE", "image2": "IMAGE"}, ["IMAGE"], False),
    "ImageBlur": ({"image": "IMAGE", "blur_radius": "INT", "sigma": "FLOAT"}, ["IMAGE"], False),
    "ImageSharpen": ({"image": "IMAGE", "sharpen_radius": "INT", "sigma": "FLOAT", "alpha": "FLOAT"}, ["IMAGE"], False),
}
LIMITS = {  # (class, input): (default, min, max)
    ("EmptyImage", "width"): (512, 1, 16384),
    ("EmptyImage", "color"): (0, 0, 0xFFFFFF),
    ("ImageScale", "width"): (512, 0, 16384),
    ("ImageScaleBy", "scale_by"): (1.0, 0.01, 8.0),
    ("ImageBlur", "blur_radius"): (1, 1, 31),
}


def test_object_info_declares_the_nodes_a_model_free_workflow_uses(server: ComfyServer) -> None:
    async def scenario(c: ComfyClient) -> dict[str, Any]:
        every: dict[str, Any] = (await c.request("GET", "/object_info")).json()
        assert (await c.request("GET", "/object_info/NoSuchNode")).json() == {}
        for name, (inputs, outputs, output_node) in NODES.items():
            info = (await c.request("GET", f"/object_info/{name}")).json()[name]
            assert info == every[name]
            required = info["input"]["required"]
            assert list(required) == list(inputs) == info["input_order"]["required"], name
            for field, kind in inputs.items():
                declared = required[field][0]
                assert isinstance(declared, list) if kind is list else declared == kind, (name, field, declared)
            assert info["output"] == outputs, name
            assert info["output_node"] is output_node, name
        return every

    every = talk(server, scenario)
    for (name, field), (default, lo, hi) in LIMITS.items():
        options = every[name]["input"]["required"][field][1]
        assert (options["default"], options["min"], options["max"]) == (default, lo, hi), (name, field)
    assert every["ImageScale"]["input"]["required"]["upscale_method"][0] == [
        "nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


# ---------------------------------------------------------------- WebSocket (upstream protocol)
async def _events(c: ComfyClient, graph: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, Any]], list[Any]]:
    me, other = f"me{random.randint(0, 10**9)}", f"other{random.randint(0, 10**9)}"
    async with await c.connect(me, greet=False) as ws, await c.connect(other, greet=False) as ws2:
        first = await ws.receive(WAIT)
        r = await c.post_prompt(graph, me)
        pid = r.json()["prompt_id"]
        seen: list[tuple[str, Any]] = []
        while True:
            data = await ws.receive(WAIT)  # binary previews are skipped
            assert data is not None, "the socket closed"
            seen.append((data["type"], data["data"]))
            if data["type"] == "executing" and data["data"].get("node") is None and data["data"].get("prompt_id") == pid:
                break
        leaked: list[Any] = []
        while True:
            try:
                message = await ws2.receive(0.5)
            except TimeoutError:
                break
            if message is None:
                break
            if message["type"] != "status":
                leaked.append(message)
    return {"first": first, "me": me, "pid": pid}, seen, leaked


def test_websocket_events_reach_only_the_prompts_client_in_order(server: ComfyServer) -> None:
    info, seen, leaked = talk(server, lambda c: _events(c, image_graph(f"ws_{random.randint(0, 10**9)}")))
    assert info["first"] == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                         "sid": info["me"]}}
    flow = [(t, d.get("node") if t in ("executing", "executed") else None)
            for t, d in seen if t not in ("status", "progress_state", "progress")]
    assert flow == [
        ("execution_start", None), ("execution_cached", None),
        ("executing", "1"), ("executing", "2"), ("executing", "3"), ("executed", "3"),
        ("execution_success", None), ("executing", None),
    ]
    for t, d in seen:
        if t != "status":
            assert d["prompt_id"] == info["pid"], t
    executed = next(d for t, d in seen if t == "executed")
    assert executed["output"]["images"][0]["type"] == "output"
    assert leaked == []


def test_a_partly_cached_prompt_names_its_cached_nodes_and_executes_only_the_rest(server: ComfyServer) -> None:
    """What per-node telemetry reads: execution_cached lists the nodes served from cache, and only
    the others get an ``executing`` (a node's time runs to the next one's)."""
    prefix, color = f"part_{random.randint(0, 10**9)}", random.randint(0, 0xFFFFFF)

    async def scenario(c: ComfyClient) -> tuple[dict[str, Any], list[tuple[str, Any]], list[Any]]:
        await run_prompt(c, image_graph(prefix, color))
        return await _events(c, image_graph(prefix + "_again", color))  # only SaveImage's input differs

    _, seen, _ = talk(server, scenario)
    flow = [(t, d.get("node") if t in ("executing", "executed") else None)
            for t, d in seen if t not in ("status", "progress_state", "progress")]
    assert flow == [
        ("execution_start", None), ("execution_cached", None), ("executing", "3"), ("executed", "3"),
        ("execution_success", None), ("executing", None),
    ]
    cached = next(d for t, d in seen if t == "execution_cached")["nodes"]
    assert sorted(cached) == ["1", "2"]


# ---------------------------------------------------------------- stopping
def test_sigterm_stops_an_instance_within_seconds_and_frees_its_port(fresh_server: ComfyServer) -> None:
    srv = fresh_server
    srv.wait_ready()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(timeout=30)
    assert rc == -signal.SIGTERM, rc  # ComfyUI does not catch SIGTERM: the default action ends it
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", srv.port))
