"""Syncing ``$ROOT/ComfyUI`` and ``$ROOT/shared`` (policies in the package docstring)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from orchestrator.core.errors import ProvisionError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.provision.git.client import GitClient
from orchestrator.provision.git.command import GitError
from orchestrator.provision.git.urls import redact_url, same_url
from orchestrator.provision.git.worktree import current_branch, origin_url, read_head, remove_partials
from orchestrator.provision.repos.shipped import has_shared_config, install_shipped_defaults, shipped_shared_dir
from orchestrator.provision.repos.state import last_fetch, load_state, previous_entry, record_result, save_state
from orchestrator.provision.repos.targets import (
    SHIPPED,
    MissingBranchError,
    RepoResult,
    Target,
    check_target,
    comfy_target,
    fallback_target,
    git_client,
    missing_branch_line,
    shared_target,
    update_due,
)
from orchestrator.provision.repos.update import (
    BranchMissing,
    apply_safely,
    fresh_clone,
    missing_branches,
    result_from_tree,
    short,
)

log = logging.getLogger(__name__)


def _quiet(settings: Settings, previous: dict[str, Any], target: Target, now: float) -> bool:
    """True when a warm ``up`` must not touch the network: the same URL and ref as the last sync,
    and COMFY_UPDATE says no update is due yet."""
    same_config = previous.get("wanted") == target.ref and previous.get("wanted_url") == redact_url(target.url)
    return same_config and not update_due(
        settings.comfy_update, settings.comfy_update_interval, last_fetch(previous), now
    )


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
    state = load_state(layout)
    previous = previous_entry(state, "comfy")
    now = clock()
    fetched_at = last_fetch(previous)
    remove_partials(path.parent)
    warnings: list[str] = []
    fail = settings.comfy_on_missing_branch == "fail"
    if read_head(path):
        if _quiet(settings, previous, target, now):
            log.info("ComfyUI: no update due (COMFY_UPDATE=%s); no fetch", settings.comfy_update)
            changed = False
        else:
            try:
                changed, warnings = apply_safely(git, path, target, "ComfyUI", "code")
            except BranchMissing as missing:
                line = missing_branch_line("ComfyUI", target.url, missing.branch, missing.available)
                kept = f"{current_branch(path) or 'detached'} @ {short(read_head(path))}"
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
        result = result_from_tree(
            path, fb if on_fallback_repo else target, on_fallback_repo, changed, warnings,
            wanted=target, fetched_at=fetched_at,
        )
        if result.fallback:
            log.error(
                "ComfyUI: running %s%s %s at %s, not the configured %s %s",
                "the FALLBACK " if on_fallback_repo else "",
                result.url,
                result.ref,
                short(result.commit),
                redact_url(target.url),
                target.ref,
            )
    else:
        try:
            warnings += fresh_clone(git, path, target, "code", {})
            result = result_from_tree(path, target, False, True, warnings, fetched_at=now)
        except GitError as exc:
            available = missing_branches(git, target.url, target.branch) if target.branch else None
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
            log.error("%s", message)  # noqa: TRY400 - a message for the operator, not a traceback
            try:
                warnings += fresh_clone(git, path, fb, "code", {})
            except GitError as exc2:
                raise ProvisionError(
                    f"ComfyUI: cannot clone {redact_url(target.url)} ({exc}) nor the fallback "
                    f"{redact_url(fb.url)} ({exc2}): check COMFY_REPO_URL, COMFY_FALLBACK_URL and the network"
                ) from None
            result = result_from_tree(path, fb, True, True, [message, *warnings], wanted=target, fetched_at=now)
    for w in result.warnings:
        log.warning("%s", w)
    record_result(layout, "comfy", result, target, state)
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
    state = load_state(layout)
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
        save_state(layout, "shared", result, state)
        return result
    check_target(target, "SHARED_REPO_URL", "SHARED_BRANCH", "SHARED_COMMIT")
    git = git or git_client(settings, layout)
    previous = previous_entry(state, "shared")
    now = clock()
    fetched_at = last_fetch(previous)
    if read_head(path):
        if _quiet(settings, previous, target, now):
            log.info("shared: no update due (COMFY_UPDATE=%s); no fetch", settings.comfy_update)
            changed, warnings = False, list[str]()
        else:
            try:
                changed, warnings = apply_safely(git, path, target, "shared", "config")
            except BranchMissing as missing:
                line = missing_branch_line("shared", target.url, missing.branch, missing.available)
                changed, warnings = False, [f"{line}; keeping {short(read_head(path))}"]
            if not any(w.startswith("shared: cannot") for w in warnings):
                fetched_at = now
        result = result_from_tree(path, target, False, changed, warnings, fetched_at=fetched_at)
    else:
        try:
            warnings = fresh_clone(git, path, target, "config", record)
            result = result_from_tree(path, target, False, True, warnings, fetched_at=now)
        except GitError as exc:
            written = install_shipped_defaults(path, record)
            w = (
                f"shared: cannot clone {redact_url(target.url)} ({exc}); using the shipped defaults "
                f"from {shipped_shared_dir()}"
            )
            log.error("%s", w)  # noqa: TRY400 - a message for the operator, not a traceback
            result = RepoResult(path, SHIPPED, target.ref, "", True, bool(written), (w,), wanted=target.ref)
    for w in result.warnings:
        if result.url != SHIPPED:
            log.warning("%s", w)
    state["shipped"] = record
    record_result(layout, "shared", result, target, state)
    return result


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
