"""The git step of a node: clone, pin, switch branch, submodules, all under NODE_TIMEOUT."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from orchestrator.provision.git.command import GitError
from orchestrator.provision.git.urls import redact_url, same_commit, same_url
from orchestrator.provision.git.worktree import (
    current_branch,
    origin_url,
    partial_name,
    read_head,
    remote_default_branch,
    staging,
)
from orchestrator.provision.nodes.config import NodeSpec
from orchestrator.provision.nodes.engine import Outcome, RunState
from orchestrator.provision.nodes.plan import Planned
from orchestrator.provision.nodes.state import NodeRecord

log = logging.getLogger(__name__)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise GitError(f"timed out after {self.seconds:g}s (NODE_TIMEOUT)", timed_out=True)
        return remaining


def git_step(run: RunState, item: Planned) -> None:
    """Clone or move one node's checkout to its config; record it, or record the failure."""
    spec = item.spec
    if spec is None:
        raise ValueError(f"{item.name}: only a planned install or update has a git step")
    start = time.monotonic()
    try:
        resolved = _checkout(run, spec, item, Deadline(run.settings.node_timeout))
    except (GitError, OSError) as exc:
        run.fail(spec.name, str(exc))
        run.outcomes[spec.name].seconds += time.monotonic() - start
        return
    old = run.records.get(spec.name)
    same_code = old is not None and old.resolved == resolved and same_url(old.url, spec.url)
    run.record(
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
    run.outcomes.setdefault(spec.name, Outcome()).seconds += time.monotonic() - start
    log.info(
        "node %s: %s at %s (%.1fs)",
        spec.name,
        "installed" if item.action == "install" else "updated",
        resolved[:12],
        time.monotonic() - start,
    )


def _checkout(run: RunState, spec: NodeSpec, item: Planned, deadline: Deadline) -> str:
    dest = run.dir / spec.name
    head = read_head(dest)
    if head is None or not same_url(origin_url(dest), spec.url):
        _fresh(run, spec, dest, deadline)
    else:
        git = run.git
        if spec.commit:
            if not same_commit(head, spec.commit):
                git.ensure_commit(dest, spec.url, spec.commit, timeout=deadline.left())
                git.cmd(dest).checkout(
                    "-q",
                    "-f",  # node folders are managed code: like the legacy `git reset --hard`
                    "--detach",
                    spec.commit,
                    kill_after_timeout=deadline.left(),
                )
        elif spec.branch:
            if current_branch(dest) != spec.branch:
                _switch_branch(run, dest, spec.url, spec.branch, deadline)
        elif "branch" in item.reasons or "commit" in item.reasons:
            # No longer pinned: back to the remote's default branch.
            branch = remote_default_branch(dest) or _ls_remote_default(run, dest, spec.url, deadline)
            _switch_branch(run, dest, spec.url, branch, deadline)
        if spec.recursive:
            git.submodules(dest, spec.url, timeout=deadline.left())
    resolved = read_head(dest)
    if resolved is None:
        raise GitError(f"{dest} has no valid HEAD after checkout")
    return resolved


def _ls_remote_default(run: RunState, dest: Path, url: str, deadline: Deadline) -> str:
    out = run.git.network(
        dest, "ls-remote", "--symref", "--", url, "HEAD", url=url, op="ls-remote", timeout=deadline.left()
    )
    for line in out.splitlines():
        if line.startswith("ref: refs/heads/"):
            return line[len("ref: refs/heads/") :].split("\t")[0].strip()
    raise GitError(f"cannot tell the default branch of {redact_url(url)}")


def _switch_branch(run: RunState, dest: Path, url: str, branch: str, deadline: Deadline) -> None:
    remote_ref = f"refs/remotes/origin/{branch}"
    run.git.fetch(dest, url, f"+refs/heads/{branch}:{remote_ref}", timeout=deadline.left())
    run.git.cmd(dest).checkout("-q", "-f", "-B", branch, remote_ref, kill_after_timeout=deadline.left())


def _fresh(run: RunState, spec: NodeSpec, dest: Path, deadline: Deadline) -> None:
    """Clone into a temp sibling, then swap it into place (a killed clone is never used)."""
    git = run.git
    with staging(dest) as tmp:
        if spec.commit:
            git.clone(spec.url, tmp, shallow=True, no_checkout=True, timeout=deadline.left())
            git.ensure_commit(tmp, spec.url, spec.commit, timeout=deadline.left())
            git.cmd(tmp).checkout("-q", "--detach", spec.commit, kill_after_timeout=deadline.left())
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
