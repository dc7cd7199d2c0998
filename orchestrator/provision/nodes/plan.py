"""What is on disk (:func:`observe`, file reads only) and what to do about it (:func:`plan_actions`, pure)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.provision.git.urls import redact_url, same_commit, same_url
from orchestrator.provision.git.worktree import read_head
from orchestrator.provision.nodes.config import NodeSpec
from orchestrator.provision.nodes.state import NodeRecord, env_marker, requirements_marker, script_marker

_GIT_REASONS = frozenset(
    {"new", "missing", "broken", "existing folder", "url", "branch", "commit", "drift", "recursive"}
)


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
