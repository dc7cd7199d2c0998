"""``orchestrator lock`` and ``orchestrator drift``: write what this machine runs, compare with a lock."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orchestrator.cli.output import print_line
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine.fs import atomic_write, read_json
from orchestrator.provision.lock.locked import lock_path
from orchestrator.provision.lock.machine import read_machine
from orchestrator.provision.lock.model import diff, load_lock


def cmd_lock(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator lock [-o FILE] [--json]``: ComfyUI, nodes, packages, protected, models."""
    layout = Layout(settings.root)
    lock = read_machine(settings, layout)
    out: Path = args.output or lock_path(settings)
    atomic_write(out, lock.render())
    if args.json:
        print_line(json.dumps({"file": str(out), "hash": lock.digest, **lock.to_dict()}, indent=2))
    else:
        print_line(
            f"wrote {out} ({lock.digest}): ComfyUI {lock.comfy.get('commit', '')[:12]}, {len(lock.nodes)} nodes, "
            f"{len(lock.packages)} packages, {len(lock.models)} models"
        )
    return 0


def _default_lock(settings: Settings, layout: Layout) -> Path:
    """LOCKFILE, else the lock the last ``up --locked`` installed, else ./orchestrator.lock."""
    if settings.lockfile is not None:
        return settings.lockfile
    status = read_json(layout.status_file, {})
    used = ((status or {}).get("lock") or {}).get("file") if isinstance(status, dict) else None
    return Path(used) if isinstance(used, str) and used else lock_path(settings)


def cmd_drift(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator drift [--lock FILE] [--json]``: every difference; exit 1 when there is one."""
    layout = Layout(settings.root)
    path = args.lock or _default_lock(settings, layout)
    lock = load_lock(path)
    here = read_machine(settings, layout)
    differences = diff(lock, here)
    if args.json:
        print_line(json.dumps({
            "lock": str(path), "lock_hash": lock.digest, "machine_hash": here.digest,
            "differences": [d.to_dict() for d in differences],
        }, indent=2))
    elif differences:
        for d in differences:
            print_line(d.line)
        print_line(f"{len(differences)} difference(s) from {path} ({lock.digest}); this machine: {here.digest}")
    else:
        print_line(f"no drift: this machine matches {path} ({lock.digest})")
    return 1 if differences else 0
