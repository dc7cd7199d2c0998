"""``orchestrator demo``: the full ``up`` pipeline offline, with simulated GPUs and local git repos.

The service side: build the local source repositories, the demo's settings, start (``up`` plus
the pointer that lets read commands find the demo), wait until READY, stop. The CLI chooses the
root, sets up logging, handles signals and prints the progress lines from these values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import requests

from orchestrator.core.errors import ProvisionError
from orchestrator.core.settings import Settings
from orchestrator.lifecycle.down import Teardown, down
from orchestrator.lifecycle.up import UpReport, up
from orchestrator.machine import runner as subproc
from orchestrator.machine.clock import wait_for
from orchestrator.machine.state import remove_demo_pointer, write_demo_pointer

GIT = ["git", "-c", "user.email=demo@localhost", "-c", "user.name=demo", "-c", "init.defaultBranch=main"]
NODE_INIT = "NODE_CLASS_MAPPINGS = {}\nNODE_DISPLAY_NAME_MAPPINGS = {}\n"


@dataclasses.dataclass(frozen=True)
class DemoRun:
    """A started demo: what ``up`` did and where its instances and monitor answer."""

    report: UpReport
    instance_urls: tuple[str, ...]
    monitor_url: str


def _git(cwd: Path, *args: str) -> None:
    # The runner: a deadline that holds even if a hook leaves a helper holding git's output.
    argv = [*GIT, *args]
    done = subproc.run(argv, cwd=cwd, env=os.environ, timeout=60, merge_stderr=True)
    if done.timed_out or done.returncode != 0:
        why = "timed out after 60s" if done.timed_out else f"exit {done.returncode}"
        tail = done.stdout.decode(errors="replace").strip().splitlines()[-1:]
        raise ProvisionError(f"demo: `git {' '.join(args)}` in {cwd} failed ({why}) {' '.join(tail)}".rstrip())


def _repo(path: Path, files: Mapping[str, str], branch: str = "main") -> str:
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


def demo_settings(root: Path, gpus: int, urls: Mapping[str, str]) -> dict[str, str]:
    """The settings (as variables) that point ``up`` at the simulated GPUs and local repos."""
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


def start(settings: Settings, overrides: Mapping[str, str], gpus: int) -> DemoRun:
    """``up``, then the pointer that lets `orchestrator status|gpus|plan|logs` without ROOT find
    this demo while it runs. ``gpus``: how many instances the demo asked for."""
    report = up(settings, overrides=overrides)
    effective = {row["name"]: row["value"] for row in settings.effective()}
    write_demo_pointer({k: str(v) for k, v in effective.items() if v is not None})
    base = settings.worker_base_comfyui_port
    return DemoRun(
        report=report,
        instance_urls=tuple(f"http://127.0.0.1:{port}/system_stats" for port in range(base, base + gpus)),
        monitor_url=f"http://127.0.0.1:{settings.orchestrator_port}",
    )


def wait_ready(settings: Settings, timeout: float) -> bool:
    """Poll the monitor's /readyz until it says 200 or ``timeout`` seconds pass."""
    url = f"http://127.0.0.1:{settings.orchestrator_port}/readyz"

    def ready() -> bool:
        try:
            return requests.get(url, timeout=1.0).status_code == 200
        except requests.RequestException:
            return False

    return wait_for(ready, timeout, 0.25)


def stop(settings: Settings) -> Teardown:
    """Forget the pointer, then ``down``."""
    remove_demo_pointer()
    return down(settings)
