"""``config_nodes.json``: schema (jsonschema), normalisation and safety checks -> :class:`NodesConfig`.

Pure apart from reading the file: a bad config raises one ConfigError naming each JSON path,
before anything on disk is touched.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema

from orchestrator.core.configfile import join_problems, load_json, read_config
from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.provision.git.urls import commit_problem, redact_url, ref_problem, url_problem
from orchestrator.provision.repos.shipped import shipped_shared_dir

KNOWN_FIELDS = frozenset(
    {"name", "url", "branch", "commit", "recursive", "requirements", "env", "custom_script", "install_order"}
)


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One normalised, validated entry of config_nodes.json."""

    name: str
    url: str
    branch: str | None = None
    commit: str | None = None
    recursive: bool = False
    requirements: bool = False
    env: tuple[tuple[str, str], ...] = ()
    custom_script: str | None = None
    install_order: int | None = None
    index: int = 0  # position in the file, for messages

    @property
    def order_key(self) -> tuple[bool, int, str]:
        """install_order ascending; entries without one after, by name."""
        return (self.install_order is None, self.install_order or 0, self.name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "url": redact_url(self.url)}
        for key in ("branch", "commit", "custom_script", "install_order"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["recursive"] = self.recursive
        out["requirements"] = self.requirements
        if self.env:
            out["env"] = sorted(k for k, _ in self.env)  # names only: values may be secrets
        return out


@dataclasses.dataclass(frozen=True)
class NodesConfig:
    path: Path
    nodes: tuple[NodeSpec, ...]  # in install order
    warnings: tuple[str, ...] = ()


def load_schema() -> dict[str, Any]:
    text = importlib.resources.files("orchestrator.schemas").joinpath("config_nodes.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def json_path(parts: Sequence[str | int]) -> str:
    """``["custom_nodes", 3, "url"]`` → ``custom_nodes[3].url``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_GIT_CLONE = re.compile(r"^\s*git\s+clone\s+", re.I)


def normalise_url(raw: str) -> str:
    """Trim whitespace and a leading ``git clone `` (five production entries have one)."""
    return _GIT_CLONE.sub("", raw.strip()).strip()


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a safe custom_nodes folder name, or None."""
    if not name:
        return "is empty"
    if "/" in name or "\\" in name or name in {".", ".."}:
        return "must be a single folder name (no '/', '..' or absolute path)"
    if name.startswith((".", "-")):
        return "must not start with '.' or '-'"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "must not contain control characters"
    if name == "__pycache__":
        return "is reserved"
    return None


def _short(value: str, limit: int = 160) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_config(data: Any) -> tuple[list[NodeSpec], list[str], list[str]]:
    """Validate a parsed config: (specs in install order, errors, warnings). Pure."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors: list[str] = []
    bad_entries: set[int] = set()
    for err in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(err.absolute_path)
        if len(path) >= 2 and path[0] == "custom_nodes" and isinstance(path[1], int):
            bad_entries.add(path[1])
        errors.append(f"{json_path(path)}: {_short(err.message)}")
    if not isinstance(data, dict) or not isinstance(data.get("custom_nodes"), list):
        return [], errors, []
    warnings = [f"{key}: unknown top-level field ignored" for key in data if key != "custom_nodes"]
    specs: list[NodeSpec] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(data["custom_nodes"]):
        if i in bad_entries or not isinstance(entry, dict):
            continue
        where = f"custom_nodes[{i}]"
        name = str(entry["name"]).strip()
        label = f"{where} ({name!r})"
        for key in sorted(set(entry) - KNOWN_FIELDS):
            warnings.append(f"{label}: unknown field {key!r} ignored")
        problems: list[str] = []
        if problem := name_problem(name):
            problems.append(f"{where}.name: {name!r} {problem}")
        elif name.casefold() in seen:
            problems.append(f"{where}.name: {name!r} duplicates custom_nodes[{seen[name.casefold()]}]")
        else:
            seen[name.casefold()] = i
        url = normalise_url(str(entry["url"]))
        if problem := url_problem(url):
            problems.append(f"{label}.url: {_short(redact_url(url))!r} {problem}")
        branch = (entry.get("branch") or "").strip() or None
        if branch is not None and (problem := ref_problem(branch)):
            problems.append(f"{label}.branch: {_short(branch)!r} {problem}")
        commit = (entry.get("commit") or "").strip() or None
        if commit is not None and (problem := commit_problem(commit)):
            problems.append(f"{label}.commit: {_short(commit)!r} {problem}")
        env = tuple((str(k), _env_value(v)) for k, v in (entry.get("env") or {}).items())
        for key, value in env:
            if "\0" in value:
                problems.append(f"{label}.env.{key}: must not contain NUL characters")
        script = entry.get("custom_script")
        script = script if isinstance(script, str) and script.strip() else None
        if script is not None and "\0" in script:
            problems.append(f"{label}.custom_script: must not contain NUL characters")
        if problems:
            errors.extend(problems)
            continue
        specs.append(
            NodeSpec(
                name=name,
                url=url,
                branch=branch,
                commit=commit.lower() if commit else None,
                recursive=bool(entry.get("recursive", False)),
                requirements=bool(entry.get("requirements", False)),
                env=env,
                custom_script=script,
                install_order=entry.get("install_order"),
                index=i,
            )
        )
    specs.sort(key=lambda s: s.order_key)
    return specs, errors, warnings


def parse_config_text(text: str, path: Path) -> NodesConfig:
    """Parse and validate; raise one ConfigError listing every problem with its JSON path."""
    data = load_json(text, name=str(path))
    specs, errors, warnings = check_config(data)
    if errors:
        count = f"{len(errors)} problems" if len(errors) > 1 else "1 problem"
        raise ConfigError(f"{path}: {count}: " + join_problems(errors))
    return NodesConfig(path=path, nodes=tuple(specs), warnings=tuple(warnings))


def load_config(path: Path) -> NodesConfig:
    """Read and validate a config_nodes.json (no network, nothing written).

    Raises:
        ConfigError: unreadable, not JSON, or invalid; the message names each JSON path.
    """
    try:
        text = read_config(path)
    except FileNotFoundError:
        raise ConfigError(f"cannot read {path}: no such file") from None
    return parse_config_text(text, path)


def default_config_file(settings: Settings, layout: Layout) -> Path:
    """config_nodes(_test).json from the shared repo, else the shipped default."""
    name = "config_nodes_test.json" if settings.storage_test_mode else "config_nodes.json"
    candidate = layout.shared_dir / name
    if candidate.exists():
        return candidate
    return shipped_shared_dir() / name
