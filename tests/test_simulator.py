"""The ComfyUI simulator, run as the orchestrator runs ComfyUI: ``python main.py <flags>`` in a tree."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from support import InstanceFolders, http_client, txt2img
from support import wait_for as poll

from orchestrator.core.plan import BASELINE_FLAGS, OWNED_FLAGS, supported_flags
from orchestrator.machine.ports import free_port_block
from orchestrator.simulator import faults as faultlib
from orchestrator.simulator import folders as fp
from orchestrator.simulator.graph import execution_order, signatures, validate
from orchestrator.simulator.nodes import catalogue
from orchestrator.simulator.png import png_bytes, png_size
from orchestrator.simulator.tree import write_code_tree

pytestmark = pytest.mark.integration

DEADLINE = 10.0  # seconds any single wait may take on a loaded 2-core machine


wait_for = functools.partial(poll, timeout=DEADLINE)


IGNORE_SIGINT_THEN_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"
)


def ignored_signals(pid: int) -> set[int]:
    """The signals the kernel discards for ``pid`` (SigIgn in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    return set()


@dataclass
class Sim(InstanceFolders):
    proc: subprocess.Popen[bytes]
    port: int
    base: Path  # the instance folder: output/ temp/ input/ user/
    log_path: Path
    argv: list[str] = field(default_factory=list)

    def http(self, timeout: float = 5.0) -> requests.Session:
        return http_client(self.url, timeout)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"simulator exited {self.proc.returncode}:\n{self.log()}")
        try:
            return requests.get(f"{self.url}/system_stats", timeout=1.0).status_code == 200
        except requests.RequestException:
            return False

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"simulator still running after {timeout} s:\n{self.log()}") from None

    def set_faults(self, **values: Any) -> None:
        tmp = self.user / "faults.tmp"
        tmp.write_text(json.dumps(values))
        os.replace(tmp, self.user / faultlib.FAULTS_FILE)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ComfyUI")
    write_code_tree(path)
    return path


class Launcher:
    """Starts simulators like the orchestrator's plan does; stops every one of them at teardown."""

    def __init__(self, root: Path, tree: Path) -> None:
        self.root = root
        self.tree = tree
        self.sims: list[Sim] = []

    def start(
        self,
        name: str = "gpu0",
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = ("--cpu",),
        wait: bool = True,
        port: int | None = None,
        make_user: bool = True,
        faults: dict[str, Any] | None = None,
        sigint_ignored: bool = False,
    ) -> Sim:
        base = self.root / name
        (base / "logs").mkdir(parents=True, exist_ok=True)
        if make_user:
            (base / "user").mkdir(exist_ok=True)
        if faults is not None:
            (base / "user" / faultlib.FAULTS_FILE).write_text(json.dumps(faults))
        port = port or free_port_block(1)
        argv = [
            sys.executable,
            "main.py",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--output-directory",
            str(base / "output"),
            "--temp-directory",
            str(base / "temp"),
            "--input-directory",
            str(base / "input"),
            "--user-directory",
            str(base / "user"),
            "--database-url",
            f"sqlite:///{base / 'user' / 'comfyui.db'}",
            *args,
        ]
        if sigint_ignored:  # as a background job of a non-interactive shell: SIG_IGN survives exec
            argv = [sys.executable, "-c", IGNORE_SIGINT_THEN_EXEC, *argv]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SIM_")}
        full_env.update({"PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}, **(env or {}))
        log_path = base / "logs" / "output.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(argv, cwd=self.tree, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        sim = Sim(proc, port, base, log_path, argv)
        self.sims.append(sim)
        if wait:
            wait_for(sim.ready)
        return sim

    def stop_all(self) -> None:
        for sim in self.sims:
            if sim.proc.poll() is None:
                sim.proc.kill()
                sim.proc.wait(timeout=DEADLINE)


@pytest.fixture
def launcher(tmp_path: Path, tree: Path) -> Iterator[Launcher]:
    la = Launcher(tmp_path, tree)
    yield la
    la.stop_all()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tree: Path) -> Iterator[Sim]:
    """One CPU instance for the tests that only read or add their own prompts."""
    la = Launcher(tmp_path_factory.mktemp("shared"), tree)
    yield la.start()
    la.stop_all()


async def _run_over_ws(sim: Sim, body: dict[str, Any], client_id: str) -> list[dict[str, Any]]:
    """POST ``body`` with ``client_id`` while listening on /ws; messages until ``executing`` null."""
    messages: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{sim.url}/ws?clientId={client_id}") as ws,
    ):
        async with session.post(f"{sim.url}/prompt", json={**body, "client_id": client_id}) as resp:
            assert resp.status == 200, await resp.text()
            prompt_id = (await resp.json())["prompt_id"]
        while True:
            msg = await asyncio.wait_for(ws.receive_json(), timeout=DEADLINE)
            messages.append(msg)
            data = msg.get("data", {})
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return messages


def run_over_ws(sim: Sim, body: dict[str, Any], client_id: str) -> list[dict[str, Any]]:
    return asyncio.run(_run_over_ws(sim, body, client_id))


def types(
    messages: list[dict[str, Any]], skip: tuple[str, ...] = ("status", "progress_state", "client_id")
) -> list[str]:
    return [m["type"] for m in messages if m["type"] not in skip]


# ---- startup and flags -----------------------------------------------------------------------


def test_the_tree_declares_flags_that_the_orchestrator_can_read_as_text(tree: Path) -> None:
    flags = supported_flags(tree)
    assert flags is not None
    # every flag the plan owns or falls back to (v0.3.33's), and the others the orchestrator passes
    assert OWNED_FLAGS | BASELINE_FLAGS | {
        "--disable-auto-launch",
        "--disable-all-custom-nodes",
        "--disable-api-nodes",
        "--max-upload-size",
        "--preview-method",
        "--lowvram",
        "--normalvram",
        "--highvram",
        "--gpu-only",
        "--quick-test-for-ci",
        "--verbose",
    } <= flags
    assert "--no-such-flag" not in flags
    assert (tree / "main.py").read_text().count('if __name__ == "__main__":') == 1


def test_an_unknown_flag_exits_2_with_argparse_usage(tree: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--no-such-flag"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert proc.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in proc.stderr


def test_a_missing_user_directory_fails_before_binding(launcher: Launcher) -> None:
    sim = launcher.start(make_user=False, wait=False)
    assert sim.wait_exit() == 2
    assert f"The path '{sim.user}' does not exist." in sim.log()
    assert "To see the GUI" not in sim.log()


def test_quick_test_for_ci_initialises_and_exits_0_via_python_m(tmp_path: Path) -> None:
    (tmp_path / "user").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.simulator",
            "--cpu",
            "--quick-test-for-ci",
            "--user-directory",
            str(tmp_path / "user"),
            "--output-directory",
            str(tmp_path / "out"),
            "--temp-directory",
            str(tmp_path),
            "--database-url",
            "sqlite:///:memory:",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ComfyUI version: 0.3.64" in proc.stdout
    assert "Starting server" not in proc.stdout
    assert not (tmp_path / "temp").exists()


def test_startup_log_reads_like_comfyui(launcher: Launcher, tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "comfyui:\n    base_path: /models/base\n    is_default: true\n    checkpoints: models/checkpoints/\n"
        "    loras: |\n        models/loras/\n        models/loras_extra/\n"
    )
    sim = launcher.start(args=("--cpu", "--extra-model-paths-config", str(extra)))
    log = sim.log()
    lines = log.splitlines()
    assert f"Setting output directory to: {sim.output}" in lines
    assert f"Setting temp directory to: {sim.base / 'temp' / 'temp'}" in lines
    assert "Adding extra search path checkpoints /models/base/models/checkpoints" in lines
    assert "Adding extra search path loras /models/base/models/loras" in lines
    assert "Adding extra search path loras /models/base/models/loras_extra" in lines
    assert "Device: cpu" in lines
    assert "ComfyUI version: 0.3.64" in lines
    order = [
        lines.index(x)
        for x in (
            "Device: cpu",
            "Import times for custom nodes:",
            "Starting server",
            f"To see the GUI go to: http://127.0.0.1:{sim.port}",
        )
    ]
    assert order == sorted(order)


def test_custom_node_import_failures_are_logged_like_comfyui(launcher: Launcher, tmp_path: Path) -> None:
    launcher.tree = tmp_path / "ComfyUI"
    write_code_tree(launcher.tree)
    nodes = launcher.tree / "custom_nodes"
    (nodes / "good-node").mkdir()
    (nodes / "good-node" / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    (nodes / "no-init-node").mkdir()
    (nodes / "broken-node").mkdir()
    (nodes / "broken-node" / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    sim = launcher.start(env={"SIM_IMPORT_FAILED": "broken-node,ghost-node"})
    lines = sim.log().splitlines()
    assert f"   0.0 seconds: {nodes / 'good-node'}" in lines
    assert f"   0.0 seconds: {nodes / 'websocket_image_save.py'}" in lines
    for bad in ("broken-node", "no-init-node", "ghost-node"):
        assert f"   0.0 seconds (IMPORT FAILED): {nodes / bad}" in lines
        assert any(line.startswith(f"Cannot import {nodes / bad} module for custom nodes:") for line in lines)
    assert "Traceback (most recent call last):" in lines
    assert lines.index("Import times for custom nodes:") > lines.index(
        f"Cannot import {nodes / 'ghost-node'} "
        "module for custom nodes: No module named "
        "'ghost_node_dependency'"
    )


def test_system_stats_reports_a_cpu_device_in_cpu_mode(shared: Sim) -> None:
    stats = requests.get(f"{shared.url}/system_stats", timeout=5).json()
    system, (device,) = stats["system"], stats["devices"]
    assert system["comfyui_version"] == "0.3.64"
    assert system["embedded_python"] is False
    assert system["os"] == os.name
    assert system["argv"][0] == "main.py"
    assert "--cpu" in system["argv"]
    assert {"ram_total", "ram_free", "python_version", "pytorch_version"} <= set(system)
    assert device["name"] == "cpu"
    assert device["type"] == "cpu"
    assert device["index"] is None
    assert device["vram_total"] == system["ram_total"] == device["torch_vram_total"]
    assert requests.get(f"{shared.url}/api/system_stats", timeout=5).json()["devices"][0]["name"] == "cpu"


def test_gpu_mode_reports_the_simulated_cuda_device(launcher: Launcher) -> None:
    sim = launcher.start(
        args=(),
        env={
            "SIM_GPU_NAME": "NVIDIA H100 80GB HBM3",
            "SIM_GPU_VRAM": str(80 * 1024**3),
            "CUDA_VISIBLE_DEVICES": "GPU-1234",
        },
    )
    device = requests.get(f"{sim.url}/system_stats", timeout=5).json()["devices"][0]
    assert device["name"] == "cuda:0 NVIDIA H100 80GB HBM3 : cudaMallocAsync"
    assert device["type"] == "cuda"
    assert device["index"] == 0
    assert device["vram_total"] == 80 * 1024**3
    assert 0 < device["vram_free"] < device["vram_total"]
    assert "Device: cuda:0 NVIDIA H100 80GB HBM3 : cudaMallocAsync" in sim.log().splitlines()


def test_gpu_mode_without_a_visible_gpu_dies_like_torch(launcher: Launcher) -> None:
    sim = launcher.start(args=(), wait=False)  # CUDA_VISIBLE_DEVICES="" and no --cpu
    assert sim.wait_exit() == 1
    assert "RuntimeError: No CUDA GPUs are available" in sim.log()


def test_a_busy_port_fails_after_initialisation_with_errno_98(launcher: Launcher) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        sim = launcher.start(port=busy.getsockname()[1], wait=False)
        assert sim.wait_exit() == 1
    log = sim.log()
    assert "OSError: [Errno 98] error while attempting to bind on address" in log
    assert log.index("Import times for custom nodes:") < log.index("Starting server") < log.index("OSError")


def test_sigterm_ends_it_like_comfyui_without_cleanup(launcher: Launcher, tmp_path: Path) -> None:
    stale = tmp_path / "gpu0" / "temp" / "temp" / "stale.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    sim = launcher.start()
    assert not stale.exists()  # deleted at start
    assert (sim.base / "temp" / "temp").is_dir()
    sim.proc.send_signal(signal.SIGTERM)
    # ComfyUI has no SIGTERM handler (see tests/conformance): killed by the signal, no clean exit.
    assert sim.wait_exit() == -signal.SIGTERM
    assert (sim.base / "temp" / "temp").is_dir()
    assert "Stopped server" not in sim.log()


def test_sigint_exits_cleanly_and_removes_the_temp_folder(launcher: Launcher) -> None:
    sim = launcher.start()
    sim.proc.send_signal(signal.SIGINT)
    assert sim.wait_exit() == 0
    assert not (sim.base / "temp" / "temp").exists()
    assert "Stopped server" in sim.log()


def test_ignore_sigterm_fault_leaves_only_sigint_and_sigkill(launcher: Launcher) -> None:
    sim = launcher.start(env={"SIM_IGNORE_SIGTERM": "1"})
    # An ignored signal is discarded when it is sent, so once SigIgn holds SIGTERM nothing is in flight.
    assert signal.SIGTERM in ignored_signals(sim.proc.pid)
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.ready()
    sim.proc.send_signal(signal.SIGINT)
    assert sim.wait_exit() == 0


@pytest.mark.parametrize("ignore_sigterm", [False, True], ids=["plain", "ignore_sigterm"])
def test_sigint_stops_the_simulator_even_when_its_parent_ignored_sigint(
    launcher: Launcher, ignore_sigterm: bool
) -> None:
    sim = launcher.start(env={"SIM_IGNORE_SIGTERM": "1"} if ignore_sigterm else {}, sigint_ignored=True)
    assert signal.SIGINT not in ignored_signals(sim.proc.pid)
    sim.proc.send_signal(signal.SIGINT)
    assert sim.wait_exit() == 0
    assert "Stopped server" in sim.log()


def test_start_delay_postpones_binding(launcher: Launcher) -> None:
    started = time.monotonic()
    sim = launcher.start(env={"SIM_START_DELAY": "1.0"}, wait=False)
    wait_for(lambda: "Import times for custom nodes:" in sim.log())
    assert not sim.ready()
    wait_for(sim.ready)
    assert time.monotonic() - started >= 1.0


# ---- prompts ---------------------------------------------------------------------------------


def test_a_prompt_streams_events_in_order_writes_a_png_and_records_history(shared: Sim) -> None:
    messages = run_over_ws(shared, {"prompt": txt2img("order/run", seed=11)}, "client-order")
    seq = types(messages)
    assert seq[:2] == ["execution_start", "execution_cached"]
    assert seq[-2:] == ["execution_success", "executing"]
    executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
    assert executing[-1] is None
    assert executing.index("3") < executing.index("8") < executing.index("9")
    assert executing.index("4") < executing.index("3")
    assert executing.index("5") < executing.index("3")
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert [p["value"] for p in progress] == [1, 2, 3, 4]
    assert {p["max"] for p in progress} == {4}
    (executed,) = [m["data"] for m in messages if m["type"] == "executed"]
    assert executed["node"] == "9"
    assert executed["output"] == {
        "images": [{"filename": "run_00001_.png", "subfolder": "order", "type": "output"}]
    }
    png = (shared.output / "order" / "run_00001_.png").read_bytes()
    assert png_size(png) == (64, 48)
    prompt_id = messages[-1]["data"]["prompt_id"]
    history = requests.get(f"{shared.url}/history/{prompt_id}", timeout=5).json()[prompt_id]
    assert history["status"]["status_str"] == "success"
    assert history["status"]["completed"] is True
    assert [m[0] for m in history["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]
    assert history["outputs"] == {"9": executed["output"]}
    assert history["prompt"][1] == prompt_id
    assert history["prompt"][3]["client_id"] == "client-order"
    assert "Prompt executed in" in wait_for(lambda: "Prompt executed in" in shared.log() and shared.log())
    view = requests.get(
        f"{shared.url}/view",
        params={"filename": "run_00001_.png", "subfolder": "order", "type": "output"},
        timeout=5,
    )
    assert view.status_code == 200
    assert view.content == png


def test_an_identical_graph_is_served_from_cache_without_a_new_file(shared: Sim) -> None:
    first = run_over_ws(shared, {"prompt": txt2img("cache/run", seed=21)}, "client-cache")
    second = run_over_ws(shared, {"prompt": txt2img("cache/run", seed=21)}, "client-cache")
    cached = [m["data"]["nodes"] for m in second if m["type"] == "execution_cached"][0]
    assert sorted(cached) == sorted(txt2img("x"))
    assert [m["data"]["node"] for m in second if m["type"] == "executing"] == [None]
    outputs = [m["data"]["output"] for m in first + second if m["type"] == "executed"]
    assert outputs[0] == outputs[1]
    assert sorted(p.name for p in (shared.output / "cache").iterdir()) == ["run_00001_.png"]
    third = run_over_ws(shared, {"prompt": txt2img("cache/run", seed=22)}, "client-cache")
    (executed,) = [m["data"] for m in third if m["type"] == "executed"]
    assert executed["output"]["images"][0]["filename"] == "run_00002_.png"
    assert "4" in [m["data"]["nodes"] for m in third if m["type"] == "execution_cached"][0]


def test_save_counter_continues_from_existing_files(shared: Sim) -> None:
    (shared.output / "counter").mkdir(parents=True, exist_ok=True)
    (shared.output / "counter" / "img_00041_.png").write_bytes(b"x")
    messages = run_over_ws(shared, {"prompt": txt2img("counter/img", seed=31, batch=2)}, "client-counter")
    (executed,) = [m["data"] for m in messages if m["type"] == "executed"]
    assert [i["filename"] for i in executed["output"]["images"]] == ["img_00042_.png", "img_00043_.png"]


@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        ({}, "no_prompt", "No prompt provided"),
        (
            {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}},
            "invalid_prompt",
            "Cannot execute because node NoSuchNode does not exist.",
        ),
        (
            {
                "prompt": {
                    "1": {
                        "class_type": "EmptyLatentImage",
                        "inputs": {"width": 8, "height": 8, "batch_size": 1},
                    }
                }
            },
            "prompt_no_outputs",
            "Prompt has no outputs",
        ),
    ],
)
def test_invalid_prompts_are_rejected_with_400(
    shared: Sim, body: dict[str, Any], kind: str, message: str
) -> None:
    resp = requests.post(f"{shared.url}/prompt", json=body, timeout=5)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == kind
    assert resp.json()["error"]["message"] == message
    assert resp.json()["node_errors"] == {}


def test_a_bad_link_fails_validation_with_node_errors(shared: Sim) -> None:
    prompt = txt2img("bad")
    prompt["8"]["inputs"]["samples"] = ["5", 3]  # EmptyLatentImage has one output
    del prompt["3"]
    resp = requests.post(f"{shared.url}/prompt", json={"prompt": prompt}, timeout=5)
    assert resp.status_code == 400
    body = resp.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert set(body["node_errors"]) == {"8"}
    assert body["node_errors"]["8"]["dependent_outputs"] == ["9"]
    assert body["node_errors"]["8"]["class_type"] == "VAEDecode"


def test_a_foreign_origin_gets_403_with_an_empty_body(shared: Sim) -> None:
    resp = requests.post(
        f"{shared.url}/prompt",
        json={"prompt": txt2img("origin")},
        timeout=5,
        headers={"Origin": "http://evil.example"},
    )
    assert resp.status_code == 403
    assert resp.content == b""
    same = requests.get(f"{shared.url}/queue", timeout=5, headers={"Origin": f"http://127.0.0.1:{shared.port}"})
    assert same.status_code == 200


def test_a_failing_node_reports_execution_error_and_history_error(shared: Sim) -> None:
    prompt = txt2img("fail", text="__fail__")
    messages = run_over_ws(shared, {"prompt": prompt}, "client-fail")
    (error,) = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert error["node_id"] == "6"
    assert error["node_type"] == "CLIPTextEncode"
    assert error["exception_type"] == "RuntimeError"
    assert "__fail__" in error["exception_message"]
    assert isinstance(error["traceback"], list)
    assert error["traceback"]
    assert "execution_success" not in types(messages)
    history = requests.get(f"{shared.url}/history/{error['prompt_id']}", timeout=5).json()[error["prompt_id"]]
    assert history["status"]["status_str"] == "error"
    assert history["status"]["completed"] is False
    assert wait_for(lambda: "!!! Exception during processing !!!" in shared.log())

    boom = {"1": {"class_type": "SimulatedError", "inputs": {"message": "boom"}}}
    messages = run_over_ws(shared, {"prompt": boom}, "client-fail")
    (error,) = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert error["node_type"] == "SimulatedError"
    assert error["exception_message"] == "boom"


def test_fork_websocket_messages_ping_and_prompt(launcher: Launcher) -> None:
    sim = launcher.start(env={"SIM_PROTOCOL": "fork"})

    async def scenario() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{sim.url}/ws?clientId=fork-1") as ws,
        ):
            got.append(await ws.receive_json())
            got.append(await ws.receive_json())
            await ws.send_json({"type": "ping"})
            await ws.send_json(
                {"type": "prompt", "data": {"prompt": txt2img("fork", seed=41), "extra_data": {}}}
            )
            await ws.send_json({"type": "prompt", "data": {"prompt": {"1": {"class_type": "Nope"}}}})
            while True:
                msg = await asyncio.wait_for(ws.receive_json(), timeout=DEADLINE)
                got.append(msg)
                if msg["type"] == "executing" and msg["data"]["node"] is None:
                    return got

    got = asyncio.run(scenario())
    # The fork ignores ?clientId=: its own id comes first, then status with that sid.
    assert got[0]["type"] == "client_id"
    sid = got[0]["data"]["client_id"]
    assert sid
    assert sid != "fork-1"
    assert got[1] == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}}
    seq = types(got[2:])
    assert seq[0] == "pong"
    assert got[2 + [m["type"] for m in got[2:]].index("pong")] == {"type": "pong"}
    queued = next(m["data"] for m in got if m["type"] == "prompt_queued")
    assert set(queued) == {"prompt_id", "number", "node_errors"}
    error = next(m["data"] for m in got if m["type"] == "error")
    assert error["error"]["type"] == "invalid_prompt"
    assert got[-1]["data"]["prompt_id"] == queued["prompt_id"]
    assert "execution_success" in seq
    progress = [m["data"] for m in got if m["type"] == "node_executing"]
    assert progress, seq
    last = progress[-1]
    assert last["prompt_id"] == queued["prompt_id"]
    assert isinstance(last["class_type"], str)
    assert last["progress"]["current"] == last["progress"]["total"] == len(progress)
    assert last["progress"]["percentage"] == 100.0


def test_fork_prompt_posted_with_its_own_client_id_sends_no_events(launcher: Launcher) -> None:
    sim = launcher.start(env={"SIM_PROTOCOL": "fork"})

    async def scenario() -> tuple[str, list[dict[str, Any]]]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{sim.url}/ws?clientId=mine") as ws,
        ):
            async with session.post(f"{sim.url}/prompt", json={"prompt": txt2img("own", seed=5), "client_id": "mine"}) as r:
                prompt_id = (await r.json())["prompt_id"]
            got: list[dict[str, Any]] = []
            with contextlib.suppress(asyncio.TimeoutError):
                while True:
                    got.append(await asyncio.wait_for(ws.receive_json(), timeout=1.0))
            return prompt_id, got

    prompt_id, got = asyncio.run(scenario())
    assert {m["type"] for m in got} <= {"client_id", "status"}
    assert wait_for(lambda: prompt_id in requests.get(f"{sim.url}/history/{prompt_id}", timeout=5).json())


def test_upstream_websocket_honours_client_id_and_ignores_fork_messages(shared: Sim) -> None:
    async def scenario() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{shared.url}/ws?clientId=up-1") as ws:
            got.append(await ws.receive_json())
            await ws.send_json({"type": "ping"})
            await ws.send_json({"type": "prompt", "data": {"prompt": txt2img("upstream", seed=43)}})
            with contextlib.suppress(asyncio.TimeoutError):
                while True:
                    got.append(await asyncio.wait_for(ws.receive_json(), timeout=0.5))
        return got

    got = asyncio.run(scenario())
    assert got[0] == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "up-1"}}
    assert not {"client_id", "pong", "prompt_queued", "node_executing"} & {m["type"] for m in got}


def test_interrupt_stops_the_running_prompt(launcher: Launcher) -> None:
    sim = launcher.start(env={"SIM_EXEC_TIME": "20"})

    async def scenario() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{sim.url}/ws?clientId=int") as ws:
            resp = await session.post(f"{sim.url}/prompt", json={"prompt": txt2img("int"), "client_id": "int"})
            prompt_id = (await resp.json())["prompt_id"]
            while True:
                msg = await asyncio.wait_for(ws.receive_json(), timeout=DEADLINE)
                got.append(msg)
                if msg["type"] == "executing" and msg["data"]["node"] == "4":
                    queue = await (await session.get(f"{sim.url}/queue")).json()
                    assert queue["queue_running"][0][1] == prompt_id
                    await session.post(f"{sim.url}/interrupt", json={"prompt_id": prompt_id})
                if msg["type"] == "executing" and msg["data"]["node"] is None:
                    return got

    got = asyncio.run(scenario())  # without the interrupt the prompt would run its 20 s to success
    (interrupted,) = [m["data"] for m in got if m["type"] == "execution_interrupted"]
    assert interrupted["node_id"] == "4"
    history = requests.get(f"{sim.url}/history/{interrupted['prompt_id']}", timeout=5).json()
    assert history[interrupted["prompt_id"]]["status"]["status_str"] == "error"
    assert not sim.output.exists() or not list(sim.output.rglob("*.png"))
    assert "Processing interrupted" in sim.log()


def test_queue_and_history_can_be_cleared_and_deleted(launcher: Launcher) -> None:
    sim = launcher.start(env={"SIM_EXEC_TIME": "20"})
    with sim.http() as http:
        ids = [
            http.post("/prompt", json={"prompt": txt2img("q", seed=i)}).json()["prompt_id"] for i in range(3)
        ]
        wait_for(lambda: http.get("/queue").json()["queue_running"])
        queue = http.get("/queue").json()
        assert [item[1] for item in queue["queue_pending"]] == ids[1:]
        assert http.get("/prompt").json() == {"exec_info": {"queue_remaining": 3}}
        assert http.post("/queue", json={"delete": [ids[1]]}).status_code == 200
        assert [item[1] for item in http.get("/queue").json()["queue_pending"]] == [ids[2]]
        http.post("/queue", json={"clear": True})
        assert http.get("/queue").json()["queue_pending"] == []
        http.post("/interrupt")
        wait_for(lambda: ids[0] in http.get("/history").json())
        assert http.get("/history", params={"max_items": 1}).json().keys() == {ids[0]}
        http.post("/history", json={"delete": [ids[0]]})
        assert http.get(f"/history/{ids[0]}").json() == {}
        assert http.post("/free", json={"unload_models": True, "free_memory": True}).status_code == 200
    assert "Free request: unload_models=True free_memory=True" in sim.log()


def test_upload_then_load_image_and_view_rejects_traversal(shared: Sim) -> None:
    with shared.http() as http:
        png = png_bytes(20, 10, 5)
        resp = http.post(
            "/upload/image", files={"image": ("in.png", png, "image/png")}, data={"subfolder": ""}
        )
        assert resp.json() == {"name": "in.png", "subfolder": "", "type": "input"}
        again = http.post("/upload/image", files={"image": ("in.png", b"other", "image/png")})
        assert again.json()["name"] == "in (1).png"
        prompt = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "loaded"}},
        }
        resp = http.post("/prompt", json={"prompt": prompt})
        assert resp.status_code == 200
        bad = http.post(
            "/prompt",
            json={"prompt": {**prompt, "1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}}}},
        )
        assert bad.status_code == 400
        assert "Invalid image file: missing.png" in bad.text
        assert http.get("/view", params={"filename": "in.png", "type": "input"}).content == png
        assert (
            http.get("/view", params={"filename": "../user/comfyui.db", "type": "input"}).status_code == 400
        )
        assert (
            http.get(
                "/view", params={"filename": "in.png", "type": "input", "subfolder": "../.."}
            ).status_code
            == 403
        )
        assert http.get("/view", params={"filename": "nope.png"}).status_code == 404
        wait_for(lambda: (shared.output / "loaded_00001_.png").exists())
    assert png_size((shared.output / "loaded_00001_.png").read_bytes()) == (20, 10)


def test_object_info_has_core_classes_in_comfyui_shape_and_lists_model_files(
    launcher: Launcher, tmp_path: Path
) -> None:
    models = tmp_path / "shared" / "models"
    (models / "checkpoints" / "SD15" / "LCM").mkdir(parents=True)
    (models / "checkpoints" / "SD15" / "LCM" / "nested.safetensors").write_bytes(b"")
    (models / "checkpoints" / "notes.txt").write_bytes(b"")
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        f"comfyui:\n    base_path: {tmp_path / 'shared'}\n    checkpoints: models/checkpoints/\n"
    )
    sim = launcher.start(
        args=("--cpu", "--extra-model-paths-config", str(extra)),
        env={"SIM_EXTRA_NODES": "VHS_VideoCombine:output,ImpactWildcardProcessor"},
    )
    with sim.http() as http:
        info = http.get("/object_info").json()
        assert {
            "CheckpointLoaderSimple",
            "CLIPTextEncode",
            "EmptyLatentImage",
            "KSampler",
            "VAEDecode",
            "VAEEncode",
            "SaveImage",
            "PreviewImage",
            "LoadImage",
            "LoraLoader",
            "VHS_VideoCombine",
            "ImpactWildcardProcessor",
        } <= set(info)
        ks = info["KSampler"]
        assert ks["input"]["required"]["steps"][0] == "INT"
        assert ks["input"]["required"]["steps"][1]["default"] == 20
        assert "euler" in ks["input"]["required"]["sampler_name"][0]
        assert ks["output"] == ["LATENT"]
        assert ks["output_node"] is False
        assert ks["category"] == "sampling"
        assert info["SaveImage"]["output_node"] is True
        assert info["VHS_VideoCombine"]["output_node"] is True
        ckpt = http.get("/object_info/CheckpointLoaderSimple").json()["CheckpointLoaderSimple"]
        assert ckpt["input"]["required"]["ckpt_name"][0] == ["SD15/LCM/nested.safetensors"]
        assert http.get("/object_info/NoSuchNode").json() == {}
        assert http.get("/api/models/checkpoints").json() == ["SD15/LCM/nested.safetensors"]


# ---- faults ----------------------------------------------------------------------------------


def test_a_hang_keeps_the_port_open_but_answers_nothing_until_cleared(launcher: Launcher) -> None:
    sim = launcher.start()
    sim.set_faults(hang_after=0)

    def hung() -> bool:
        try:
            requests.get(f"{sim.url}/system_stats", timeout=0.5)
        except requests.Timeout:
            return True
        return False

    wait_for(hung)
    with socket.create_connection(("127.0.0.1", sim.port), timeout=2):
        pass  # the kernel still accepts connections
    assert sim.proc.poll() is None
    (sim.user / faultlib.FAULTS_FILE).unlink()
    wait_for(sim.ready)
    sim.set_faults(hang_after=0)
    wait_for(hung)
    sim.proc.send_signal(signal.SIGTERM)  # a hung simulator still stops on SIGTERM
    assert sim.wait_exit() == -signal.SIGTERM


def test_a_crash_fault_exits_1_with_a_traceback(launcher: Launcher) -> None:
    # Long enough that a loaded machine still sees it ready before the crash.
    sim = launcher.start(env={"SIM_CRASH_AFTER": "3"})
    assert sim.wait_exit() == 1
    log = sim.log()
    assert "Traceback (most recent call last):" in log
    assert "RuntimeError: simulated crash" in log


def test_an_oom_fault_prints_a_comfyui_style_cuda_oom(launcher: Launcher) -> None:
    sim = launcher.start(args=(), env={"SIM_OOM": "0", "CUDA_VISIBLE_DEVICES": "0"})
    wait_for(lambda: "Got an OOM" in sim.log())
    log = sim.log()
    assert "!!! Exception during processing !!! CUDA out of memory. Tried to allocate 2.00 GiB" in log
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in log
    assert sim.ready()
    assert log.count("torch.OutOfMemoryError") == 1


def test_each_write_of_a_once_oom_fault_prints_again_even_if_its_removal_went_unseen(launcher: Launcher) -> None:
    # The chaos test removes an oom fault and may set it again before the simulator's next read
    # (every 0.5 s): that second fault must still print.
    sim = launcher.start(faults={"exec_time": 0.01})
    sim.set_faults(oom=0)
    wait_for(lambda: sim.log().count("torch.OutOfMemoryError") == 1)
    sim.set_faults()
    sim.set_faults(oom=0)  # removed and set again at once: no read sees the file without it
    wait_for(lambda: sim.log().count("torch.OutOfMemoryError") == 2)
    assert sim.ready()


def test_faults_injected_through_the_file_change_a_running_instance(launcher: Launcher) -> None:
    sim = launcher.start(faults={"exec_time": 0.01})
    sim.set_faults(crash_after=0)
    assert sim.wait_exit() == 1


# ---- pure parts ------------------------------------------------------------------------------


def test_faults_come_from_env_and_the_file_overrides_them() -> None:
    env_faults, warnings = faultlib.from_env(
        {"SIM_HANG_AFTER": "5", "SIM_IMPORT_FAILED": "a, b", "SIM_OOM": "x"}
    )
    assert env_faults.hang_after == 5.0
    assert env_faults.import_failed == ("a", "b")
    assert env_faults.oom is None
    assert warnings
    assert "SIM_OOM" not in warnings[0]
    assert "oom" in warnings[0]
    merged, warnings = faultlib.overlay(
        env_faults, {"hang_after": None, "exec_time": 2, "bogus": 1}, "f.json"
    )
    assert merged.hang_after == 5.0
    assert merged.exec_time == 2.0
    assert warnings == ["simulator: ignoring unknown fault 'bogus' in f.json"]


@pytest.mark.parametrize(
    ("faults", "since", "last_oom", "expected"),
    [
        (faultlib.Faults(), 100.0, None, faultlib.FaultDue()),
        (faultlib.Faults(crash_after=2), 1.9, None, faultlib.FaultDue()),
        (faultlib.Faults(crash_after=2), 2.0, None, faultlib.FaultDue(crash=True)),
        (faultlib.Faults(hang_after=0), 0.0, None, faultlib.FaultDue(hang=True)),
        (faultlib.Faults(oom=0), 0.0, None, faultlib.FaultDue(oom=True)),
        (faultlib.Faults(oom=0), 50.0, 0.0, faultlib.FaultDue()),
        (faultlib.Faults(oom=10), 9.0, 0.0, faultlib.FaultDue()),
        (faultlib.Faults(oom=10), 10.0, 0.0, faultlib.FaultDue(oom=True)),
    ],
)
def test_fault_clock_decides_what_fires(
    faults: faultlib.Faults, since: float, last_oom: float | None, expected: faultlib.FaultDue
) -> None:
    assert faultlib.due(faults, since, last_oom) == expected


def test_extra_paths_resolve_like_comfyui(tmp_path: Path) -> None:
    config = {
        "a": {"base_path": "rel", "is_default": True, "checkpoints": "models/ckpt/", "loras": "x/\ny/\n"},
        "b": {"vae": "/abs/vae", "clip": "relative/clip"},
        "empty": None,
    }
    got = fp.extra_search_paths(config, tmp_path)
    assert got == [
        fp.SearchPath("checkpoints", tmp_path / "rel" / "models" / "ckpt", True),
        fp.SearchPath("loras", tmp_path / "rel" / "x", True),
        fp.SearchPath("loras", tmp_path / "rel" / "y", True),
        fp.SearchPath("vae", Path("/abs/vae"), False),
        fp.SearchPath("clip", tmp_path / "relative" / "clip", False),
    ]


def test_save_counter_matches_only_the_same_prefix() -> None:
    names = [
        "ComfyUI_00003_.png",
        "ComfyUI_00010_.png",
        "ComfyUIx_00050_.png",
        "other_00099_.png",
        "ComfyUI_x_.png",
    ]
    assert fp.next_counter(names, "ComfyUI") == 11
    assert fp.next_counter([], "ComfyUI") == 1


def test_validation_and_order_of_the_default_workflow() -> None:
    defs = catalogue()
    result = validate(txt2img("p"), defs)
    assert result.ok
    assert result.outputs == ["9"]
    assert result.node_errors == {}
    order = execution_order(txt2img("p"), ["9"])
    assert order.index("4") < order.index("6") < order.index("3") < order.index("8") < order.index("9")
    bad = txt2img("p")
    bad["3"]["inputs"]["sampler_name"] = "nope"
    bad["3"]["inputs"]["steps"] = 0
    errors = validate(bad, defs).node_errors["3"]["errors"]
    assert {e["type"] for e in errors} == {"value_not_in_list", "value_smaller_than_min"}
    a, b = signatures(txt2img("p", seed=1)), signatures(txt2img("p", seed=2))
    assert a["4"] == b["4"]
    assert a["3"] != b["3"]
    assert a["9"] != b["9"]


def test_png_writer_produces_a_valid_png() -> None:
    data = png_bytes(7, 3, 42, {"prompt": "{}"})
    assert png_size(data) == (7, 3)
    assert b"tEXtprompt\x00{}" in data


_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5))
_link = st.lists(st.one_of(st.sampled_from(["1", "2", "3", "9"]), st.integers(0, 3)), max_size=3)
_node = st.fixed_dictionaries(
    {"class_type": st.sampled_from([*catalogue(), "Nope"])},
    optional={
        "inputs": st.dictionaries(
            st.sampled_from(
                [
                    "images",
                    "samples",
                    "vae",
                    "steps",
                    "text",
                    "width",
                    "clip",
                    "seed",
                    "filename_prefix",
                    "image",
                ]
            ),
            st.one_of(_json_scalar, _link),
            max_size=5,
        )
    },
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["1", "2", "3", "9"]), _node, max_size=4))
def test_validation_never_raises_on_arbitrary_graphs(prompt: dict[str, Any]) -> None:
    result = validate(prompt, catalogue(), input_images=[])
    if result.ok:
        assert set(execution_order(prompt, result.outputs)) >= set(result.outputs)
        assert set(signatures(prompt)) == set(prompt)
    else:
        assert result.error is not None
        assert result.error["type"] in {
            "invalid_prompt",
            "prompt_no_outputs",
            "prompt_outputs_failed_validation",
        }
