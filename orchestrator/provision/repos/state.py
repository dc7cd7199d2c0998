"""``repos.json``: what the last syncs left, and the code report read from the tree itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.core.layout import Layout
from orchestrator.machine.fs import read_json, write_json
from orchestrator.provision.git.urls import commit_problem, redact_url, same_commit
from orchestrator.provision.git.worktree import current_branch, origin_url, read_head
from orchestrator.provision.repos.targets import RepoResult, Target

STATE_FILE = "repos.json"


def load_state(layout: Layout) -> dict[str, Any]:
    data = read_json(layout.state_dir / STATE_FILE, {})
    return data if isinstance(data, dict) else {}


def save_state(layout: Layout, key: str, result: RepoResult, state: dict[str, Any]) -> None:
    state[key] = result.to_dict()
    write_json(layout.state_dir / STATE_FILE, state)


def previous_entry(state: dict[str, Any], key: str) -> dict[str, Any]:
    entry = state.get(key)
    return entry if isinstance(entry, dict) else {}


def last_fetch(previous: dict[str, Any]) -> float | None:
    """When the remote last answered, from the previous sync's record (None: never, or unreadable)."""
    value = previous.get("fetched_at")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def record_result(layout: Layout, key: str, result: RepoResult, target: Target, state: dict[str, Any]) -> None:
    save_state(layout, key, result, state)
    state[key]["wanted_url"] = redact_url(target.url)
    write_json(layout.state_dir / STATE_FILE, state)


def checked_out(path: Path) -> dict[str, str]:
    """What the tree at ``path`` has checked out, read from its .git (no subprocess)."""
    head = read_head(path) or ""
    return {"branch": current_branch(path) or "", "commit": head, "url": redact_url(origin_url(path) or "")}


def code_report(path: Path, recorded: Any) -> dict[str, Any]:
    """The ComfyUI code that runs, read from the tree at ``path`` (never only from a record).

    ``recorded`` is the last sync's :meth:`RepoResult.to_dict` (``{}`` when the tree was put
    there by hand and ``up --skip-provision`` started it); it supplies what was wanted.
    """
    rec = recorded if isinstance(recorded, dict) else {}
    tree = checked_out(path)
    wanted = str(rec.get("wanted") or "")
    fallback = bool(rec.get("fallback"))
    if wanted and tree["commit"]:
        if commit_problem(wanted) is None:  # a pinned commit
            fallback = fallback or not same_commit(tree["commit"], wanted)
        else:
            fallback = fallback or tree["branch"] != wanted
    return {
        "path": str(path),
        "url": tree["url"] or str(rec.get("url") or ""),
        "ref": tree["branch"] or tree["commit"],
        "branch": tree["branch"],
        "commit": tree["commit"],
        "wanted": wanted,
        "fallback": fallback,
    }


def load_status(layout: Layout) -> dict[str, Any]:
    """The last results (``{"comfy": RepoResult.to_dict(), "shared": ...}``) for status and metrics."""
    state = load_state(layout)
    return {k: v for k, v in state.items() if k in {"comfy", "shared"}}
