"""The ComfyUI code a machine runs: your own checkout, the fork's branch, and what status reports.

Real `orchestrator up` runs (supervisord, the monitor) over simulator code trees in local git
repos; `status`, `/status` and the metrics must name the commit checked out in $ROOT/ComfyUI
and the version each running instance reports, whatever the configuration asked for.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from support import Machine, commit_file, git, make_repo, wait_until

from orchestrator.simulator.tree import write_code_tree

pytestmark = pytest.mark.integration


def simulator_repo(path: Path, version: str, branch: str = "master") -> str:
    """A git repo whose tree is the simulator, reporting ``version``; returns the commit."""
    write_code_tree(path)
    (path / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    git(path, "init", "-q", "-b", branch)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "simulated ComfyUI")
    return git(path, "rev-parse", "HEAD")


def status_with_versions(m: Machine) -> dict[str, Any]:
    """`status --json` once the monitor has probed every instance's /system_stats."""
    found: dict[str, Any] = {}

    def probed() -> bool:
        found.update(m.status())
        return all(i.get("comfyui_version") for i in found["instances"])

    assert wait_until(probed, 60, 0.3), found
    return found


def test_your_own_checkout_runs_with_skip_provision_and_status_names_its_commit_and_version(
    machine: Callable[..., Machine],
) -> None:
    m = machine(1)
    own = m.root / "ComfyUI"
    shutil.rmtree(own)
    commit = simulator_repo(own, "0.3.12-mine")
    m.up()  # --skip-provision: the tree at $ROOT/ComfyUI is used as it is, no git, no network
    assert m.wait_all_answer(60)
    st = status_with_versions(m)
    assert st["comfy"]["commit"] == commit
    assert st["comfy"]["ref"] == "master"
    assert st["comfy"]["fallback"] is False
    assert [i["comfyui_version"] for i in st["instances"]] == ["0.3.12-mine"]
    assert git(own, "rev-parse", "HEAD") == commit  # untouched
    api = requests.get(f"{m.monitor_url}/status", timeout=5).json()
    assert api["comfy"]["commit"] == commit
    assert api["instances"][0]["comfyui_version"] == "0.3.12-mine"
    metrics = requests.get(f"{m.monitor_url}/metrics", timeout=5).text
    assert f'comfy_commit="{commit}"' in metrics
    assert 'comfyui_version="0.3.12-mine"' in metrics
    text = m.run("status").stdout
    assert "ComfyUI code: " in text
    assert f"master @ {commit[:12]}" in text
    assert "0.3.12-mine" in text  # the VERSION column


def test_a_missing_fork_branch_fails_up_and_status_keeps_naming_the_code_that_runs(
    machine: Callable[..., Machine], tmp_path: Path
) -> None:
    fork = tmp_path / "fork"
    first = simulator_repo(fork, "0.3.12")
    git(fork, "branch", "websocket_version")
    shared = tmp_path / "shared-src"
    make_repo(
        shared,
        {"config_nodes.json": json.dumps({"custom_nodes": []}), "models.yaml": "models: []\n"},
    )
    m = machine(
        1,
        COMFY_REPO_URL=f"file://{fork}",
        COMFY_BRANCH="master",
        COMFY_FALLBACK_URL=f"file://{fork}",
        COMFY_COMMIT=first,
        SHARED_REPO_URL=f"file://{shared}",
        SHARED_BRANCH="main",
    )
    shutil.rmtree(m.root / "ComfyUI")
    m.run("up", check=True)
    assert m.wait_all_answer(60)
    assert m.status()["comfy"]["commit"] == first

    # A new commit on the fork: a warm `up` within COMFY_UPDATE_INTERVAL does not fetch it.
    newer = commit_file(fork, "README.md", "newer\n")
    m.run("up", check=True)
    assert m.status()["comfy"]["commit"] == first

    # The configured branch does not exist: one line naming the branches, non-zero exit.
    failed = m.run("up", COMFY_BRANCH="forward")
    assert failed.returncode != 0
    line = f"ComfyUI: branch 'forward' does not exist in file://{fork}; branches there: master, websocket_version"
    assert line in failed.stderr + failed.stdout
    st = m.status()
    assert (st["comfy"]["ref"], st["comfy"]["commit"]) == ("master", first)

    # Fallback allowed: `up` goes on with the tree it has, and says so everywhere.
    m.run("up", check=True, COMFY_BRANCH="forward", COMFY_ON_MISSING_BRANCH="fallback")
    st = status_with_versions(m)
    comfy = st["comfy"]
    assert (comfy["ref"], comfy["commit"], comfy["wanted"], comfy["fallback"]) == ("master", first, "forward", True)
    assert [i["comfyui_version"] for i in st["instances"]] == ["0.3.12"]
    text = m.run("status").stdout
    assert f"WARNING: FALLBACK ComfyUI in use: file://{fork} master @ {first[:12]} (configured: forward)" in text
    metrics = requests.get(f"{m.monitor_url}/metrics", timeout=5).text
    assert f'comfy_commit="{first}"' in metrics
    assert 'comfy_ref="master"' in metrics
    assert "orchestrator_comfy_fallback 1.0" in metrics

    # COMFY_UPDATE=always fetches on every boot.
    m.run("up", check=True, COMFY_UPDATE="always")
    assert m.status()["comfy"]["commit"] == newer
