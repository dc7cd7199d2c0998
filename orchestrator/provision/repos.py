"""The ComfyUI code tree, the shared config repo and the SSH key for private repos.

ComfyUI, one tree for every instance at ``$ROOT/ComfyUI``:

* The fork follows ``COMFY_BRANCH`` (fetched and fast-forwarded when ``COMFY_UPDATE`` says an
  update is due: ``always``, ``never`` once cloned, or ``interval``, the default, once per
  ``COMFY_UPDATE_INTERVAL``; a changed URL, branch or commit is applied at once). A URL counts as
  the fork when it is :data:`~orchestrator.core.settings.FORK_URL` (ignoring case of the host, a
  trailing ``/`` or ``.git``) **or** when ``COMFY_BRANCH`` was set explicitly (flag, env or
  file): setting a branch means "follow it", whatever the URL.
* Any other URL is checked out at ``COMFY_COMMIT``; a pin already checked out costs no network
  and no git subprocess.
* When the configured repo cannot be cloned, ``COMFY_FALLBACK_URL`` at ``COMFY_COMMIT`` is
  used and said loudly: an error log line, ``RepoResult.fallback`` and ``repos.json`` in the
  state directory (read by ``status`` and the metrics).
* When ``COMFY_BRANCH`` does not exist in the fork, one line names the branches that do;
  ``COMFY_ON_MISSING_BRANCH=fail`` (default) stops there (:class:`MissingBranchError`),
  ``fallback`` keeps an existing tree as it is, or clones the fallback on a first boot.
  Whatever happens, the result reports what is checked out (branch and HEAD read from the
  tree), never the branch that was asked for.

The shared config repo at ``$ROOT/shared`` follows ``SHARED_BRANCH`` (default: the remote's
default branch; the same ``COMFY_UPDATE`` policy) or is pinned to ``SHARED_COMMIT``; it only
ever fast-forwards and never discards local changes. Without a configured or reachable repo on first boot, the shipped
defaults (:func:`shipped_shared_dir`) are copied in.

Every clone goes into a temp sibling that is renamed into place, so a killed clone is never
used; a folder without a valid HEAD is treated as broken and redone, keeping its untracked
files (custom nodes, models).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.core.errors import ConfigError, ProvisionError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import FORK_URL, Settings
from orchestrator.machine.fs import atomic_write, read_json, write_json
from orchestrator.provision.git import (
    GitClient,
    GitError,
    SshKey,
    commit_problem,
    current_branch,
    origin_url,
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

log = logging.getLogger(__name__)

SHIPPED = "shipped-defaults"
STATE_FILE = "repos.json"


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


class _BranchMissing(Exception):  # noqa: N818 - internal signal from _follow to the sync
    def __init__(self, branch: str, available: list[str]) -> None:
        super().__init__(branch)
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


def checked_out(path: Path) -> dict[str, str]:
    """What the tree at ``path`` has checked out, read from its .git (no subprocess)."""
    head = read_head(path) or ""
    return {"branch": current_branch(path) or "", "commit": head, "url": redact_url(origin_url(path) or "")}


# ---------------------------------------------------------------- settings → targets (pure)
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


# ---------------------------------------------------------------- seams
def ssh_key(settings: Settings, layout: Layout) -> SshKey:
    """The key material from CUT_PK_1..3 (concatenated) or SSH_PRIVATE_KEY; decoded lazily."""
    parts = settings.cut_pk_1 + settings.cut_pk_2 + settings.cut_pk_3
    if parts:
        return SshKey(parts, layout.state_dir / "ssh" / "id_orchestrator", "CUT_PK_1..3")
    return SshKey(settings.ssh_private_key, layout.state_dir / "ssh" / "id_orchestrator", "SSH_PRIVATE_KEY")


def git_client(settings: Settings, layout: Layout) -> GitClient:
    """The production git client: GIT_TIMEOUT, default retry policy, the SSH key, redaction."""
    return GitClient(timeout=settings.git_timeout, ssh=ssh_key(settings, layout), redact=settings.redact)


def shipped_shared_dir() -> Path:
    """The shared config shipped with the package (installed data files, else the source tree)."""
    installed = Path(sys.prefix) / "share/orchestrator/shared"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "shared"


def has_shared_config(path: Path) -> bool:
    """True when ``path`` is a shared checkout or holds any of the shared config files."""
    if read_head(path):
        return True
    try:
        names = [p.name for p in shipped_shared_dir().iterdir() if p.is_file()]
    except OSError:
        names = []
    return any((path / name).is_file() for name in names)


def resolve_shared(settings: Settings, layout: Layout, *, install: bool) -> Layout:
    """The one answer to "where is the shared config?" for every command that reads it
    (comfy_dir_config.yaml, static-models.json, models.yaml, config_nodes.json).

    ``$ROOT/shared`` when it is a checkout or holds the config. Otherwise, as ``up`` does:
    with ``install`` (commands that change the machine) :func:`sync_shared` clones
    SHARED_REPO_URL, or copies the shipped defaults into ``$ROOT/shared``; without it
    (dry runs, read-only commands) the shipped defaults are read where they are and nothing
    is written. Returns the layout whose ``shared_dir`` to read.
    """
    home = dataclasses.replace(layout, shared=None)
    if has_shared_config(home.shared_dir):
        return home
    if install:
        sync_shared(settings, home)
        return home
    return dataclasses.replace(layout, shared=shipped_shared_dir())


# ---------------------------------------------------------------- shipped defaults
def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def install_shipped_defaults(dest: Path, record: dict[str, str], src: Path | None = None) -> list[str]:
    """Copy the shipped shared files into ``dest``; return the relative paths written.

    A file is written when it is missing, or when it still holds what an earlier copy put
    there (``record``: relative path → sha256, updated in place) and the shipped one changed.
    Files edited locally are never overwritten.
    """
    src = src or shipped_shared_dir()
    written: list[str] = []
    for file in sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = file.relative_to(src).as_posix()
        target = dest / rel
        data = file.read_bytes()
        new = hashlib.sha256(data).hexdigest()
        current = _sha256(target)
        if current == new:
            record[rel] = new
            continue
        if current is None or current == record.get(rel):
            atomic_write(target, data)
            record[rel] = new
            written.append(rel)
    return written


# ---------------------------------------------------------------- state
def _state(layout: Layout) -> dict[str, Any]:
    data = read_json(layout.state_dir / STATE_FILE, {})
    return data if isinstance(data, dict) else {}


def _save_state(layout: Layout, key: str, result: RepoResult, state: dict[str, Any]) -> None:
    state[key] = result.to_dict()
    write_json(layout.state_dir / STATE_FILE, state)


# ---------------------------------------------------------------- git logic
def _short(sha: str | None) -> str:
    return (sha or "?")[:12]


def _pin(git: GitClient, path: Path, target: Target, label: str) -> tuple[bool, list[str]]:
    """Check out ``target.commit``; no network and no subprocess when it is already there."""
    assert target.commit is not None
    head = read_head(path)
    if same_commit(head, target.commit):
        if not same_url(origin_url(path), target.url):
            git.set_origin(path, target.url)  # same code; remember where it should come from
        return False, []
    try:
        git.ensure_commit(path, target.url, target.commit)
    except GitError as exc:
        return False, [f"{label}: cannot fetch commit {target.commit} ({exc}); keeping {_short(head)}"]
    try:
        git.run(path, "checkout", "-q", "--detach", target.commit, op="checkout")
    except GitError as exc:
        return False, [f"{label}: cannot check out {target.commit} ({exc}); keeping {_short(head)}"]
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
            return False, [f"{label}: cannot tell the default branch of {shown}; keeping {_short(head)}"]
        remote_ref = f"refs/remotes/origin/{branch}"
        git.fetch(path, target.url, f"+refs/heads/{branch}:{remote_ref}")
    except GitError as exc:
        if target.branch and (available := _missing(git, target.url, target.branch)) is not None:
            raise _BranchMissing(target.branch, available) from None
        return False, [f"{label}: cannot fetch ({exc}); keeping {_short(head)}"]
    git.set_origin(path, target.url)
    remote = git.rev_parse(path, remote_ref)
    if current_branch(path) != branch:
        if git.is_dirty(path):
            return False, [f"{label}: local changes; not switching to {branch}, keeping {_short(head)}"]
        try:
            if git.has_commit(path, f"refs/heads/{branch}"):
                git.run(path, "checkout", "-q", branch, op="checkout")
            else:
                git.run(path, "checkout", "-q", "--no-track", "-b", branch, remote_ref, op="checkout")
        except GitError as exc:
            return False, [f"{label}: cannot switch to branch {branch} ({exc}); keeping {_short(head)}"]
        switched = read_head(path) != head
        head = read_head(path)
    else:
        switched = False
    if head == remote:
        return switched, []
    if head and git.is_ancestor(path, head, remote):
        try:
            git.run(path, "merge", "--ff-only", "-q", remote, op="merge --ff-only")
        except GitError as exc:
            return False, [f"{label}: cannot fast-forward to {_short(remote)} ({exc}); kept {_short(head)}"]
        return True, []
    if head and git.is_ancestor(path, remote, head):
        log.info("%s: local branch %s is ahead of origin; keeping it", label, branch)
        return switched, []
    if kind == "code" and not git.is_dirty(path):
        # The code tree is managed, not edited: follow a force-pushed branch.
        git.run(path, "checkout", "-q", "-B", branch, remote_ref, op="checkout")
        return True, [f"{label}: branch {branch} was rewritten upstream; reset to {_short(remote)}"]
    return False, [
        f"{label}: branch {branch} has diverged from origin; keeping local {_short(head)} (fast-forward only)"
    ]


def _missing(git: GitClient, url: str, branch: str) -> list[str] | None:
    """The branches ``url`` has when ``branch`` is not among them; None when it is, or unknown."""
    try:
        available = git.remote_branches(url)
    except GitError:
        return None
    return None if branch in available else available


def _apply(git: GitClient, path: Path, target: Target, label: str, kind: str) -> tuple[bool, list[str]]:
    if target.commit:
        return _pin(git, path, target, label)
    return _follow(git, path, target, label, kind)


def _apply_safely(
    git: GitClient, path: Path, target: Target, label: str, kind: str
) -> tuple[bool, list[str]]:
    """:func:`_apply`, but an unexpected git failure keeps the checkout with a warning."""
    try:
        return _apply(git, path, target, label, kind)
    except GitError as exc:
        return False, [f"{label}: cannot update ({exc}); keeping {_short(read_head(path))}"]


def _adopt_checkout(git: GitClient, path: Path, rev: str, kind: str, record: dict[str, str]) -> list[str]:
    """Populate an adopted folder: code is forced to ``rev``; config keeps locally edited files."""
    if kind == "code":
        git.run(path, "checkout", "-q", "-f", rev, op="checkout")
        return []
    if rev != "HEAD":
        git.run(path, "update-ref", "--no-deref", "HEAD", rev, op="update-ref")
    git.run(path, "reset", "-q", op="reset")
    listing = git.run(path, "ls-tree", "-r", "-z", "--name-only", "HEAD", op="ls-tree")
    tracked = [p for p in listing.split("\0") if p]
    restore = [rel for rel in tracked if not (path / rel).exists() or _sha256(path / rel) == record.get(rel)]
    for i in range(0, len(restore), 200):
        git.run(path, "checkout", "-q", "--", *restore[i : i + 200], op="checkout")
    status = git.run(path, "status", "--porcelain", "--untracked-files=no", op="status")
    kept = [line[3:] for line in status.splitlines() if line.strip()]
    if kept:
        shown = ", ".join(kept[:5])
        return [f"shared: kept {len(kept)} locally edited file(s) over the repo's version: {shown}"]
    return []


def _fresh(git: GitClient, path: Path, target: Target, kind: str, record: dict[str, str]) -> list[str]:
    """Clone ``target`` into ``path`` atomically; adopt the folder when it already has content."""
    adopting = path.exists() and any(path.iterdir())
    with staging(path) as tmp:
        if target.commit:
            git.clone(target.url, tmp, shallow=True, no_checkout=True)
            git.ensure_commit(tmp, target.url, target.commit)
            rev = target.commit
            if not adopting:
                git.run(tmp, "checkout", "-q", "--detach", rev, op="checkout")
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


def _result(
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


# ---------------------------------------------------------------- public
def _previous(state: dict[str, Any], key: str) -> dict[str, Any]:
    entry = state.get(key)
    return entry if isinstance(entry, dict) else {}


def _last_fetch(previous: dict[str, Any]) -> float | None:
    """When the remote last answered, from the previous sync's record (None: never, or unreadable)."""
    value = previous.get("fetched_at")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _quiet(settings: Settings, previous: dict[str, Any], target: Target, now: float) -> bool:
    """True when a warm ``up`` must not touch the network: the same URL and ref as the last sync,
    and COMFY_UPDATE says no update is due yet."""
    same_config = previous.get("wanted") == target.ref and previous.get("wanted_url") == redact_url(target.url)
    return same_config and not update_due(
        settings.comfy_update, settings.comfy_update_interval, _last_fetch(previous), now
    )


def _record(layout: Layout, key: str, result: RepoResult, target: Target, state: dict[str, Any]) -> None:
    _save_state(layout, key, result, state)
    state[key]["wanted_url"] = redact_url(target.url)
    write_json(layout.state_dir / STATE_FILE, state)


def sync_comfy(
    settings: Settings,
    layout: Layout,
    *,
    git: GitClient | None = None,
    clock: Callable[[], float] = time.time,
) -> RepoResult:
    """Bring ``$ROOT/ComfyUI`` to the configured fork branch or commit (see the module doc).

    Raises:
        ConfigError: COMFY_REPO_URL / COMFY_BRANCH / COMFY_COMMIT / COMFY_FALLBACK_URL is unsafe.
        MissingBranchError: COMFY_BRANCH is not in the fork and COMFY_ON_MISSING_BRANCH=fail.
        ProvisionError: there is no checkout and neither the repo nor the fallback can be cloned.
    """
    target = comfy_target(settings)
    fb = fallback_target(settings)
    check_target(target, "COMFY_REPO_URL", "COMFY_BRANCH", "COMFY_COMMIT")
    check_target(fb, "COMFY_FALLBACK_URL", "COMFY_BRANCH", "COMFY_COMMIT")
    git = git or git_client(settings, layout)
    path = layout.comfy_dir
    state = _state(layout)
    previous = _previous(state, "comfy")
    now = clock()
    fetched_at = _last_fetch(previous)
    remove_partials(path.parent)
    warnings: list[str] = []
    fail = settings.comfy_on_missing_branch == "fail"
    if read_head(path):
        if _quiet(settings, previous, target, now):
            log.info("ComfyUI: no update due (COMFY_UPDATE=%s); no fetch", settings.comfy_update)
            changed = False
        else:
            try:
                changed, warnings = _apply_safely(git, path, target, "ComfyUI", "code")
            except _BranchMissing as missing:
                line = missing_branch_line("ComfyUI", target.url, missing.branch, missing.available)
                kept = f"{current_branch(path) or 'detached'} @ {_short(read_head(path))}"
                if fail:
                    raise MissingBranchError(
                        f"{line}. Still checked out: {kept}. Set COMFY_BRANCH to an existing branch, "
                        "or COMFY_ON_MISSING_BRANCH=fallback to keep running it",
                        branch=missing.branch,
                        available=tuple(missing.available),
                    ) from None
                changed, warnings = False, [f"{line}; COMFY_ON_MISSING_BRANCH=fallback: keeping {kept}"]
                fetched_at = now  # the remote answered
            else:
                if not any(w.startswith("ComfyUI: cannot") for w in warnings):
                    fetched_at = now
        origin = origin_url(path)
        on_fallback_repo = not same_url(origin, target.url) and same_url(origin, fb.url)
        result = _result(
            path, fb if on_fallback_repo else target, on_fallback_repo, changed, warnings,
            wanted=target, fetched_at=fetched_at,
        )
        if result.fallback:
            log.error(
                "ComfyUI: running %s%s %s at %s, not the configured %s %s",
                "the FALLBACK " if on_fallback_repo else "",
                result.url,
                result.ref,
                _short(result.commit),
                redact_url(target.url),
                target.ref,
            )
    else:
        try:
            warnings += _fresh(git, path, target, "code", {})
            result = _result(path, target, False, True, warnings, fetched_at=now)
        except GitError as exc:
            available = _missing(git, target.url, target.branch) if target.branch else None
            if available is not None:
                line = missing_branch_line("ComfyUI", target.url, target.branch or "", available)
                if fail:
                    raise MissingBranchError(
                        f"{line}. Set COMFY_BRANCH to one of them, or COMFY_ON_MISSING_BRANCH=fallback "
                        f"to run {redact_url(fb.url)} at {fb.commit} instead",
                        branch=target.branch or "",
                        available=tuple(available),
                    ) from None
                reason = f"{line}; COMFY_ON_MISSING_BRANCH=fallback"
            else:
                reason = f"ComfyUI: cannot clone {redact_url(target.url)} ({exc})"
                if same_url(target.url, fb.url) and target.commit == fb.commit:
                    raise ProvisionError(reason) from None
            message = f"{reason}; FALLING BACK to {redact_url(fb.url)} at {fb.commit}"
            log.error("%s", message)
            try:
                warnings += _fresh(git, path, fb, "code", {})
            except GitError as exc2:
                raise ProvisionError(
                    f"ComfyUI: cannot clone {redact_url(target.url)} ({exc}) nor the fallback "
                    f"{redact_url(fb.url)} ({exc2}): check COMFY_REPO_URL, COMFY_FALLBACK_URL and the network"
                ) from None
            result = _result(path, fb, True, True, [message, *warnings], wanted=target, fetched_at=now)
    for w in result.warnings:
        log.warning("%s", w)
    _record(layout, "comfy", result, target, state)
    return result


def sync_shared(
    settings: Settings,
    layout: Layout,
    *,
    git: GitClient | None = None,
    clock: Callable[[], float] = time.time,
) -> RepoResult:
    """Bring ``$ROOT/shared`` to SHARED_REPO_URL (fast-forward only), else the shipped defaults.

    Raises:
        ConfigError: SHARED_REPO_URL / SHARED_BRANCH / SHARED_COMMIT is unsafe.
    """
    target = shared_target(settings)
    path = layout.shared_dir
    state = _state(layout)
    record: dict[str, str] = dict(state.get("shipped") or {})
    remove_partials(path.parent)
    if target is None:
        if read_head(path):
            w = "SHARED_REPO_URL is empty: keeping the existing shared checkout as it is"
            log.warning("%s", w)
            origin = redact_url(origin_url(path) or "")
            result = RepoResult(path, origin, "", read_head(path) or "", False, False, (w,))
        else:
            written = install_shipped_defaults(path, record)
            w = f"SHARED_REPO_URL is empty: using the shipped defaults from {shipped_shared_dir()}"
            log.warning("%s", w)
            result = RepoResult(path, SHIPPED, "", "", False, bool(written), (w,))
        state["shipped"] = record
        _save_state(layout, "shared", result, state)
        return result
    check_target(target, "SHARED_REPO_URL", "SHARED_BRANCH", "SHARED_COMMIT")
    git = git or git_client(settings, layout)
    previous = _previous(state, "shared")
    now = clock()
    fetched_at = _last_fetch(previous)
    if read_head(path):
        if _quiet(settings, previous, target, now):
            log.info("shared: no update due (COMFY_UPDATE=%s); no fetch", settings.comfy_update)
            changed, warnings = False, list[str]()
        else:
            try:
                changed, warnings = _apply_safely(git, path, target, "shared", "config")
            except _BranchMissing as missing:
                line = missing_branch_line("shared", target.url, missing.branch, missing.available)
                changed, warnings = False, [f"{line}; keeping {_short(read_head(path))}"]
            if not any(w.startswith("shared: cannot") for w in warnings):
                fetched_at = now
        result = _result(path, target, False, changed, warnings, fetched_at=fetched_at)
    else:
        try:
            warnings = _fresh(git, path, target, "config", record)
            result = _result(path, target, False, True, warnings, fetched_at=now)
        except GitError as exc:
            written = install_shipped_defaults(path, record)
            w = (
                f"shared: cannot clone {redact_url(target.url)} ({exc}); using the shipped defaults "
                f"from {shipped_shared_dir()}"
            )
            log.error("%s", w)
            result = RepoResult(path, SHIPPED, target.ref, "", True, bool(written), (w,), wanted=target.ref)
    for w in result.warnings:
        if result.url != SHIPPED:
            log.warning("%s", w)
    state["shipped"] = record
    _record(layout, "shared", result, target, state)
    return result


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
    state = _state(layout)
    return {k: v for k, v in state.items() if k in {"comfy", "shared"}}
