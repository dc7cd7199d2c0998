"""Shared fixtures: temp roots, free ports, local git repositories."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.machine.ports import free_port_block


@pytest.fixture
def port_base() -> int:
    return free_port_block(8)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "init.defaultBranch=main",
         "-c", "protocol.file.allow=always", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def make_repo(path: Path, files: dict[str, str], branch: str = "main") -> str:
    """Create a git repo with ``files`` committed on ``branch``; returns the commit sha."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", branch)
    for rel, text in files.items():
        f = path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "init")
    return git(path, "rev-parse", "HEAD")


def commit_file(path: Path, rel: str, text: str, message: str = "change") -> str:
    f = path / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message)
    return git(path, "rev-parse", "HEAD")


# ---------------------------------------------------------------- a machine under test
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

# Variables a developer's shell might set that would change what a test machine does.
_SCRUB = {"MOCK_GPU", "NUM_GPUS", "TEST_GPUS", "GPUS", "ROOT", "COMFY_ARGS", "COMFY_FLAGS", "ORCHESTRATOR_TOKEN",
          "ORCHESTRATOR_CONFIG", "SHARED_REPO_URL", "WORKER_BASE_COMFYUI_PORT", "ORCHESTRATOR_PORT"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("SIM_")}
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def wait_for(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy and return that; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def answers(port: int, path: str = "/system_stats", timeout: float = 1.0) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclasses.dataclass
class Machine:
    root: Path
    env: dict[str, str]
    port_base: int
    monitor_port: int
    num_gpus: int

    @property
    def layout(self):  # type: ignore[no-untyped-def]
        from orchestrator.core.layout import Layout

        return Layout(self.root)

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def ports(self) -> list[int]:
        return [self.port_base + i for i in range(self.num_gpus)]

    def run(self, *args: str, check: bool = False, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            env={**self.env, **env}, capture_output=True, text=True, timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"orchestrator {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def up(self, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run("up", "--skip-provision", *extra, check=True, **env)

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.run("down", timeout=180)

    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.run("status", "--json", check=True).stdout)

    def wait_all_answer(self, timeout: float = 60) -> bool:
        return wait_until(lambda: all(answers(p) for p in self.ports), timeout, 0.2)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Callable[..., Machine]]:
    """machine(num_gpus=2, **env) → a Machine whose ComfyUI is the simulator; always brought down."""
    made: list[Machine] = []

    def make(num_gpus: int = 2, **extra_env: str) -> Machine:
        from orchestrator.simulator.tree import write_code_tree

        root = tmp_path / f"m{len(made)}"
        root.mkdir()
        write_code_tree(root / "ComfyUI")
        base = free_port_block(num_gpus + 1)
        monitor_port = free_port_block(1)
        env = clean_env(
            ROOT=str(root), MOCK_GPU="1", NUM_GPUS=str(num_gpus), WORKER_BASE_COMFYUI_PORT=str(base),
            ORCHESTRATOR_PORT=str(monitor_port), SHARED_REPO_URL="", PROBE_INTERVAL="0.5", PROBE_TIMEOUT="1",
            STOP_TIMEOUT="5", OUTPUT_MAX_AGE="60m",
        )
        env.update(extra_env)
        m = Machine(root, env, base, monitor_port, num_gpus)
        made.append(m)
        return m

    yield make
    for m in made:
        m.down()


# ---------------------------------------------------------------- the real tier (tests/real, tests/conformance)
def pytest_configure(config: pytest.Config) -> None:
    # `-n 2` distributes test by test; real-ComfyUI tests carry xdist_group so that they all run on
    # one worker, one machine at a time (each real instance is ~0.8 GB and a core while starting).
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    """One visible line when the real tier skipped (never silently), whatever -r says."""
    reasons: dict[str, int] = {}
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(rep, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else ""
        if "real tier:" in reason:
            reason = reason[reason.index("real tier:"):]
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"SKIPPED {count} real-ComfyUI tests: {reason}", yellow=True)
