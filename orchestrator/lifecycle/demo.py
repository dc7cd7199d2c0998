"""`orchestrator demo`: the full `up` pipeline offline, with simulated GPUs and local git repos."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

import httpx

from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings, load_settings
from orchestrator.lifecycle.service import down, up
from orchestrator.machine import runner as subproc
from orchestrator.machine.state import remove_demo_pointer, write_demo_pointer

GIT = ["git", "-c", "user.email=demo@localhost", "-c", "user.name=demo", "-c", "init.defaultBranch=main"]


def _git(cwd: Path, *args: str) -> None:
    # subproc: a deadline that holds even if a hook leaves a helper holding git's output.
    argv = [*GIT, *args]
    done = subproc.run(argv, cwd=cwd, env=os.environ, timeout=60, merge_stderr=False)
    if done.timed_out:
        raise subprocess.TimeoutExpired(argv, 60, done.stdout, done.stderr)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)


def _repo(path: Path, files: dict[str, str], branch: str = "main") -> str:
    if (path / ".git").exists():
        return path.resolve().as_uri()
    path.mkdir(parents=True, exist_ok=True)
    _git(path, "init", "-q", "-b", branch)
    for rel, text in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "demo")
    return path.resolve().as_uri()


NODE_INIT = "NODE_CLASS_MAPPINGS = {}\nNODE_DISPLAY_NAME_MAPPINGS = {}\n"


def build_sources(src: Path) -> dict[str, str]:
    """Local repositories standing in for the fork, the shared config repo and custom nodes."""
    from orchestrator.simulator.tree import write_code_tree

    comfy = src / "ComfyUI"
    if not (comfy / ".git").exists():
        write_code_tree(comfy)
    comfy_url = _repo(comfy, {}, branch="forward")
    nodes = {
        "demo-hello-nodes": {"__init__.py": NODE_INIT, "requirements.txt": "PyYAML\n"},
        "demo-env-nodes": {"__init__.py": NODE_INIT},
        "demo-script-nodes": {"__init__.py": NODE_INIT},
    }
    urls = {name: _repo(src / "nodes" / name, files) for name, files in nodes.items()}
    config_nodes = {
        "custom_nodes": [
            {"name": "demo-hello-nodes", "url": urls["demo-hello-nodes"], "requirements": True},
            {
                "name": "demo-env-nodes",
                "url": urls["demo-env-nodes"],
                "env": {"HF_TOKEN": "${HF_TOKEN}", "DEMO_MODE": "${DEMO_MODE:-offline}"},
            },
            {
                "name": "demo-script-nodes",
                "url": "git clone " + urls["demo-script-nodes"],
                "custom_script": "echo installed by the demo > installed.txt",
                "install_order": 1,
            },
        ]
    }
    shipped = Path(__file__).resolve().parents[2] / "shared"
    comfy_dir_config = (
        (shipped / "comfy_dir_config.yaml").read_text()
        if (shipped / "comfy_dir_config.yaml").exists()
        else "comfyui:\n    base_path: /workspace/ComfyUI\n    custom_nodes: custom_nodes/\n"
        "    checkpoints: models/checkpoints/\n    loras: models/loras/\n"
    )
    shared_url = _repo(
        src / "shared",
        {
            "config_nodes.json": json.dumps(config_nodes, indent=2),
            "config_nodes_test.json": json.dumps(config_nodes, indent=2),
            "comfy_dir_config.yaml": comfy_dir_config,
            "static-models.json": json.dumps({"symlinks": [], "no_index": []}),
            "models.yaml": "models: []\n",
            "workflows/.gitkeep": "",
        },
    )
    return {"comfy": comfy_url, "shared": shared_url}


def demo_settings(root: Path, gpus: int, urls: dict[str, str]) -> dict[str, str]:
    return {
        "ROOT": str(root),
        "MOCK_GPU": "1",
        "NUM_GPUS": str(gpus),
        "COMFY_REPO_URL": urls["comfy"],
        "COMFY_BRANCH": "forward",
        "COMFY_FALLBACK_URL": urls["comfy"],
        "SHARED_REPO_URL": urls["shared"],
        "SHARED_BRANCH": "main",
    }


def wait_ready(settings: Settings, timeout: float) -> bool:
    url = f"http://127.0.0.1:{settings.orchestrator_port}/readyz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    if settings.sources["ROOT"] == "default":
        root = Path(tempfile.mkdtemp(prefix="orchestrator-demo-"))
    else:
        root = settings.root
    root.mkdir(parents=True, exist_ok=True)
    print(f"demo root: {root}", flush=True)
    urls = build_sources(root / "demo-src")
    overrides = demo_settings(root, args.gpus, urls)
    from orchestrator.cli.main import _flags

    settings = load_settings(os.environ, {**overrides, **_flags(args)})
    from orchestrator.cli.logconfig import setup_logging

    setup_logging(  # the CLI logged to stderr only: the demo's ROOT was not chosen yet
        fmt=settings.log_format,
        level=settings.log_level,
        secrets=settings.secret_values,
        log_file=Layout(root).orchestrator_log,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        up(settings, overrides=overrides)
        # Lets `orchestrator status|gpus|plan|logs` without ROOT find this demo while it runs.
        effective = {row["name"]: row["value"] for row in settings.effective()}
        write_demo_pointer({k: str(v) for k, v in effective.items() if v is not None})
        for inst_port in range(settings.worker_base_comfyui_port, settings.worker_base_comfyui_port + args.gpus):
            print(f"instance: http://127.0.0.1:{inst_port}/system_stats", flush=True)
        mon = f"http://127.0.0.1:{settings.orchestrator_port}"
        print(f"monitor:  {mon}/readyz  {mon}/metrics  {mon}/instances", flush=True)
        print("status:   .venv/bin/orchestrator status   (status, gpus, plan, logs find the running demo)", flush=True)
        print(f"          MOCK_GPU=1 NUM_GPUS={args.gpus} .venv/bin/orchestrator --root {root} status", flush=True)
        if wait_ready(settings, 90):
            print(f"all {args.gpus} instances READY; Ctrl-C stops everything", flush=True)
        else:
            print("instances are not READY yet: see `orchestrator status`; Ctrl-C stops everything", flush=True)
        stop.wait()
    finally:
        print("stopping...", flush=True)
        remove_demo_pointer()
        problems = down(settings)
        for p in problems:
            print(f"error: {p}", flush=True)
        print("demo stopped: no instance, monitor or supervisord left running", flush=True)
    return 0

