"""The generation of an instance: a fingerprint of everything a ComfyUI process sees at its start.

A running instance keeps what it loaded when it started (its code, custom nodes, installed
packages, model paths, flags, environment); changing any of these on disk changes nothing until
the process restarts. ``up`` gathers these inputs (``lifecycle.generation``), and this module turns
them into one short id (:func:`fingerprint`) and says what changed between two of them
(:func:`differences`). Pure: the inputs come in as values, secret values only as digests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

ID_LENGTH = 12  # hex characters of a generation id
ENV_VAR = "ORCHESTRATOR_GENERATION"  # in each instance's environment: the generation it started with


def digest(value: object) -> str:
    """A stable short hash of a JSON-able value (or of text/bytes)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    else:
        data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class GenerationInputs:
    """What an instance sees at its start, as values and digests (never a secret's value).

    ``nodes``: custom node name -> digest of its commit (or files), ``.env`` and requirements.
    ``requirements``: digest of the installed distributions (name==version) of the instances' Python.
    ``model_paths``: digest of extra_model_paths.yaml; ``static_links``: digest of the static links file.
    ``argv``: the flags every instance gets beyond its own port and folders (COMFY_ARGS, python, --cpu).
    ``env``: variable name -> digest of its value (the instance environment beyond its GPU pinning).
    """

    comfy_commit: str
    nodes: Mapping[str, str]
    requirements: str
    model_paths: str
    static_links: str
    argv: tuple[str, ...]
    env: Mapping[str, str]

    def components(self) -> dict[str, Any]:
        """The JSON record kept in the state file; :func:`differences` compares two of them."""
        return {
            "comfy_commit": self.comfy_commit,
            "nodes": dict(sorted(self.nodes.items())),
            "requirements": self.requirements,
            "model_paths": self.model_paths,
            "static_links": self.static_links,
            "argv": list(self.argv),
            "env": dict(sorted(self.env.items())),
        }


def fingerprint(inputs: GenerationInputs) -> str:
    """The generation id: :data:`ID_LENGTH` hex characters over every input."""
    return hashlib.sha256(json.dumps(inputs.components(), sort_keys=True).encode()).hexdigest()[:ID_LENGTH]


def _keyed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    return ", ".join([*(f"+{k}" for k in added), *(f"-{k}" for k in removed), *(f"~{k}" for k in changed)])


def differences(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What changed between two :meth:`GenerationInputs.components` records, one phrase each.

    ``old`` None (no record): one phrase saying so. Secret values never appear (only names).
    """
    if not old:
        return ["no earlier generation recorded"]
    out: list[str] = []
    if old.get("comfy_commit") != new.get("comfy_commit"):
        was, now = (str(c.get("comfy_commit") or "?")[:12] for c in (old, new))
        out.append(f"ComfyUI commit {was} -> {now}")
    nodes = _keyed(old.get("nodes") or {}, new.get("nodes") or {})
    if nodes:
        out.append(f"custom nodes {nodes}")
    for key, label in (
        ("requirements", "installed packages"),
        ("model_paths", "extra_model_paths"),
        ("static_links", "static model links"),
    ):
        if old.get(key) != new.get(key):
            out.append(f"{label} changed")
    if old.get("argv") != new.get("argv"):
        before, after = list(old.get("argv") or []), list(new.get("argv") or [])
        gone = [a for a in before if a not in after]
        added = [a for a in after if a not in before]
        out.append("flags " + (" ".join([*(f"+{a}" for a in added), *(f"-{a}" for a in gone)]) or "reordered"))
    env = _keyed(old.get("env") or {}, new.get("env") or {})
    if env:
        out.append(f"environment {env}")
    return out
