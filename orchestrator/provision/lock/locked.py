"""``up --locked`` / LOCKFILE: install exactly what a lock names, or fail before any change.

    prepare(settings, layout)   before anything is cloned or installed: the lock parses, the
                                protected packages in COMFY_PYTHON are the lock's, and the
                                packages that differ resolve (``--dry-run``; uv ``--offline``
                                first, from its cache, then the index). Returns a LockedRun
                                whose settings pin ComfyUI to the lock's commit.
    LockedRun.node_config()     config_nodes.json with every node pinned to the lock's commit
                                (nodes not in the lock left out, nodes only in it added)
    LockedRun.install()         the lock's packages that differ, pinned (==), in one install,
                                then what still differs from the lock (the drift)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.core.errors import ConfigError, ProvisionError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine.fs import atomic_write, write_json
from orchestrator.provision.git.client import GitClient
from orchestrator.provision.git.urls import same_commit
from orchestrator.provision.git.worktree import origin_url, read_head
from orchestrator.provision.lock.machine import installed_packages, read_machine
from orchestrator.provision.lock.model import LOCK_NAME, Difference, Lock, diff, load_lock
from orchestrator.provision.nodes import firewall
from orchestrator.provision.nodes.config import default_config_file, load_config
from orchestrator.provision.nodes.deps import CommandRunner, find_installer, pip_command, run_command
from orchestrator.provision.repos.targets import git_client

log = logging.getLogger(__name__)


def lock_path(settings: Settings) -> Path:
    return settings.lockfile or Path(LOCK_NAME)


@dataclasses.dataclass(frozen=True)
class LockedRun:
    lock: Lock
    path: Path
    settings: Settings  # ComfyUI pinned to the lock's commit

    @property
    def pins(self) -> tuple[str, ...]:
        """``name==version`` of every locked package (constraints for the nodes' installs)."""
        return tuple(f"{n}=={v}" for n, v in sorted(self.lock.packages.items()))

    def node_config(self, layout: Layout, source: Path | None = None) -> Path:
        """The configured nodes (``source``, default: the shared repo's config), each pinned to
        the lock's commit, written under .orchestrator/."""
        config = load_config(source or default_config_file(self.settings, layout))
        entries: list[dict[str, Any]] = []
        for spec in config.nodes:
            locked = self.lock.nodes.get(spec.name)
            if locked is None:
                log.warning("node %s is configured but not in the lock %s: not installed", spec.name, self.path)
                continue
            entries.append(_entry(spec.to_dict(), spec.url, locked["commit"], dict(spec.env)))
        configured = {s.name for s in config.nodes}
        for name, locked in sorted(self.lock.nodes.items()):
            if name not in configured:
                entries.append({"name": name, "url": locked.get("url", ""), "commit": locked["commit"],
                                "requirements": True})
        path = layout.state_dir / "config_nodes.locked.json"
        atomic_write(path, json.dumps({"custom_nodes": entries}, indent=2) + "\n", mode=0o600)
        return path

    def pin_comfy(self, layout: Layout, git: GitClient | None = None) -> None:
        """Put $ROOT/ComfyUI at the lock's commit (the fork follows a branch: pinned here)."""
        commit = self.lock.comfy.get("commit", "")
        path = layout.comfy_dir
        head = read_head(path)
        if not commit or head is None or same_commit(head, commit):
            return
        git = git or git_client(self.settings, layout)
        timeout = self.settings.git_timeout
        git.ensure_commit(path, origin_url(path) or self.settings.comfy_repo_url, commit, timeout=timeout)
        git.cmd(path).checkout("-q", "-f", "--detach", commit, kill_after_timeout=timeout)
        log.info("lock: ComfyUI pinned to %s", commit[:12])

    def install(self, layout: Layout, runner: CommandRunner = run_command) -> list[Difference]:
        """Install the locked packages that differ, then return every remaining difference."""
        env = _env()
        wanted = _differing(self.lock, installed_packages(self.settings.python, runner, env))
        if wanted:
            req = _write_pins(layout, wanted)
            installer = find_installer(self.settings.nodes_installer, env, Path(sys.executable).parent)
            argv = pip_command(self.settings.python, [req], None, installer.path, env)
            result = runner(argv, cwd=None, env=env, timeout=self.settings.pip_timeout)
            if not result.ok:
                raise ProvisionError(f"{self.path}: installing the locked packages failed: {result.tail(2)}")
            log.info("lock: installed %d locked package(s) with %s", len(wanted), installer.kind)
        differences = diff(self.lock, read_machine(self.settings, layout, runner, env))
        for d in differences:
            log.warning("lock: %s", d.line)
        write_json(layout.state_dir / "lock_drift.json", [d.to_dict() for d in differences])
        return differences


def _entry(spec: dict[str, Any], url: str, commit: str, env: Mapping[str, str]) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k not in {"branch", "commit", "env"}}
    out.update({"url": url, "commit": commit})
    if env:
        out["env"] = env
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _differing(lock: Lock, current: Mapping[str, str]) -> list[str]:
    return [
        f"{n}=={v}" for n, v in sorted(lock.packages.items())
        if current.get(n) != v and not (n in firewall.PROTECTED and n in current)
    ]


def _write_pins(layout: Layout, pins: list[str]) -> Path:
    path = layout.state_dir / "locked-requirements.txt"
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(f"{p}\n" for p in pins))
    return path


def prepare(settings: Settings, layout: Layout, runner: CommandRunner = run_command) -> LockedRun:
    """Everything that can fail before a change (see the module doc).

    Raises:
        ConfigError: the lock file is missing or invalid.
        ProvisionError: a protected package differs, or the locked packages cannot be resolved.
    """
    path = lock_path(settings)
    lock = load_lock(path)
    env = _env()
    current = installed_packages(settings.python, runner, env)
    for name, version in sorted(lock.protected.items()):
        if current.get(name) not in (None, version):  # absent: installed from the lock like the rest
            raise ProvisionError(
                f"{path}: {name} {version} is locked but {current[name]} is installed in "
                f"COMFY_PYTHON={settings.python}; a lock never replaces a protected package (nothing changed)"
            )
    wanted = _differing(lock, current)
    if wanted:
        req = _write_pins(layout, wanted)
        installer = find_installer(settings.nodes_installer, env, Path(sys.executable).parent)
        argv = [*pip_command(settings.python, [req], None, installer.path, env), "--dry-run"]
        tries = [[*argv, "--offline"], argv] if installer.kind == "uv" else [argv]
        result = None
        for attempt in tries:
            result = runner(attempt, cwd=None, env=env, timeout=settings.pip_timeout)
            if result.ok:
                break
        if result is None or not result.ok:
            why = result.tail(2) if result else "no installer"
            raise ProvisionError(f"{path}: the locked packages cannot be installed (nothing changed): {why}")
    commit = lock.comfy.get("commit", "")
    if not commit:
        raise ConfigError(f"{path}: comfy.commit is empty")
    pinned = dataclasses.replace(
        settings, comfy_commit=commit, sources={**settings.sources, "COMFY_BRANCH": "default"}
    )
    log.info("lock: %s (%s): %d nodes, %d packages", path, lock.digest, len(lock.nodes), len(lock.packages))
    return LockedRun(lock, path, pinned)
