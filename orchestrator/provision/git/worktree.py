"""Reading a work tree through GitPython (HEAD, branch, origin, shallow) and the siblings a clone is built in.

The reads open a ``git.Repo`` and read its refs and config the way GitPython does: loose and
packed refs, symbolic refs, ``gitdir:`` files (submodules, worktrees) and ``commondir``. No
subprocess runs, so a warm start can look at 64 nodes in milliseconds. A repository whose refs
are in a reftable (``extensions.refStorage=reftable``, a ``reftable/`` folder) cannot be read
from files; there the reads ask git itself (``rev-parse``, ``symbolic-ref``) through the runner
seam, under :data:`READ_TIMEOUT`.

A checkout being adopted (see :meth:`GitClient.adopt`) has :data:`ADOPT_MARKER` in its git dir
and reads as having no HEAD until the adoption finishes.
"""

from __future__ import annotations

import contextlib
import secrets as secrets_mod
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.provision.git.command import BASE_ENV, GitError, git_runner, import_gitpython
from orchestrator.provision.git.urls import SHA_RE

if TYPE_CHECKING:
    import git as gitpython_types

PARTIAL_MARK = ".partial-"
ADOPT_MARKER = "orchestrator-adopting"
READ_TIMEOUT = 30.0  # seconds, for a read that has to ask git (reftable repositories)
HEADS = "refs/heads/"
ORIGIN = "refs/remotes/origin/"


@contextlib.contextmanager
def opened(path: Path) -> Iterator[gitpython_types.Repo | None]:
    """GitPython's ``Repo`` for the work tree ``path`` (with a ``.git`` of its own), else None."""
    if not (path / ".git").exists():
        yield None
        return
    try:
        git = import_gitpython()
    except GitError:
        yield None
        return
    try:
        repo = git.Repo(path)  # reads refs and config only: its object database is never opened
    except (git.exc.GitError, OSError, ValueError):
        yield None
        return
    with repo:
        yield repo


def _reftable(repo: gitpython_types.Repo) -> bool:
    return (Path(repo.common_dir) / "reftable").is_dir()


def _ask_git(repo: gitpython_types.Repo, *args: str) -> str | None:
    """A read that only git itself can answer (reftable); None when it fails."""
    try:
        return git_runner(args, cwd=Path(repo.working_tree_dir or repo.git_dir), timeout=READ_TIMEOUT, env=BASE_ENV)
    except GitError:
        return None


def _symbolic_target(repo: gitpython_types.Repo, name: str) -> str | None:
    """The ref that the symbolic ref ``name`` points at (``refs/heads/main``), or None."""
    if _reftable(repo):
        out = _ask_git(repo, "symbolic-ref", "-q", name)
        return out.strip() if out else None
    git = import_gitpython()
    try:
        return str(git.SymbolicReference(repo, name).reference.path)
    except (TypeError, ValueError, OSError):  # missing, detached, unreadable
        return None


def git_dir(path: Path) -> Path | None:
    """The repository directory of the work tree ``path`` (``.git`` dir or ``gitdir:`` file)."""
    with opened(path) as repo:
        return None if repo is None else Path(repo.git_dir)


def read_head(path: Path) -> str | None:
    """The commit checked out in ``path``; None when there is no repository or no valid HEAD.

    A checkout being adopted (see :func:`GitClient.adopt`) counts as having no HEAD.
    """
    with opened(path) as repo:
        if repo is None or (Path(repo.git_dir) / ADOPT_MARKER).exists():
            return None
        if _reftable(repo):
            value = _ask_git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
        else:
            try:
                value = import_gitpython().SymbolicReference.dereference_recursive(repo, "HEAD")
            except (ValueError, OSError):
                return None
        value = (value or "").strip()
        return value if SHA_RE.match(value) else None


def current_branch(path: Path) -> str | None:
    """The checked-out branch name, None when detached or unreadable."""
    with opened(path) as repo:
        target = None if repo is None else _symbolic_target(repo, "HEAD")
    return target[len(HEADS) :] if target and target.startswith(HEADS) else None


def remote_default_branch(path: Path) -> str | None:
    """The branch ``refs/remotes/origin/HEAD`` points at (recorded by clone), if known."""
    with opened(path) as repo:
        target = None if repo is None else _symbolic_target(repo, "refs/remotes/origin/HEAD")
    return target[len(ORIGIN) :] if target and target.startswith(ORIGIN) else None


def origin_url(path: Path) -> str | None:
    """``remote.origin.url`` from the repository's own config (not the user's or the system's)."""
    with opened(path) as repo:
        if repo is None:
            return None
        with repo.config_reader("repository") as reader:
            value = reader.get_value('remote "origin"', "url", "")
    return str(value) or None


def is_shallow(path: Path) -> bool:
    with opened(path) as repo:
        return repo is not None and (Path(repo.common_dir) / "shallow").exists()


def partial_name(name: str) -> str:
    """Name of the temp sibling a clone of ``name`` goes into (ComfyUI skips ``*.disabled``)."""
    return f".{name}{PARTIAL_MARK}{secrets_mod.token_hex(4)}.disabled"


def remove_partials(parent: Path) -> list[Path]:
    """Delete clones left half-finished by a killed run (temp siblings); return what went."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(".") and PARTIAL_MARK in entry.name and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def staging(dest: Path) -> Iterator[Path]:
    """A temp sibling of ``dest`` to build a checkout in; removed unless the caller moved it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / partial_name(dest.name)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
