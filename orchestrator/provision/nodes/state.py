"""``$ROOT/.orchestrator/nodes_state.json``: what was applied to each node folder, and the markers
(requirements, .env template, custom_script) that tell whether a step must run again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.core.layout import Layout
from orchestrator.machine.fs import read_json, write_json
from orchestrator.provision.nodes.config import NodeSpec, name_problem

STATE_FILE = "nodes_state.json"


@dataclasses.dataclass(frozen=True)
class NodeRecord:
    """What was applied to one node folder. A ``None`` marker means "pending": redo it."""

    url: str
    branch: str | None
    commit: str | None
    recursive: bool
    resolved: str  # commit checked out
    requirements: str | None  # marker of the requirements that were installed
    env: str | None  # hash of the env template written to .env
    script: str | None  # hash of the custom_script that ran successfully
    updated: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeRecord | None:
        try:
            return cls(
                url=str(data["url"]),
                branch=data.get("branch"),
                commit=data.get("commit"),
                recursive=bool(data.get("recursive", False)),
                resolved=str(data.get("resolved", "")),
                requirements=data.get("requirements"),
                env=data.get("env"),
                script=data.get("script"),
                updated=float(data.get("updated", 0.0)),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_state(layout: Layout) -> dict[str, NodeRecord]:
    data = read_json(layout.state_dir / STATE_FILE, {})
    nodes = data.get("nodes") if isinstance(data, dict) else None
    out: dict[str, NodeRecord] = {}
    for name, raw in (nodes or {}).items():
        record = NodeRecord.from_dict(raw) if isinstance(raw, dict) else None
        if record is not None and name_problem(name) is None:
            out[name] = record
    return out


def save_state(layout: Layout, records: Mapping[str, NodeRecord]) -> None:
    write_json(
        layout.state_dir / STATE_FILE, {"version": 1, "nodes": {k: v.to_dict() for k, v in records.items()}}
    )


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def requirements_marker(spec: NodeSpec, node_dir: Path) -> str:
    """``off`` (requirements false), ``absent`` (no requirements.txt) or the file's hash."""
    if not spec.requirements:
        return "off"
    try:
        return "sha256:" + hashlib.sha256((node_dir / "requirements.txt").read_bytes()).hexdigest()
    except OSError:
        return "absent"


def env_marker(spec: NodeSpec) -> str:
    return _digest(json.dumps(spec.env)) if spec.env else "none"


def script_marker(spec: NodeSpec) -> str:
    return _digest(spec.custom_script) if spec.custom_script else "none"
