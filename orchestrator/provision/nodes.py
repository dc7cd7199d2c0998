"""Custom nodes from ``config_nodes.json``: validate, diff against recorded state, apply.

    load_config(path)            schema (jsonschema) + normalisation + safety → NodesConfig;
                                 ConfigError names the JSON path, nothing touched on disk
    observe(dir, specs, state)   what is on disk: file reads only, no git subprocess
    plan_actions(...)            pure: install | update | unchanged | remove for each node
    sync_nodes(...)              git in parallel (bounded pool, per-node timeout) → ONE pip
                                 install for every changed requirements.txt (torch stack pinned
                                 by a constraints file) → .env files → custom_script → NodesReport

State (``$ROOT/.orchestrator/nodes_state.json``): per node the URL, branch, commit, resolved
commit and hashes of the requirements, env template and script that were applied. It is
written atomically after each step that succeeds, so a run killed at any point leaves a state
that the next run repairs; a failed step is not recorded and is therefore retried next time.
A warm run with nothing changed starts no git, no pip and no script.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.resources
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jsonschema

from orchestrator.core.configfile import join_problems, load_json, read_config
from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine import lock as oplock
from orchestrator.machine import runner as subproc
from orchestrator.machine.fs import atomic_write, read_json, write_json
from orchestrator.provision.git import (
    GitClient,
    GitError,
    commit_problem,
    current_branch,
    origin_url,
    partial_name,
    read_head,
    redact_url,
    ref_problem,
    remote_default_branch,
    remove_partials,
    same_commit,
    same_url,
    staging,
    url_problem,
)
from orchestrator.provision.repos import git_client, resolve_shared, shipped_shared_dir

log = logging.getLogger(__name__)

STATE_FILE = "nodes_state.json"
REPORT_FILE = "nodes_report.json"
KNOWN_FIELDS = frozenset(
    {"name", "url", "branch", "commit", "recursive", "requirements", "env", "custom_script", "install_order"}
)
PROTECTED = ("torch", "torchvision", "torchaudio", "xformers")
STATE_NAMES = ("installed", "updated", "unchanged", "removed", "failed")
_ACTION_STATE = {"install": "installed", "update": "updated", "unchanged": "unchanged", "remove": "removed"}
_GIT_REASONS = frozenset(
    {"new", "missing", "broken", "existing folder", "url", "branch", "commit", "drift", "recursive"}
)


# ---------------------------------------------------------------- config: types
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


# ---------------------------------------------------------------- config: validation (pure)
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


# ---------------------------------------------------------------- state
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


# ---------------------------------------------------------------- diff (pure)
@dataclasses.dataclass(frozen=True)
class Observed:
    """One node folder as found on disk."""

    exists: bool
    head: str | None  # None: missing, not a repository, or no valid HEAD
    requirements: str  # requirements_marker of the folder as it is


@dataclasses.dataclass(frozen=True)
class Planned:
    name: str
    action: str  # install | update | unchanged | remove
    reasons: tuple[str, ...] = ()
    spec: NodeSpec | None = None
    managed: bool = True  # remove: installed by us (False: an unknown folder, --prune)

    @property
    def needs_git(self) -> bool:
        return bool(_GIT_REASONS.intersection(self.reasons))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "reasons": list(self.reasons),
            "url": redact_url(self.spec.url) if self.spec else None,
        }


def observe(
    custom_dir: Path, specs: Sequence[NodeSpec], state: Mapping[str, NodeRecord]
) -> tuple[dict[str, Observed], tuple[str, ...]]:
    """Look at every configured folder (file reads only) and list unknown folders."""
    observed: dict[str, Observed] = {}
    for spec in specs:
        node_dir = custom_dir / spec.name
        observed[spec.name] = Observed(
            exists=node_dir.exists(),
            head=read_head(node_dir),
            requirements=requirements_marker(spec, node_dir),
        )
    known = {s.name for s in specs} | set(state)
    try:
        entries = sorted(custom_dir.iterdir())
    except OSError:
        entries = []
    unknown = tuple(
        e.name
        for e in entries
        if e.is_dir()
        and not e.is_symlink()
        and e.name not in known
        and not e.name.startswith(".")
        and e.name != "__pycache__"
    )
    return observed, unknown


def plan_actions(
    specs: Sequence[NodeSpec],
    state: Mapping[str, NodeRecord],
    observed: Mapping[str, Observed],
    unknown: Sequence[str] = (),
    *,
    prune: bool = False,
) -> tuple[Planned, ...]:
    """Decide what to do with every node. Pure: same inputs, same plan."""
    plan: list[Planned] = []
    for spec in specs:
        rec = state.get(spec.name)
        obs = observed.get(spec.name) or Observed(
            False, None, requirements_marker(spec, Path("/nonexistent"))
        )
        if obs.head is None:
            why = ("broken",) if obs.exists else (("missing",) if rec else ("new",))
            plan.append(Planned(spec.name, "install", why, spec))
            continue
        if rec is None:
            plan.append(Planned(spec.name, "install", ("existing folder",), spec))
            continue
        reasons: list[str] = []
        if not same_url(rec.url, spec.url):
            reasons.append("url")
        if rec.branch != spec.branch:
            reasons.append("branch")
        if rec.commit != spec.commit:
            reasons.append("commit")
        elif spec.commit and not same_commit(obs.head, spec.commit):
            reasons.append("drift")
        if spec.recursive and not rec.recursive:
            reasons.append("recursive")
        if rec.requirements != obs.requirements:
            reasons.append("requirements")
        if rec.env != env_marker(spec):
            reasons.append("env")
        if rec.script != script_marker(spec):
            reasons.append("script")
        plan.append(Planned(spec.name, "update" if reasons else "unchanged", tuple(reasons), spec))
    configured = {s.name for s in specs}
    for name in sorted(set(state) - configured):
        plan.append(Planned(name, "remove", ("not in config",)))
    if prune:
        for name in unknown:
            plan.append(
                Planned(name, "remove", ("not installed by the orchestrator (--prune)",), managed=False)
            )
    return tuple(plan)


# ---------------------------------------------------------------- .env (pure)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PLAIN = re.compile(r"^[A-Za-z0-9_./:,@+%=-]*$")


def substitute(template: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand ``${VAR}`` and ``${VAR:-default}`` without a shell; return (value, unset names)."""
    unset: list[str] = []

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if default is not None:
            return value if value else default
        if value is None:
            unset.append(name)
            return ""
        return value

    return _VAR.sub(repl, template), unset


def dotenv_line(key: str, value: str) -> str:
    """A python-dotenv line; anything but plain characters is single-quoted (no interpolation)."""
    if _PLAIN.match(value):
        return f"{key}={value}"
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{escaped}'"


def render_env(env: Sequence[tuple[str, str]], environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """The .env text for a node and the variables that were unset."""
    lines = ["# Written by orchestrator from config_nodes.json; edits are overwritten."]
    unset: list[str] = []
    for key, template in env:
        value, missing = substitute(template, environ)
        unset += missing
        lines.append(dotenv_line(key, value))
    return "\n".join(lines) + "\n", unset


# ---------------------------------------------------------------- commands (pip, scripts)
@dataclasses.dataclass(frozen=True)
class CmdResult:
    returncode: int
    output: str
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def tail(self, lines: int = 3) -> str:
        kept = [ln.strip() for ln in self.output.strip().splitlines() if ln.strip()]
        return " | ".join(kept[-lines:]) or f"exit status {self.returncode}"


class CommandRunner(Protocol):
    def __call__(
        self, argv: Sequence[str], *, cwd: Path | None, env: Mapping[str, str], timeout: float
    ) -> CmdResult: ...


def run_command(
    argv: Sequence[str], *, cwd: Path | None, env: Mapping[str, str], timeout: float
) -> CmdResult:
    """Run a command in its own session; on timeout its whole tree is killed.

    Output is collected through a temporary file, so a background helper the command leaves
    behind (``sleep 300 &``) cannot hold us past the command's own exit; the command dies with
    this process (PR_SET_PDEATHSIG) so a killed ``up`` leaves no pip running (see subproc).
    """
    start = time.monotonic()
    try:
        done = subproc.run(argv, cwd=cwd, env=env, timeout=timeout)
    except OSError as exc:
        return CmdResult(
            127, f"cannot run {argv[0]}: {exc.strerror or exc}", seconds=time.monotonic() - start
        )
    text = done.stdout.decode(errors="replace")
    return CmdResult(done.returncode, text, done.timed_out, done.seconds)


_TORCH_QUERY = (
    "import importlib.metadata as m, json\n"
    "out = {}\n"
    f"for n in {PROTECTED!r}:\n"
    "    try:\n"
    "        out[n] = m.version(n)\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "print(json.dumps(out))\n"
)


def constraints_text(versions: Mapping[str, str]) -> str:
    """Pins for the installed torch stack, so no node can replace the GPU build."""
    lines = ["# Written by orchestrator: the installed torch stack, pinned for custom-node installs."]
    lines += [f"{name}=={versions[name]}" for name in PROTECTED if name in versions]
    return "\n".join(lines) + "\n"


def pip_command(
    python: str, requirement_files: Sequence[Path], constraints: Path | None, uv: str | None
) -> list[str]:
    """One install for many requirements files (``uv pip`` when available)."""
    if uv:
        argv = [uv, "pip", "install", "--python", python]
    else:
        argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    for req in requirement_files:
        argv += ["-r", str(req)]
    if constraints is not None:
        argv += ["-c", str(constraints)]
    return argv


# ---------------------------------------------------------------- report
@dataclasses.dataclass(frozen=True)
class NodeResult:
    name: str
    action: str  # install | update | unchanged | remove
    status: str  # ok | failed | skipped (dry run)
    error: str = ""
    commit: str = ""
    seconds: float = 0.0
    reasons: tuple[str, ...] = ()
    url: str = ""  # credentials stripped

    @property
    def state(self) -> str:
        """installed | updated | unchanged | removed | failed."""
        return "failed" if self.status == "failed" else _ACTION_STATE[self.action]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "status": self.status,
            "state": self.state,
            "error": self.error,
            "commit": self.commit,
            "seconds": round(self.seconds, 3),
            "reasons": list(self.reasons),
            "url": self.url,
        }


@dataclasses.dataclass(frozen=True)
class NodesReport:
    """Per-node results of one sync (in a dry run: the plan, every status "skipped")."""

    config_file: Path
    results: tuple[NodeResult, ...]
    dry_run: bool = False
    warnings: tuple[str, ...] = ()
    pip: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.results if r.status == "failed")

    @property
    def counts(self) -> dict[str, int]:
        """Nodes by state (installed, updated, unchanged, removed, failed); planned in a dry run."""
        counts = dict.fromkeys(STATE_NAMES, 0)
        for r in self.results:
            counts[r.state] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_file": str(self.config_file),
            "dry_run": self.dry_run,
            "counts": self.counts,
            "failed": list(self.failed),
            "nodes": [r.to_dict() for r in self.results],
            "warnings": list(self.warnings),
            "pip": dict(self.pip),
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------- execution
class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise GitError(f"timed out after {self.seconds:g}s (NODE_TIMEOUT)", timed_out=True)
        return remaining


@dataclasses.dataclass
class _Outcome:
    status: str = "ok"
    error: str = ""
    seconds: float = 0.0


class _Run:
    """One sync: owns the state records and writes them after each success."""

    def __init__(
        self,
        settings: Settings,
        layout: Layout,
        state: dict[str, NodeRecord],
        git: GitClient,
        runner: CommandRunner,
        environ: Mapping[str, str],
    ) -> None:
        self.settings = settings
        self.layout = layout
        self.dir = layout.custom_nodes_dir
        self.records = state
        self.git = git
        self.runner = runner
        self.environ = environ
        self.warnings: list[str] = []
        self.outcomes: dict[str, _Outcome] = {}
        self.pip: dict[str, Any] = {"ran": False}
        self._lock = threading.Lock()

    # state ---------------------------------------------------------------
    def record(self, name: str, record: NodeRecord | None) -> None:
        with self._lock:
            if record is None:
                self.records.pop(name, None)
            else:
                self.records[name] = record
            save_state(self.layout, self.records)

    def update_record(self, name: str, **changes: Any) -> None:
        with self._lock:
            rec = self.records.get(name)
            if rec is None:
                return
            self.records[name] = dataclasses.replace(rec, updated=time.time(), **changes)
            save_state(self.layout, self.records)

    def fail(self, name: str, error: str) -> None:
        message = self.settings.redact(redact_url(error))
        outcome = self.outcomes.setdefault(name, _Outcome())
        if outcome.status != "failed":
            outcome.status, outcome.error = "failed", message
        log.error("node %s: %s", name, message)

    def ok(self, name: str) -> bool:
        return self.outcomes.setdefault(name, _Outcome()).status == "ok"

    # remove --------------------------------------------------------------
    def remove(self, item: Planned) -> None:
        start = time.monotonic()
        path = self.dir / item.name
        try:
            if path.is_symlink():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
        except OSError as exc:
            self.fail(item.name, f"cannot remove {path}: {exc.strerror or exc}")
            return
        if item.managed:
            self.record(item.name, None)
        self.outcomes.setdefault(item.name, _Outcome()).seconds = time.monotonic() - start
        log.info("node %s: removed (%s)", item.name, ", ".join(item.reasons))

    # git -----------------------------------------------------------------
    def git_step(self, item: Planned) -> None:
        assert item.spec is not None
        spec = item.spec
        start = time.monotonic()
        try:
            resolved = self._checkout(spec, item, _Deadline(self.settings.node_timeout))
        except (GitError, OSError) as exc:
            self.fail(spec.name, str(exc))
            self.outcomes[spec.name].seconds += time.monotonic() - start
            return
        old = self.records.get(spec.name)
        same_code = old is not None and old.resolved == resolved and same_url(old.url, spec.url)
        self.record(
            spec.name,
            NodeRecord(
                url=spec.url,
                branch=spec.branch,
                commit=spec.commit,
                recursive=spec.recursive,
                resolved=resolved,
                requirements=old.requirements if (old and same_code) else None,
                env=old.env if old else None,
                script=None if spec.custom_script else "none",
                updated=time.time(),
            ),
        )
        self.outcomes.setdefault(spec.name, _Outcome()).seconds += time.monotonic() - start
        log.info(
            "node %s: %s at %s (%.1fs)",
            spec.name,
            "installed" if item.action == "install" else "updated",
            resolved[:12],
            time.monotonic() - start,
        )

    def _checkout(self, spec: NodeSpec, item: Planned, deadline: _Deadline) -> str:
        dest = self.dir / spec.name
        head = read_head(dest)
        if head is None or not same_url(origin_url(dest), spec.url):
            self._fresh(spec, dest, deadline)
        else:
            git = self.git
            if spec.commit:
                if not same_commit(head, spec.commit):
                    git.ensure_commit(dest, spec.url, spec.commit, timeout=deadline.left())
                    git.run(
                        dest,
                        "checkout",
                        "-q",
                        "-f",  # node folders are managed code: like the legacy `git reset --hard`
                        "--detach",
                        spec.commit,
                        op="checkout",
                        timeout=deadline.left(),
                    )
            elif spec.branch:
                if current_branch(dest) != spec.branch:
                    self._switch_branch(dest, spec.url, spec.branch, deadline)
            elif "branch" in item.reasons or "commit" in item.reasons:
                # No longer pinned: back to the remote's default branch.
                branch = remote_default_branch(dest) or self._ls_remote_default(dest, spec.url, deadline)
                self._switch_branch(dest, spec.url, branch, deadline)
            if spec.recursive:
                git.submodules(dest, spec.url, timeout=deadline.left())
        resolved = read_head(dest)
        if resolved is None:
            raise GitError(f"{dest} has no valid HEAD after checkout")
        return resolved

    def _ls_remote_default(self, dest: Path, url: str, deadline: _Deadline) -> str:
        out = self.git.network(
            dest, "ls-remote", "--symref", "--", url, "HEAD", url=url, op="ls-remote", timeout=deadline.left()
        )
        for line in out.splitlines():
            if line.startswith("ref: refs/heads/"):
                return line[len("ref: refs/heads/") :].split("\t")[0].strip()
        raise GitError(f"cannot tell the default branch of {redact_url(url)}")

    def _switch_branch(self, dest: Path, url: str, branch: str, deadline: _Deadline) -> None:
        remote_ref = f"refs/remotes/origin/{branch}"
        self.git.fetch(dest, url, f"+refs/heads/{branch}:{remote_ref}", timeout=deadline.left())
        self.git.run(
            dest, "checkout", "-q", "-f", "-B", branch, remote_ref, op="checkout", timeout=deadline.left()
        )

    def _fresh(self, spec: NodeSpec, dest: Path, deadline: _Deadline) -> None:
        """Clone into a temp sibling, then swap it into place (a killed clone is never used)."""
        git = self.git
        with staging(dest) as tmp:
            if spec.commit:
                git.clone(spec.url, tmp, shallow=True, no_checkout=True, timeout=deadline.left())
                git.ensure_commit(tmp, spec.url, spec.commit, timeout=deadline.left())
                git.run(
                    tmp, "checkout", "-q", "--detach", spec.commit, op="checkout", timeout=deadline.left()
                )
                if spec.recursive:
                    git.submodules(tmp, spec.url, timeout=deadline.left())
            else:
                git.clone(
                    spec.url,
                    tmp,
                    branch=spec.branch,
                    shallow=True,
                    recursive=spec.recursive,
                    timeout=deadline.left(),
                )
            if dest.exists() or dest.is_symlink():
                old = dest.parent / partial_name(dest.name)
                dest.rename(old)  # a kill from here on leaves a leftover that the next run removes
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dest)

    # pip -----------------------------------------------------------------
    def pip_step(self, specs: Sequence[NodeSpec]) -> None:
        pending: list[tuple[NodeSpec, str]] = []
        for spec in specs:
            rec = self.records.get(spec.name)
            if rec is None or not self.ok(spec.name):
                continue
            marker = requirements_marker(spec, self.dir / spec.name)
            if rec.requirements == marker:
                continue
            if marker in {"off", "absent"}:
                self.update_record(spec.name, requirements=marker)
            else:
                pending.append((spec, marker))
        if not pending:
            return
        env = {**self.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
        constraints = self._constraints(env)
        uv = shutil.which("uv", path=env.get("PATH"))
        files = [self.dir / s.name / "requirements.txt" for s, _ in pending]
        names = [s.name for s, _ in pending]
        log.info(
            "pip: installing the requirements of %d node(s) in one go: %s", len(pending), ", ".join(names)
        )
        result = self.runner(
            pip_command(self.settings.python, files, constraints, uv),
            cwd=self.dir,
            env=env,
            timeout=self.settings.pip_timeout,
        )
        self.pip = {
            "ran": True,
            "nodes": names,
            "ok": result.ok,
            "seconds": round(result.seconds, 3),
            "constraints": str(constraints) if constraints else None,
            "per_node": False,
        }
        self._log_output("pip", result)
        if result.ok:
            for spec, marker in pending:
                self.update_record(spec.name, requirements=marker)
            return
        log.warning(
            "pip: the combined install failed (%s); installing node by node to find the culprit(s)",
            self._clean(result.tail(1)),
        )
        self.pip["per_node"] = True
        culprits: list[str] = []
        for spec, marker in pending:
            one = self.runner(
                pip_command(
                    self.settings.python, [self.dir / spec.name / "requirements.txt"], constraints, uv
                ),
                cwd=self.dir / spec.name,
                env=env,
                timeout=self.settings.pip_timeout,
            )
            self.outcomes.setdefault(spec.name, _Outcome()).seconds += one.seconds
            self._log_output(f"pip {spec.name}", one)
            if one.ok:
                self.update_record(spec.name, requirements=marker)
            else:
                culprits.append(spec.name)
                why = "timed out (PIP_TIMEOUT)" if one.timed_out else one.tail(2)
                self.fail(spec.name, f"pip install -r requirements.txt failed: {why}")
        self.pip["culprits"] = culprits
        if not culprits:
            w = "pip: the combined install failed, yet each node's requirements install alone (conflict?)"
            self.warnings.append(w)
            log.warning("%s", w)

    def _constraints(self, env: Mapping[str, str]) -> Path | None:
        result = self.runner([self.settings.python, "-c", _TORCH_QUERY], cwd=None, env=env, timeout=60.0)
        versions: dict[str, str] = {}
        if result.ok:
            with contextlib.suppress(ValueError):
                parsed = json.loads(result.output.strip().splitlines()[-1])
                versions = {str(k): str(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {}
        else:
            log.warning(
                "cannot read the installed torch version from %s: %s", self.settings.python, result.tail(1)
            )
        if not versions:
            return None
        path = self.layout.state_dir / "pip-constraints.txt"
        atomic_write(path, constraints_text(versions))
        log.info("pip: protecting %s", ", ".join(f"{k}=={v}" for k, v in sorted(versions.items())))
        return path

    def _clean(self, text: str) -> str:
        return self.settings.redact(redact_url(text))

    def _log_output(self, what: str, result: CmdResult) -> None:
        level = logging.DEBUG if result.ok else logging.WARNING
        for line in result.output.splitlines()[-40:]:
            if line.strip():
                log.log(level, "%s: %s", what, self._clean(line.rstrip()))

    # .env ----------------------------------------------------------------
    def env_step(self, spec: NodeSpec) -> None:
        rec = self.records.get(spec.name)
        if rec is None or read_head(self.dir / spec.name) is None:
            return  # written even when pip failed: the folder is there and the values are known
        path = self.dir / spec.name / ".env"
        marker = env_marker(spec)
        try:
            if spec.env:
                text, unset = render_env(spec.env, self.environ)
                if unset:
                    names = ", ".join(sorted(set(unset)))
                    w = f"node {spec.name}: .env: unset variable(s) written empty: {names}"
                    self.warnings.append(w)
                    log.warning("%s", w)
                if atomic_write(path, text, mode=0o600):
                    log.info("node %s: wrote .env (%d variables)", spec.name, len(spec.env))
            elif rec.env not in (None, "none") and path.exists():
                path.unlink()  # we wrote it; the config no longer asks for one
        except OSError as exc:
            self.fail(spec.name, f"cannot write {path}: {exc.strerror or exc}")
            return
        if rec.env != marker:
            self.update_record(spec.name, env=marker)

    # custom_script -------------------------------------------------------
    def script_step(self, spec: NodeSpec) -> None:
        rec = self.records.get(spec.name)
        if rec is None or not self.ok(spec.name) or not spec.custom_script:
            return
        marker = script_marker(spec)
        if rec.script == marker:
            return
        env = {
            **self.environ,
            "COMFY_PYTHON": self.settings.python,
            "COMFYUI_DIR": str(self.layout.comfy_dir),
            "NODE_DIR": str(self.dir / spec.name),
        }
        log.info("node %s: running custom_script", spec.name)
        result = self.runner(
            ["bash", "-c", spec.custom_script],
            cwd=self.dir / spec.name,
            env=env,
            timeout=self.settings.node_timeout,
        )
        self.outcomes.setdefault(spec.name, _Outcome()).seconds += result.seconds
        for line in result.output.splitlines()[-200:]:
            if line.strip():
                log.info("node %s: script: %s", spec.name, self._clean(line.rstrip()))
        if result.ok:
            self.update_record(spec.name, script=marker)
        elif result.timed_out:
            self.fail(
                spec.name, f"custom_script timed out after {self.settings.node_timeout:g}s (NODE_TIMEOUT)"
            )
        else:
            self.fail(spec.name, f"custom_script failed (exit {result.returncode}): {result.tail(2)}")

    # all -----------------------------------------------------------------
    def execute(self, plan: Sequence[Planned]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for gone in remove_partials(self.dir):
            log.warning("removed %s left by an interrupted run", gone.name)
        for item in plan:
            if item.action == "remove":
                self.remove(item)
        git_items = [
            p for p in plan if p.spec is not None and p.action in {"install", "update"} and p.needs_git
        ]
        if git_items:
            workers = max(1, min(self.settings.nodes_concurrency, len(git_items)))
            with concurrent.futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="node"
            ) as pool:
                for future in [pool.submit(self.git_step, item) for item in git_items]:
                    future.result()
        specs = [p.spec for p in plan if p.spec is not None]
        self.pip_step(specs)
        for spec in specs:
            self.env_step(spec)
        for spec in specs:  # install order: a script may rely on an earlier node
            self.script_step(spec)


def sync_nodes(
    settings: Settings,
    layout: Layout,
    *,
    dry_run: bool = False,
    prune: bool = False,
    config_file: Path | None = None,
    git: GitClient | None = None,
    runner: CommandRunner = run_command,
    environ: Mapping[str, str] | None = None,
) -> NodesReport:
    """Install, update and remove custom nodes so the folder matches the config.

    Args:
        dry_run: only plan; nothing is written.
        prune: also remove folders this orchestrator did not install.
        config_file: default config_nodes(_test).json from the shared repo, else the shipped one.
        git, runner, environ: seams for tests (git client, command runner, the environment
            that ``.env`` values and pip see).

    Raises:
        ConfigError: the config is invalid (before anything on disk changes).

    Callers that write hold the ROOT lock (:mod:`orchestrator.machine.lock`), as ``up`` and
    ``nodes sync`` do: two syncs at once would run two pips into one venv.
    """
    start = time.monotonic()
    path = config_file or default_config_file(settings, layout)
    config = load_config(path)
    for w in config.warnings:
        log.warning("%s: %s", path, w)
    state = load_state(layout)
    observed, unknown = observe(layout.custom_nodes_dir, config.nodes, state)
    plan = plan_actions(config.nodes, state, observed, unknown, prune=prune)
    warnings = list(config.warnings)
    if unknown and not prune:
        warnings.append(
            f"left alone (not installed by the orchestrator; --prune removes): {', '.join(unknown)}"
        )
    if dry_run:
        results = tuple(
            NodeResult(
                p.name, p.action, "skipped", reasons=p.reasons, url=redact_url(p.spec.url) if p.spec else ""
            )
            for p in plan
        )
        return NodesReport(path, results, True, tuple(warnings), {}, time.monotonic() - start)
    # The caller holds the ROOT lock (orchestrator.machine.lock): `up` and `nodes sync` take it.
    run = _Run(
        settings,
        layout,
        dict(state),
        git or git_client(settings, layout),
        runner,
        os.environ if environ is None else environ,
    )
    run.execute(plan)
    done: list[NodeResult] = []
    for p in plan:
        outcome = run.outcomes.get(p.name, _Outcome())
        commit = "" if p.action == "remove" else (read_head(layout.custom_nodes_dir / p.name) or "")
        url = redact_url(p.spec.url) if p.spec else ""
        done.append(
            NodeResult(
                p.name, p.action, outcome.status, outcome.error, commit, outcome.seconds, p.reasons, url
            )
        )
    report = NodesReport(
        path, tuple(done), False, tuple(warnings + run.warnings), run.pip, time.monotonic() - start
    )
    write_json(layout.state_dir / REPORT_FILE, report.to_dict())
    counts = report.counts
    log.info("custom nodes: %s in %.1fs", ", ".join(f"{counts[k]} {k}" for k in STATE_NAMES), report.seconds)
    return report


def last_report(layout: Layout) -> dict[str, Any] | None:
    """The last sync's report (for ``status`` and the metrics), or None."""
    data = read_json(layout.state_dir / REPORT_FILE)
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- CLI
def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def format_report(report: NodesReport) -> str:
    if report.dry_run:
        rows = [[r.name, r.action, ", ".join(r.reasons)] for r in report.results]
        body = _table(rows, ["NODE", "ACTION", "WHY"])
    else:
        rows = [
            [r.name, r.action, r.status, r.commit[:12], f"{r.seconds:.1f}s", r.error] for r in report.results
        ]
        body = _table(rows, ["NODE", "ACTION", "STATUS", "COMMIT", "TIME", "ERROR"])
    counts = report.counts
    planned = "planned: " if report.dry_run else ""
    summary = f"{len(report.results)} nodes, {planned}" + ", ".join(f"{counts[k]} {k}" for k in STATE_NAMES)
    if report.pip.get("ran"):
        summary += f"; pip {report.pip.get('seconds', 0):.1f}s for {len(report.pip.get('nodes', []))} node(s)"
    lines = [body, "", f"{summary} ({report.seconds:.1f}s, {report.config_file})"]
    lines += [f"warning: {w}" for w in report.warnings]
    if report.failed:
        lines.append(f"FAILED: {', '.join(report.failed)}")
    return "\n".join(lines)


def cmd_sync(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator nodes sync [--dry-run] [--prune] [--file F] [--json]``: exit 1 if any node failed."""
    layout = Layout(settings.root)
    if args.file is not None:
        load_config(args.file)  # validate before acting: a bad file writes nothing, not even the lock
    # One up/nodes sync per ROOT (a dry run writes nothing and needs no lock).
    with contextlib.nullcontext(None) if args.dry_run else oplock.hold(layout):
        if args.file is None:
            layout = resolve_shared(settings, layout, install=not args.dry_run)
        report = sync_nodes(settings, layout, dry_run=args.dry_run, prune=args.prune, config_file=args.file)
    if args.json:
        print(settings.redact(json.dumps(report.to_dict(), indent=2)))
    else:
        print(settings.redact(format_report(report)))
    return 1 if report.failed else 0


def cmd_validate(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator nodes validate FILE [--json]``: schema and safety only, no network, no writes."""
    path: Path = args.file
    try:
        config = load_config(path)
    except ConfigError as exc:
        if args.json:
            print(settings.redact(json.dumps({"file": str(path), "ok": False, "error": str(exc)}, indent=2)))
            return exc.exit_code
        raise
    if args.json:
        out = {
            "file": str(path),
            "ok": True,
            "nodes": [n.to_dict() for n in config.nodes],
            "warnings": list(config.warnings),
        }
        print(settings.redact(json.dumps(out, indent=2)))
        return 0
    for w in config.warnings:
        print(f"warning: {w}")
    print(f"{path}: OK, {len(config.nodes)} custom nodes")
    return 0
