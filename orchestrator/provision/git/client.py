"""Git with timeouts, retries, SSH keys and atomic clones: :class:`GitClient`.

Every command goes through the client's :class:`~orchestrator.provision.git.command.GitRunner`
(``git_runner`` in production). Local commands are GitPython calls, ``client.cmd(path).checkout(...)``,
on a GitPython ``Git`` whose ``execute`` is bound to that runner; the
network commands (clone, fetch, ls-remote, submodule update) add the retry policy (tenacity:
exponential backoff, bounded attempts, transient errors only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tenacity

from orchestrator.provision.git.command import (
    BASE_ENV,
    FILE_PROTOCOL,
    GitError,
    GitRunner,
    SshKeyError,
    git_runner,
    runner_git,
    subcommand,
)
from orchestrator.provision.git.ssh import SshKey
from orchestrator.provision.git.urls import is_local, is_transient, needs_ssh, redact_url, url_host
from orchestrator.provision.git.worktree import ADOPT_MARKER, git_dir, is_shallow, origin_url

if TYPE_CHECKING:
    import git as gitpython_types

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for transient network failures."""

    attempts: int = 4  # tries in all
    initial: float = 2.0  # seconds before the first retry, doubled each time
    maximum: float = 30.0  # longest wait between tries


def _last_lines(text: str, n: int = 3) -> str:
    """The lines that say what went wrong (fatal:/error:/remote:/ssh:), else the last ``n``."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    important = [ln for ln in lines if ln.lower().startswith(("fatal:", "error:", "remote:", "ssh:"))]
    return " | ".join((important or lines)[:n] if important else lines[-n:])


class GitCommands:
    """How every git command runs: environment, SSH key, timeout, redacted errors, retries. Thread-safe."""

    def __init__(
        self,
        *,
        timeout: float = 300.0,
        runner: GitRunner = git_runner,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        ssh: SshKey | None = None,
        redact: Callable[[str], str] = lambda s: s,
    ) -> None:
        self.timeout = timeout
        self.runner = runner
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.ssh = ssh
        self._redact = redact
        # Hosts whose retries were exhausted in this run: later operations try them once, so
        # 64 nodes on an unreachable github.com cost one backoff, not 64.
        self._down: set[str] = set()
        self._down_lock = threading.Lock()

    def redact(self, text: str) -> str:
        return self._redact(redact_url(text))

    def _env(self, url: str | None) -> dict[str, str]:
        env = dict(BASE_ENV)
        if url and needs_ssh(url):
            if self.ssh is None:
                raise SshKeyError(f"{redact_url(url)} needs an SSH key: set CUT_PK_1..3 or SSH_PRIVATE_KEY")
            env.update(self.ssh.env(url))
        return env

    def _call(
        self, args: Sequence[str], *, cwd: Path | None, timeout: float | None, url: str | None, op: str
    ) -> str:
        wait = self.timeout if timeout is None else max(1.0, min(timeout, self.timeout))
        try:
            return self.runner(args, cwd=cwd, timeout=wait, env=self._env(url))
        except SshKeyError:
            raise
        except GitError as exc:
            full = exc.detail or exc.message
            detail = self.redact(_last_lines(full))
            shown = self.redact(url) if url else ""
            where = f" {shown}" if shown else (f" in {cwd}" if cwd else "")
            if exc.timed_out:
                message = f"git {op}{where}: timed out after {wait:g}s (GIT_TIMEOUT / NODE_TIMEOUT)"
            else:
                message = f"git {op}{where} failed: {detail}"
            raise GitError(
                message,
                op=op,
                url=shown,
                detail=detail,
                status=exc.status,
                transient=is_transient(full, timed_out=exc.timed_out),
                timed_out=exc.timed_out,
            ) from None

    def run(self, path: Path | None, *args: str, op: str = "", timeout: float | None = None) -> str:
        """A local git command in ``path`` (no retries)."""
        return self._call(args, cwd=path, timeout=timeout, url=None, op=op or subcommand(args))

    def cmd(self, path: Path | None) -> gitpython_types.Git:
        """GitPython's command object for ``path``, bound to this client.

        ``client.cmd(path).checkout("-q", rev, kill_after_timeout=s)`` runs ``git checkout -q rev``
        through the runner seam, with this client's environment, error messages and timeout
        (``kill_after_timeout`` shortens it, never lengthens it). No retries: local commands.
        """

        def execute(args: Sequence[str], cwd: Path | None, timeout: float | None) -> str:
            return self._call(args, cwd=cwd, timeout=timeout, url=None, op=subcommand(args))

        return runner_git(path, execute)

    def network(
        self,
        path: Path | None,
        *args: str,
        url: str,
        op: str,
        timeout: float | None = None,
        reset: Callable[[], None] | None = None,
    ) -> str:
        """A git command that talks to ``url``: timeout, and retries while the error is transient."""

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "git %s %s: attempt %d failed (%s); retrying",
                op,
                self.redact(url),
                state.attempt_number,
                exc,
            )
            if reset is not None:
                reset()

        host = url_host(url)
        with self._down_lock:
            attempts = 1 if host in self._down else max(1, self.retry.attempts)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_exponential(multiplier=self.retry.initial, max=self.retry.maximum),
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, GitError) and e.transient),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    out = self._call(args, cwd=path, timeout=timeout, url=url, op=op)
        except GitError as exc:
            if exc.transient and host and attempts > 1:
                with self._down_lock:
                    self._down.add(host)
                log.warning(
                    "%s looks unreachable: later operations on it are tried once, without retries", host
                )
            raise
        if host:
            with self._down_lock:
                self._down.discard(host)
        return out



class GitClient(GitCommands):
    """Git with timeouts, retries, ssh keys and atomic clones: the operations callers use. Thread-safe."""

    def clone(
        self,
        url: str,
        dest: Path,
        *,
        branch: str | None = None,
        shallow: bool = False,
        recursive: bool = False,
        no_checkout: bool = False,
        timeout: float | None = None,
    ) -> None:
        """``git clone`` into ``dest``, which must not exist (callers clone into :func:`staging`)."""
        args: list[str] = [*(FILE_PROTOCOL if recursive and is_local(url) else ()), "clone", "--quiet"]
        if branch:
            args += ["--branch", branch]
        if shallow:
            args += ["--depth", "1"]
        if no_checkout:
            args += ["--no-checkout"]
        elif recursive:
            args += ["--recurse-submodules"]
        args += ["--", url, str(dest)]

        def reset() -> None:
            shutil.rmtree(dest, ignore_errors=True)

        self.network(dest.parent, *args, url=url, op="clone", timeout=timeout, reset=reset)

    def fetch(
        self,
        path: Path,
        url: str,
        *refspecs: str,
        timeout: float | None = None,
        depth: int | None = None,
        unshallow: bool = False,
    ) -> None:
        args = ["fetch", "--quiet", "--no-tags"]
        if depth:
            args.append(f"--depth={depth}")
        elif unshallow and is_shallow(path):
            args.append("--unshallow")
        self.network(path, *args, "--", url, *refspecs, url=url, op="fetch", timeout=timeout)

    def has_commit(self, path: Path, rev: str) -> bool:
        try:
            self.cmd(path).cat_file("-e", f"{rev}^{{commit}}")
        except GitError:
            return False
        return True

    def ensure_commit(self, path: Path, url: str, commit: str, *, timeout: float | None = None) -> None:
        """Make ``commit`` available locally, fetching it from ``url`` only when missing.

        A full commit id is fetched by itself (depth 1 in a shallow clone); an abbreviated
        one, or a server that refuses, costs a full fetch.
        """
        if self.has_commit(path, commit):
            return
        if len(commit) == 40:
            try:
                self.fetch(path, url, commit, timeout=timeout, depth=1 if is_shallow(path) else None)
            except GitError as exc:
                if exc.transient:
                    raise
        if not self.has_commit(path, commit):
            self.fetch(
                path,
                url,
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
                timeout=timeout,
                unshallow=True,
            )
        if not self.has_commit(path, commit):
            raise GitError(f"commit {commit} not found in {self.redact(url)}: check the commit id", url=url)

    def remote_branches(self, url: str, *, timeout: float | None = None) -> list[str]:
        """The branch names ``url`` has (``git ls-remote --heads``), sorted."""
        out = self.network(None, "ls-remote", "--heads", "--", url, url=url, op="ls-remote", timeout=timeout)
        prefix = "refs/heads/"
        names = {line.split("\t", 1)[1].strip() for line in out.splitlines() if "\t" in line}
        return sorted(n[len(prefix) :] for n in names if n.startswith(prefix))

    def set_origin(self, path: Path, url: str) -> None:
        current = origin_url(path)
        if current == url:
            return
        # Not GitPython's Remote.create/set_url: they expand $VARS and backslashes in the URL.
        self.cmd(path).remote("add" if current is None else "set-url", "--", "origin", url)

    def submodules(self, path: Path, url: str, *, timeout: float | None = None) -> None:
        """``git submodule update --init --recursive`` (network for new submodule commits)."""
        if not (path / ".gitmodules").exists():
            return
        config = FILE_PROTOCOL if is_local(url) else ()
        self.network(
            path,
            *config,
            "submodule",
            "update",
            "--init",
            "--recursive",
            "--quiet",
            url=url,
            op="submodule update",
            timeout=timeout,
        )

    def is_dirty(self, path: Path) -> bool:
        """Whether tracked files have local changes (``git status --porcelain --untracked-files=no``)."""
        return bool(str(self.cmd(path).status("--porcelain", "--untracked-files=no")).strip())

    def is_ancestor(self, path: Path, ancestor: str, rev: str) -> bool:
        try:
            self.cmd(path).merge_base("--is-ancestor", ancestor, rev)
        except GitError as exc:
            if exc.status == 1:
                return False
            raise
        return True

    def rev_parse(self, path: Path, rev: str) -> str:
        return str(self.cmd(path).rev_parse("--verify", "--quiet", f"{rev}^{{commit}}")).strip()

    def adopt(self, clone_dir: Path, dest: Path) -> None:
        """Move the repository of a fresh ``--no-checkout`` clone into the existing folder ``dest``.

        The marker file makes :func:`read_head` treat ``dest`` as broken until the caller has
        checked the files out and called :func:`finish_adopt`, so a kill in between is redone.
        """
        src = clone_dir / ".git"
        (src / ADOPT_MARKER).write_text("adopting\n")
        old = dest / ".git"
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        src.rename(old)

    @staticmethod
    def finish_adopt(dest: Path) -> None:
        gd = git_dir(dest)
        if gd is not None:
            with contextlib.suppress(FileNotFoundError):
                (gd / ADOPT_MARKER).unlink()
