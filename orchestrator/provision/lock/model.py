"""The lock as a value: render, parse (one ConfigError naming each bad field), hash, diff. Pure."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.core.errors import ConfigError

LOCK_NAME = "orchestrator.lock"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class Lock:
    comfy: Mapping[str, str]  # url (credentials stripped), commit
    nodes: Mapping[str, Mapping[str, str]]  # folder name -> url, commit
    packages: Mapping[str, str]  # canonical distribution name -> version (the resolved set)
    protected: Mapping[str, str]  # the firewall's protected packages, as installed
    models: Mapping[str, Mapping[str, Any]]  # path under ROOT -> sha256, size

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "comfy": dict(self.comfy),
            "nodes": {k: dict(v) for k, v in sorted(self.nodes.items())},
            "packages": dict(sorted(self.packages.items())),
            "protected": dict(sorted(self.protected.items())),
            "models": {k: dict(v) for k, v in sorted(self.models.items())},
        }

    def render(self) -> str:
        """Indented, sorted JSON: a change is one line in a diff."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def digest(self) -> str:
        """The lock's hash (sha256 of its rendering, 16 hex digits): the same on equal machines."""
        return hashlib.sha256(self.render().encode()).hexdigest()[:16]


def _strings(data: Any, where: str, problems: list[str]) -> dict[str, str]:
    if not isinstance(data, dict):
        problems.append(f"{where}: expected an object")
        return {}
    out: dict[str, str] = {}
    for k, v in data.items():
        if isinstance(v, str):
            out[str(k)] = v
        else:
            problems.append(f"{where}.{k}: expected a string")
    return out


def parse_lock(text: str, path: Path) -> Lock:
    """Read a lock file's text.

    Raises:
        ConfigError: not JSON, another version, or a field of the wrong shape (each one named).
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"{path}: not a lock file (invalid JSON: {exc}); write one with `orchestrator lock`"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a lock file (expected a JSON object); write one with `orchestrator lock`")
    problems: list[str] = []
    if data.get("version") != VERSION:
        problems.append(f"version: {data.get('version')!r} is not {VERSION}")
    comfy = _strings(data.get("comfy"), "comfy", problems)
    if comfy and not comfy.get("commit"):
        problems.append("comfy.commit: missing")
    nodes: dict[str, dict[str, str]] = {}
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, dict):
        problems.append("nodes: expected an object")
    else:
        for name, node in raw_nodes.items():
            entry = _strings(node, f"nodes.{name}", problems)
            if entry and not entry.get("commit"):
                problems.append(f"nodes.{name}.commit: missing")
            nodes[str(name)] = entry
    packages = _strings(data.get("packages"), "packages", problems)
    protected = _strings(data.get("protected"), "protected", problems)
    models: dict[str, dict[str, Any]] = {}
    raw_models = data.get("models", {})
    if not isinstance(raw_models, dict):
        problems.append("models: expected an object")
    else:
        for name, model in raw_models.items():
            if not isinstance(model, dict) or not isinstance(model.get("size"), int):
                problems.append(f"models.{name}: expected {{sha256, size}}")
            else:
                models[str(name)] = {"sha256": model.get("sha256"), "size": model["size"]}
    if problems:
        raise ConfigError(f"{path}: invalid lock file: " + "; ".join(problems))
    return Lock(comfy, nodes, packages, protected, models)


def load_lock(path: Path) -> Lock:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the lock file {path}: {exc.strerror or exc} (LOCKFILE / up --locked FILE; "
            "write one with `orchestrator lock`)"
        ) from None
    return parse_lock(text, path)


@dataclasses.dataclass(frozen=True)
class Difference:
    kind: str  # comfy | node | package | protected | model
    name: str
    locked: str | None  # None: not in the lock
    actual: str | None  # None: not on this machine

    @property
    def line(self) -> str:
        locked = self.locked if self.locked is not None else "absent"
        actual = self.actual if self.actual is not None else "absent"
        return f"{self.kind} {self.name}: {locked} in the lock, {actual} here"

    def to_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "name": self.name, "locked": self.locked, "actual": self.actual}


def _compare(kind: str, locked: Mapping[str, str], actual: Mapping[str, str]) -> list[Difference]:
    return [
        Difference(kind, name, locked.get(name), actual.get(name))
        for name in sorted(set(locked) | set(actual))
        if locked.get(name) != actual.get(name)
    ]


def diff(locked: Lock, actual: Lock) -> list[Difference]:
    """Every difference between the lock and this machine, in a stable order."""
    out = _compare("comfy", {"commit": locked.comfy.get("commit", "")}, {"commit": actual.comfy.get("commit", "")})
    out += _compare("node", {k: v.get("commit", "") for k, v in locked.nodes.items()},
                    {k: v.get("commit", "") for k, v in actual.nodes.items()})
    out += _compare("node-url", {k: v.get("url", "") for k, v in locked.nodes.items() if k in actual.nodes},
                    {k: v.get("url", "") for k, v in actual.nodes.items() if k in locked.nodes})
    out += _compare("package", locked.packages, actual.packages)
    out += _compare("protected", locked.protected, actual.protected)
    out += _compare(
        "model",
        {k: f"sha256:{v.get('sha256')} size:{v.get('size')}" for k, v in locked.models.items()},
        {k: f"sha256:{v.get('sha256')} size:{v.get('size')}" for k, v in actual.models.items()},
    )
    return out
