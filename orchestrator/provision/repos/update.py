"""Git steps on one checkout: pin a commit, follow a branch (fast-forward), clone fresh or adopt.

Every step keeps the checkout as it is on trouble and says why in a warning; only a missing
branch is signalled (:class:`BranchMissing`), for the sync's COMFY_ON_MISSING_BRANCH policy.
"""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.provision.git.client import GitClient
from orchestrator.provision.git.command import GitError
from orchestrator.provision.git.urls import redact_url, same_commit, same_url
from orchestrator.provision.git.worktree import current_branch, origin_url, read_head, remote_default_branch, staging
from orchestrator.provision.repos.shipped import sha256_file
from orchestrator.provision.repos.targets import RepoResult, Target

log = logging.getLogger(__name__)


def short(sha: str | None) -> str:
    return (sha or "?")[:12]


class BranchMissing(Exception):  # noqa: N818 - internal signal from _follow to the sync
    def __init__(self, branch: str, available: list[str]) -> None:
        super().__init__(branch)
        self.branch = branch
        self.available = available


def _pin(git: GitClient, path: Path, target: Target, commit: str, label: str) -> tuple[bool, list[str]]:
    """Check out ``commit`` (``target.commit``); no network and no subprocess when it is already there."""
    head = read_head(path)
    if same_commit(head, commit):
        if not same_url(origin_url(path), target.url):
            git.set_origin(path, target.url)  # same code; remember where it should come from
        return False, []
    try:
        git.ensure_commit(path, target.url, commit)
    except GitError as exc:
        return False, [f"{label}: cannot fetch commit {commit} ({exc}); keeping {short(head)}"]
    try:
        git.cmd(path).checkout("-q", "--detach", commit)
    except GitError as exc:
        return False, [f"{label}: cannot check out {commit} ({exc}); keeping {short(head)}"]
    git.set_origin(path, target.url)
    return True, []


def _remote_default(git: GitClient, path: Path, url: str) -> str | None:
    out = git.network(path, "ls-remote", "--symref", "--", url, "HEAD", url=url, op="ls-remote")
    for line in out.splitlines():
        if line.startswith("ref: refs/heads/"):
            return line[len("ref: refs/heads/") :].split("\t")[0].strip()
    return None


def _follow(git: GitClient, path: Path, target: Target, label: str, kind: str) -> tuple[bool, list[str]]:
    """Fetch the branch and fast-forward; on any trouble keep the checkout and warn."""
    head = read_head(path)
    try:
        branch = target.branch or current_branch(path) or remote_default_branch(path)
        if not branch:
            branch = _remote_default(git, path, target.url)
        if not branch:
            shown = redact_url(target.url)
            return False, [f"{label}: cannot tell the default branch of {shown}; keeping {short(head)}"]
        remote_ref = f"refs/remotes/origin/{branch}"
        git.fetch(path, target.url, f"+refs/heads/{branch}:{remote_ref}")
    except GitError as exc:
        if target.branch and (available := missing_branches(git, target.url, target.branch)) is not None:
            raise BranchMissing(target.branch, available) from None
        return False, [f"{label}: cannot fetch ({exc}); keeping {short(head)}"]
    git.set_origin(path, target.url)
    remote = git.rev_parse(path, remote_ref)
    if current_branch(path) != branch:
        if git.is_dirty(path):
            return False, [f"{label}: local changes; not switching to {branch}, keeping {short(head)}"]
        try:
            if git.has_commit(path, f"refs/heads/{branch}"):
                git.cmd(path).checkout("-q", branch)
            else:
                git.cmd(path).checkout("-q", "--no-track", "-b", branch, remote_ref)
        except GitError as exc:
            return False, [f"{label}: cannot switch to branch {branch} ({exc}); keeping {short(head)}"]
        switched = read_head(path) != head
        head = read_head(path)
    else:
        switched = False
    if head == remote:
        return switched, []
    if head and git.is_ancestor(path, head, remote):
        try:
            git.cmd(path).merge("--ff-only", "-q", remote)
        except GitError as exc:
            return False, [f"{label}: cannot fast-forward to {short(remote)} ({exc}); kept {short(head)}"]
        return True, []
    if head and git.is_ancestor(path, remote, head):
        log.info("%s: local branch %s is ahead of origin; keeping it", label, branch)
        return switched, []
    if kind == "code" and not git.is_dirty(path):
        # The code tree is managed, not edited: follow a force-pushed branch.
        git.cmd(path).checkout("-q", "-B", branch, remote_ref)
        return True, [f"{label}: branch {branch} was rewritten upstream; reset to {short(remote)}"]
    return False, [
        f"{label}: branch {branch} has diverged from origin; keeping local {short(head)} (fast-forward only)"
    ]


def missing_branches(git: GitClient, url: str, branch: str) -> list[str] | None:
    """The branches ``url`` has when ``branch`` is not among them; None when it is, or unknown."""
    try:
        available = git.remote_branches(url)
    except GitError:
        return None
    return None if branch in available else available


def _apply(git: GitClient, path: Path, target: Target, label: str, kind: str) -> tuple[bool, list[str]]:
    if target.commit:
        return _pin(git, path, target, target.commit, label)
    return _follow(git, path, target, label, kind)


def apply_safely(
    git: GitClient, path: Path, target: Target, label: str, kind: str
) -> tuple[bool, list[str]]:
    """:func:`_apply`, but an unexpected git failure keeps the checkout with a warning."""
    try:
        return _apply(git, path, target, label, kind)
    except GitError as exc:
        return False, [f"{label}: cannot update ({exc}); keeping {short(read_head(path))}"]


def _adopt_checkout(git: GitClient, path: Path, rev: str, kind: str, record: dict[str, str]) -> list[str]:
    """Populate an adopted folder: code is forced to ``rev``; config keeps locally edited files."""
    if kind == "code":
        git.cmd(path).checkout("-q", "-f", rev)
        return []
    if rev != "HEAD":
        git.cmd(path).update_ref("--no-deref", "HEAD", rev)
    git.cmd(path).reset("-q")
    listing = str(git.cmd(path).ls_tree("-r", "-z", "--name-only", "HEAD"))
    tracked = [p for p in listing.split("\0") if p]
    restore = [rel for rel in tracked if not (path / rel).exists() or sha256_file(path / rel) == record.get(rel)]
    for i in range(0, len(restore), 200):
        git.cmd(path).checkout("-q", "--", *restore[i : i + 200])
    status = str(git.cmd(path).status("--porcelain", "--untracked-files=no"))
    kept = [line[3:] for line in status.splitlines() if line.strip()]
    if kept:
        shown = ", ".join(kept[:5])
        return [f"shared: kept {len(kept)} locally edited file(s) over the repo's version: {shown}"]
    return []


def fresh_clone(git: GitClient, path: Path, target: Target, kind: str, record: dict[str, str]) -> list[str]:
    """Clone ``target`` into ``path`` atomically; adopt the folder when it already has content."""
    adopting = path.exists() and any(path.iterdir())
    with staging(path) as tmp:
        if target.commit:
            git.clone(target.url, tmp, shallow=True, no_checkout=True)
            git.ensure_commit(tmp, target.url, target.commit)
            rev = target.commit
            if not adopting:
                git.cmd(tmp).checkout("-q", "--detach", rev)
        else:
            git.clone(target.url, tmp, branch=target.branch, shallow=True, no_checkout=adopting)
            rev = "HEAD"
        if not adopting:
            if path.exists():
                path.rmdir()  # empty
            tmp.rename(path)
            return []
        git.adopt(tmp, path)
    warnings = _adopt_checkout(git, path, rev, kind, record)
    git.finish_adopt(path)
    log.info("adopted existing folder %s as a checkout of %s", path, redact_url(target.url))
    return warnings


def result_from_tree(
    path: Path,
    target: Target,
    fallback: bool,
    changed: bool,
    warnings: list[str],
    *,
    wanted: Target | None = None,
    fetched_at: float | None = None,
) -> RepoResult:
    """The result as the tree has it: the branch (or detached commit) and HEAD read from disk."""
    head = read_head(path) or ""
    branch = current_branch(path)
    wish = wanted or target
    if target.branch and branch != target.branch:
        fallback = True  # asked for a branch, running another one (a failed switch)
    return RepoResult(
        path=path,
        url=redact_url(origin_url(path) or target.url),
        ref=branch or head,
        commit=head,
        fallback=fallback,
        changed=changed,
        warnings=tuple(warnings),
        wanted=wish.ref,
        fetched_at=fetched_at,
    )
