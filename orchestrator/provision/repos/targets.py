"""Where each checkout should be (pure, from the settings), and the git client with its SSH key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from orchestrator.core.errors import ConfigError, ProvisionError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import FORK_URL, Settings
from orchestrator.provision.git.client import GitClient
from orchestrator.provision.git.ssh import SshKey
from orchestrator.provision.git.urls import commit_problem, redact_url, ref_problem, same_url, url_problem

SHIPPED = "shipped-defaults"  # RepoResult.url when the shipped shared/ was used


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a checkout should be: follow ``branch`` (None: the remote's default) or pin ``commit``."""

    url: str
    branch: str | None = None
    commit: str | None = None

    @property
    def ref(self) -> str:
        return self.commit or self.branch or ""


@dataclasses.dataclass(frozen=True)
class RepoResult:
    """What a sync left on disk."""

    path: Path
    url: str  # credentials stripped; "shipped-defaults" when the shipped shared/ was used
    ref: str  # what is checked out: the branch, or the commit when detached (never just the wish)
    commit: str  # the commit checked out ("" for shipped defaults)
    fallback: bool  # True: not what was configured (fallback repo, other branch, shipped defaults)
    changed: bool  # the checked-out files changed during this sync
    warnings: tuple[str, ...] = ()
    wanted: str = ""  # the configured branch or commit
    fetched_at: float | None = None  # unix time the remote last answered (COMFY_UPDATE=interval)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "url": self.url,
            "ref": self.ref,
            "commit": self.commit,
            "fallback": self.fallback,
            "changed": self.changed,
            "warnings": list(self.warnings),
            "wanted": self.wanted,
            "fetched_at": self.fetched_at,
        }


class MissingBranchError(ProvisionError):
    """The configured branch is not in the repository; ``available`` lists the ones that are."""

    def __init__(self, message: str, *, branch: str, available: tuple[str, ...]) -> None:
        super().__init__(message)
        self.branch = branch
        self.available = available


def missing_branch_line(label: str, url: str, branch: str, available: list[str] | tuple[str, ...]) -> str:
    """One line: the branch that is missing and the ones that exist."""
    shown = ", ".join(available) if available else "none"
    return f"{label}: branch {branch!r} does not exist in {redact_url(url)}; branches there: {shown}"


def update_due(policy: str, interval: float, fetched_at: float | None, now: float) -> bool:
    """COMFY_UPDATE: whether a warm ``up`` may fetch (``always``, ``never``, ``interval``)."""
    if policy == "always":
        return True
    if policy == "never":
        return False
    if fetched_at is None:
        return True
    return now - fetched_at >= interval or now < fetched_at


def is_fork(settings: Settings) -> bool:
    """The fork follows a branch: FORK_URL, or any URL when COMFY_BRANCH was set explicitly."""
    explicit_branch = settings.sources.get("COMFY_BRANCH", "default") != "default"
    return same_url(settings.comfy_repo_url, FORK_URL) or explicit_branch


def comfy_target(settings: Settings) -> Target:
    if is_fork(settings):
        return Target(settings.comfy_repo_url, branch=settings.comfy_branch)
    return Target(settings.comfy_repo_url, commit=settings.comfy_commit)


def fallback_target(settings: Settings) -> Target:
    return Target(settings.comfy_fallback_url, commit=settings.comfy_commit)


def shared_target(settings: Settings) -> Target | None:
    if not settings.shared_repo_url:
        return None
    if settings.shared_commit:
        return Target(settings.shared_repo_url, commit=settings.shared_commit)
    return Target(settings.shared_repo_url, branch=settings.shared_branch or None)


def check_target(target: Target, url_var: str, branch_var: str, commit_var: str) -> None:
    """Raise ConfigError naming the variable when a URL, branch or commit is unsafe."""
    problem = url_problem(target.url)
    if problem:
        raise ConfigError(f"invalid {url_var}={redact_url(target.url)!r}: {problem}")
    if target.branch is not None and (problem := ref_problem(target.branch)):
        raise ConfigError(f"invalid {branch_var}={target.branch!r}: {problem}")
    if target.commit is not None and (problem := commit_problem(target.commit)):
        raise ConfigError(f"invalid {commit_var}={target.commit!r}: {problem}")


def ssh_key(settings: Settings, layout: Layout) -> SshKey:
    """The key material from CUT_PK_1..3 (concatenated) or SSH_PRIVATE_KEY; decoded lazily."""
    parts = settings.cut_pk_1 + settings.cut_pk_2 + settings.cut_pk_3
    if parts:
        return SshKey(parts, layout.state_dir / "ssh" / "id_orchestrator", "CUT_PK_1..3")
    return SshKey(settings.ssh_private_key, layout.state_dir / "ssh" / "id_orchestrator", "SSH_PRIVATE_KEY")


def git_client(settings: Settings, layout: Layout) -> GitClient:
    """The production git client: GIT_TIMEOUT, default retry policy, the SSH key, redaction."""
    return GitClient(timeout=settings.git_timeout, ssh=ssh_key(settings, layout), redact=settings.redact)
