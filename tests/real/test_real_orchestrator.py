"""Real ComfyUI 0.3.64 (CPU) under the real orchestrator: ``MOCK_GPU=1 NUM_GPUS=2``.

One machine is shared by the module (two real instances take ~20 s to start on 2 cores). No test
depends on another having passed: each first waits for (or restores) two READY instances, and
the last one brings the machine down and checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from support import Machine, clean_env, http_client, make_repo, wait_until

from orchestrator.machine.ports import free_port_block
from orchestrator.simulator.png import png_size

from .conftest import real_marks

pytestmark = real_marks()

BROKEN = "broken-node"
BROKEN_CODE = 'raise RuntimeError("broken on purpose")\n\nNODE_CLASS_MAPPINGS = {}\n'
SHIPPED = Path(__file__).resolve().parents[2] / "shared"
READY_TIMEOUT = 150.0  # two real instances starting together on 2 loaded cores


def graph(prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 32, "height": 24, "batch_size": 1, "color": random.randint(0, 0xFFFFFF)}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def slow_graph(prefix: str) -> dict[str, Any]:
    """A model-free job that keeps a CPU busy for a second or more (a wide Gaussian blur), so that
    jobs posted back to back overlap and the router sees the first instance busy."""
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 1024, "height": 1024, "batch_size": 1, "color": random.randint(0, 0xFFFFFF)}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def instances(m: Machine) -> list[dict[str, Any]]:
    try:
        r = requests.get(f"{m.monitor_url}/instances", timeout=5)
    except requests.RequestException:
        return []
    return list(r.json()["instances"]) if r.status_code == 200 else []


def all_ready(m: Machine) -> bool:
    got = instances(m)
    return len(got) == m.num_gpus and all(i["state"] == "READY" and i["pid"] for i in got)


def ensure_ready(m: Machine) -> list[dict[str, Any]]:
    """Both instances READY: waited for, and restarted once if an earlier test left one broken."""
    if m.run("status").returncode != 0:  # supervisord is not running (an earlier test brought it down)
        r = m.run("up", timeout=300)
        assert r.returncode == 0, r.stderr + r.stdout
    if not wait_until(lambda: all_ready(m), READY_TIMEOUT, 0.5):
        for inst in instances(m):
            if inst["state"] != "READY":
                with contextlib.suppress(psutil.Error, TypeError):
                    psutil.Process(inst["pid"]).resume()
                m.run("restart", str(inst["gpu"]))
        assert wait_until(lambda: all_ready(m), READY_TIMEOUT, 0.5), json.dumps(instances(m), indent=1)
    return instances(m)


def plan(m: Machine) -> dict[int, dict[str, Any]]:
    data = json.loads(m.layout.plan_file.read_text())
    return {int(i["gpu"]["index"]): i for i in data["instances"]}


def processes_under(root: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(root) in a for a in p.info["cmdline"] or ()):
                found.append(p)
    return found


@pytest.fixture(scope="module")
def machine(real_python: Path, comfy_src: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    comfy_url, _ = comfy_src
    base = tmp_path_factory.mktemp("real-machine")
    make_repo(base / "src" / BROKEN, {"__init__.py": BROKEN_CODE})
    nodes = json.dumps({"custom_nodes": [{"name": BROKEN, "url": f"file://{base / 'src' / BROKEN}"}]})
    make_repo(base / "src" / "shared", {
        "config_nodes.json": nodes, "config_nodes_test.json": nodes,
        "comfy_dir_config.yaml": (SHIPPED / "comfy_dir_config.yaml").read_text(),
        "static-models.json": json.dumps({"symlinks": [], "no_index": []}),
        "models.yaml": "models: []\n", "workflows/.gitkeep": "",
    })
    root = base / "root"
    root.mkdir()
    ports = free_port_block(3)
    env = clean_env(
        ROOT=str(root), MOCK_GPU="1", NUM_GPUS="2", WORKER_BASE_COMFYUI_PORT=str(ports),
        ORCHESTRATOR_PORT=str(free_port_block(1)), COMFY_REPO_URL=comfy_url, COMFY_BRANCH="main",
        COMFY_FALLBACK_URL=comfy_url, SHARED_REPO_URL=f"file://{base / 'src' / 'shared'}", SHARED_BRANCH="main",
        COMFY_PYTHON=str(real_python), PROBE_INTERVAL="0.5", PROBE_TIMEOUT="2", STOP_TIMEOUT="5",
        GIT_TIMEOUT="60", NODE_TIMEOUT="120", PIP_NO_INDEX="1", GPU_SAMPLE_INTERVAL="1", OUTPUT_MAX_AGE="60m",
        CUDA_VISIBLE_DEVICES="",
    )
    for k in [k for k in env if k.startswith(("HF_", "CIVITAI_", "MODELS_", "HUGGINGFACE_"))]:
        del env[k]
    m = Machine(root, env, ports, int(env["ORCHESTRATOR_PORT"]), 2)
    try:
        r = m.run("up", timeout=300)
        assert r.returncode == 0, r.stderr + r.stdout
        yield m
    finally:
        m.down()
        for p in processes_under(root):  # never leave a 0.8 GB ComfyUI behind, whatever failed
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_both_real_instances_are_ready_with_their_own_port_folders_and_database(machine: Machine) -> None:
    m = machine
    insts = ensure_ready(m)
    planned = plan(m)
    seen: dict[str, set[str]] = {"port": set(), "output": set(), "temp": set(), "input": set(), "user": set(),
                                 "db": set()}
    for inst in insts:
        gpu, port = inst["gpu"], inst["port"]
        assert port == m.port_base + gpu
        assert inst["device"] == "cpu"
        cmd = psutil.Process(inst["pid"]).cmdline()
        assert cmd[0] == m.env["COMFY_PYTHON"]
        assert "main.py" in cmd
        stats = requests.get(f"http://127.0.0.1:{port}/system_stats", timeout=10).json()
        assert stats["system"]["comfyui_version"] == "0.3.64"
        assert stats["system"]["pytorch_version"].startswith("2.11.0")
        argv = stats["system"]["argv"]

        def flag(name: str, argv: list[str] = argv) -> str:
            return argv[argv.index(name) + 1]

        assert flag("--port") == str(port)
        p = planned[gpu]
        assert flag("--output-directory") == p["output_dir"]
        assert flag("--temp-directory") == p["temp_dir"]
        assert flag("--input-directory") == p["input_dir"]
        assert flag("--user-directory") == p["user_dir"]
        db = flag("--database-url").removeprefix("sqlite:///")
        assert Path(db).is_file()
        assert Path(db).parent == Path(p["user_dir"])
        for key, value in (("port", str(port)), ("output", p["output_dir"]), ("temp", p["temp_dir"]),
                           ("input", p["input_dir"]), ("user", p["user_dir"]), ("db", db)):
            seen[key].add(value)
        assert (Path(p["temp_dir"]) / "temp").is_dir()
    assert all(len(values) == 2 for values in seen.values()), seen


def test_a_model_free_job_lands_its_png_in_the_routed_instances_output_folder(machine: Machine) -> None:
    m = machine
    ensure_ready(m)
    prefix = f"job_{random.randint(0, 10**9)}"
    r = requests.post(f"{m.monitor_url}/jobs", json={"workflow": graph(prefix), "timeout": 120}, timeout=150)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "success", job
    gpu = job["instance"]["gpu"]
    (out,) = job["outputs"]
    assert out["node_id"] == "3"
    assert out["filename"].startswith(prefix)
    planned = plan(m)
    png = Path(planned[gpu]["output_dir"]) / out["subfolder"] / out["filename"]
    assert png_size(png.read_bytes()) == (32, 24)
    other = Path(planned[1 - gpu]["output_dir"])
    assert not list(other.rglob(f"{prefix}*"))


def test_jobs_spread_over_both_real_instances(machine: Machine) -> None:
    m = machine
    ensure_ready(m)
    with http_client(m.monitor_url, timeout=150) as c:
        ids = []
        for n in range(4):
            r = c.post("/jobs", json={"workflow": slow_graph(f"spread_{n}_{random.randint(0, 10**9)}"), "wait": False})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        done = [c.get(f"/jobs/{i}", params={"wait": 120}).json() for i in ids]
    assert all(j["status"] == "success" for j in done), done
    assert {j["instance"]["gpu"] for j in done} == {0, 1}


def _recovered(m: Machine, gpu: int, old_pid: int) -> bool:
    inst = next((i for i in instances(m) if i["gpu"] == gpu), None)
    return bool(inst and inst["pid"] not in (None, old_pid) and inst["state"] == "READY")


def test_a_sigkilled_real_instance_comes_back_ready(machine: Machine) -> None:
    m = machine
    before = {i["gpu"]: i["pid"] for i in ensure_ready(m)}
    started = time.monotonic()
    os.kill(before[1], signal.SIGKILL)
    assert wait_until(lambda: _recovered(m, 1, before[1]), READY_TIMEOUT, 0.25), instances(m)
    print(f"SIGKILL -> READY in {time.monotonic() - started:.1f}s")
    assert {i["gpu"]: i["pid"] for i in instances(m)}[0] == before[0]
    assert requests.get(f"http://127.0.0.1:{m.ports[1]}/system_stats", timeout=10).status_code == 200


def test_a_sigstopped_real_instance_is_restarted_to_ready(machine: Machine) -> None:
    m = machine
    before = {i["gpu"]: i["pid"] for i in ensure_ready(m)}
    started = time.monotonic()
    os.kill(before[0], signal.SIGSTOP)
    try:
        assert wait_until(lambda: _recovered(m, 0, before[0]), READY_TIMEOUT, 0.25), instances(m)
        print(f"SIGSTOP -> READY in {time.monotonic() - started:.1f}s")
        assert not psutil.pid_exists(before[0]) or psutil.Process(before[0]).status() == psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(before[0], signal.SIGCONT)
    inst = next(i for i in instances(m) if i["gpu"] == 0)
    assert inst["restarts"] >= 1
    assert inst["state"] == "READY"


def test_a_custom_node_that_raises_at_import_is_reported_by_name(machine: Machine) -> None:
    m = machine
    ensure_ready(m)
    assert (m.layout.custom_nodes_dir / BROKEN / "__init__.py").is_file()  # provisioned from config_nodes.json
    assert wait_until(lambda: all(i["failed_custom_nodes"] == [BROKEN] for i in instances(m)), 30, 0.5), instances(m)
    status = m.status()
    assert all(i["failed_custom_nodes"] == [BROKEN] for i in status["instances"]), status
    text = m.run("status", check=True).stdout
    assert f"failed nodes: {BROKEN}" in text
    log = Path(plan(m)[0]["log_file"]).read_text(errors="replace")
    assert f"(IMPORT FAILED): {m.layout.custom_nodes_dir / BROKEN}" in log


def test_down_leaves_no_process_and_frees_every_port(machine: Machine) -> None:
    m = machine
    ensure_ready(m)
    pids = [i["pid"] for i in instances(m)]
    sup = m.status()["supervisord"]["pid"]
    tree = [sup] + [c.pid for c in psutil.Process(sup).children(recursive=True)]
    assert set(pids) <= set(tree)
    r = m.down()
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: not [p for p in tree if psutil.pid_exists(p)
                                   and psutil.Process(p).status() != psutil.STATUS_ZOMBIE], 15, 0.2)
    assert processes_under(m.root) == []
    for port in [*m.ports, m.monitor_port]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
