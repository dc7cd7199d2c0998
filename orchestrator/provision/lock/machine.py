"""Read a machine into a :class:`Lock`: file reads and one child interpreter (COMFY_PYTHON)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.core.errors import ProvisionError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine.fs import read_json, write_json
from orchestrator.provision.git.urls import redact_url
from orchestrator.provision.git.worktree import origin_url, read_head
from orchestrator.provision.lock.model import Lock
from orchestrator.provision.nodes import firewall
from orchestrator.provision.nodes.deps import FREEZE_QUERY, CommandRunner, run_command

log = logging.getLogger(__name__)

RECORD_FILE = "installed.lock"  # what `up` installed on an unlocked machine (same format)
# Tools of the interpreter itself, not of what runs in it: never a difference.
IGNORED = frozenset({"pip", "setuptools", "wheel", "uv"})


def installed_packages(
    python: str, runner: CommandRunner = run_command, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Every distribution the interpreter sees, canonical name -> version.

    Raises:
        ProvisionError: the interpreter cannot be run or answers nonsense.
    """
    env = dict(os.environ if environ is None else environ)
    result = runner([python, "-c", FREEZE_QUERY], cwd=None, env=env, timeout=120.0)
    try:
        data = json.loads(result.output.strip().splitlines()[-1]) if result.ok else None
    except (ValueError, IndexError):
        data = None
    if not isinstance(data, dict):
        raise ProvisionError(f"cannot list the packages of COMFY_PYTHON={python}: {result.tail(1)}")
    return {str(k): str(v) for k, v in data.items() if str(k) not in IGNORED}


def _models(layout: Layout) -> dict[str, dict[str, Any]]:
    """The verified model files (models_verified.json) that are still there: path under ROOT."""
    records = read_json(layout.state_dir / "models_verified.json", {})
    out: dict[str, dict[str, Any]] = {}
    for rec in (records or {}).values() if isinstance(records, dict) else ():
        if not isinstance(rec, dict) or not rec.get("sha256"):
            continue
        path = Path(str(rec.get("path", "")))
        try:
            size = path.stat().st_size
            rel = str(path.relative_to(layout.root))
        except (OSError, ValueError):
            continue
        if size == rec.get("size"):
            out[rel] = {"sha256": str(rec["sha256"]), "size": size}
    return out


def read_machine(
    settings: Settings,
    layout: Layout,
    runner: CommandRunner = run_command,
    environ: Mapping[str, str] | None = None,
) -> Lock:
    """What this ROOT runs now, as a lock."""
    comfy = layout.comfy_dir
    nodes: dict[str, dict[str, str]] = {}
    try:
        entries = sorted(p for p in layout.custom_nodes_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        entries = []
    for path in entries:
        head = read_head(path)
        if head is not None:
            nodes[path.name] = {"url": redact_url(origin_url(path) or ""), "commit": head}
    packages = installed_packages(settings.python, runner, environ)
    protected = {n: v for n, v in packages.items() if n in firewall.PROTECTED}
    return Lock(
        comfy={"url": redact_url(origin_url(comfy) or ""), "commit": read_head(comfy) or ""},
        nodes=nodes,
        packages=packages,
        protected=protected,
        models=_models(layout),
    )


def record_installed(settings: Settings, layout: Layout) -> str | None:
    """``up`` on an unlocked machine: write what it installed to ``.orchestrator/installed.lock``
    (compare two machines with ``orchestrator drift --lock A/.orchestrator/installed.lock``).
    Returns the lock's hash; None (logged) when the interpreter cannot be read."""
    try:
        lock = read_machine(settings, layout)
    except ProvisionError as exc:
        log.warning("not recording what was installed: %s", exc)
        return None
    write_json(layout.state_dir / RECORD_FILE, lock.to_dict())
    return lock.digest
