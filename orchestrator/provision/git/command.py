"""The seam every git command goes through, and GitPython's command object bound to it.

    ProvisionError               (orchestrator.core.errors)
    └── GitError                 a git command failed: op, url, detail, transient, timed_out
        └── SshKeyError          an ssh URL needs a key and CUT_PK_1..3 / SSH_PRIVATE_KEY is missing or bad

A :class:`GitRunner` runs ``git *args`` and returns stdout. :func:`git_runner` (production) runs
git through :func:`orchestrator.machine.runner.run`; tests pass a runner that records calls or
injects failures. :func:`runner_git` builds GitPython's ``Git`` command object whose ``execute``
goes through a caller's runner, so ``repo.git.<command>(..., kill_after_timeout=s)`` obeys our
deadline with our process handling.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.core.errors import ProvisionError

if TYPE_CHECKING:
    import git as gitpython_types

BASE_ENV: Mapping[str, str] = {
    "GIT_TERMINAL_PROMPT": "0",  # never wait for a password on a headless machine
    "GCM_INTERACTIVE": "never",
    "LC_ALL": "C",  # English messages: the transient/permanent classifier reads them
    "LANGUAGE": "C",
}
# Needed only to clone submodules from file:// or local paths (mirrors and tests).
FILE_PROTOCOL = ("-c", "protocol.file.allow=always")


class GitError(ProvisionError):
    """A git command failed; ``transient`` says whether retrying may help."""

    def __init__(
        self,
        message: str,
        *,
        op: str = "",
        url: str = "",
        detail: str = "",
        status: int | None = None,
        transient: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.op = op
        self.url = url
        self.detail = detail
        self.status = status
        self.transient = transient
        self.timed_out = timed_out


class SshKeyError(GitError):
    """The SSH key needed by an ssh URL is missing or cannot be decoded."""


class GitRunner(Protocol):
    def __call__(
        self, args: Sequence[str], *, cwd: Path | None, timeout: float | None, env: Mapping[str, str]
    ) -> str:
        """Run ``git *args``; return stdout. Raise :class:`GitError` (status, detail, timed_out)."""
        ...


def git_runner(
    args: Sequence[str], *, cwd: Path | None, timeout: float | None, env: Mapping[str, str]
) -> str:
    """Run git (the production :class:`GitRunner`).

    Through :func:`orchestrator.machine.runner.run`: git runs in its own session and at the
    deadline its whole tree is killed; output goes through temporary files, so an ssh
    ControlPersist master or a hook's background helper holding git's stdout cannot keep us
    waiting; and git dies with us (PR_SET_PDEATHSIG) when ``up`` is killed.
    Environment: ours, with ``LC_ALL=C`` (parsable messages), plus ``env``.
    """
    from orchestrator.machine import runner as subproc

    full_env = {**os.environ, "LANGUAGE": "C", "LC_ALL": "C", **env}
    try:
        done = subproc.run(["git", *args], cwd=cwd, env=full_env, timeout=timeout, merge_stderr=False)
    except FileNotFoundError:
        if cwd is not None and not os.path.isdir(cwd):
            raise GitError(f"cannot run git in {cwd}: no such folder") from None
        raise GitError("git is not installed: install git (apt-get install git)") from None
    except OSError as exc:
        raise GitError(f"cannot run git: {exc.strerror or exc}") from None
    stderr = done.stderr.decode(errors="replace").strip()
    if done.timed_out:
        detail = f"{stderr}\ntimed out after {timeout:g}s".strip()
        raise GitError(detail, detail=detail, status=None, timed_out=True)
    if done.returncode != 0:
        message = stderr or f"exit status {done.returncode}"
        raise GitError(message, detail=stderr, status=done.returncode)
    out = done.stdout.decode(errors="replace")
    return out[:-1] if out.endswith("\n") else out


def import_gitpython() -> Any:
    """The GitPython package, imported on first use.

    Importing GitPython runs ``git version`` (and fails when git is missing), so no module of
    ours imports it at import time: ``orchestrator --help`` must work on a machine without git.

    Raises:
        GitError: git is not installed.
    """
    try:
        import git
    except ImportError:
        raise GitError("git is not installed: install git (apt-get install git)") from None
    return git


# (args, cwd, timeout) -> stdout: what a GitPython command object hands its commands to.
Execute = Callable[[Sequence[str], Path | None, float | None], str]


def subcommand(args: Sequence[str]) -> str:
    """``checkout`` for ``["-c", "x=y", "checkout", "-q"]``: the git command, for messages."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in {"-c", "-C"}:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return "git"


@functools.cache
def _runner_git_class() -> Callable[[Path | None, Execute], gitpython_types.Git]:
    import_gitpython()  # a missing git becomes a GitError
    import git

    class RunnerGit(git.Git):
        """GitPython's ``Git`` whose ``execute`` goes through our runner seam.

        ``kill_after_timeout`` (GitPython's own deadline argument) becomes the runner's
        timeout; only the plain "run and return stdout" form is supported: streaming
        (``as_process``, ``output_stream``, ``istream``) would need pipes that outlive the
        deadline, so we never ask GitPython for it.
        """

        def __init__(self, working_dir: Path | None, execute: Execute) -> None:
            super().__init__(None if working_dir is None else str(working_dir))
            self._orchestrator_execute = execute

        def execute(  # type: ignore[override]  # only the run-and-return-stdout form
            self,
            command: str | Sequence[Any],
            *,
            kill_after_timeout: float | None = None,
            as_process: bool = False,
            istream: Any = None,
            output_stream: Any = None,
            **_ignored: Any,
        ) -> str:
            if isinstance(command, str) or as_process or istream is not None or output_stream is not None:
                raise GitError("git: streaming GitPython commands are not supported here")
            argv = [str(a) for a in command]
            args = argv[1:] if argv and os.path.basename(argv[0]).startswith("git") else argv
            cwd = Path(self._working_dir) if self._working_dir else None
            return self._orchestrator_execute(args, cwd, kill_after_timeout)

    return RunnerGit


def runner_git(working_dir: Path | None, execute: Execute) -> gitpython_types.Git:
    """GitPython's command object for ``working_dir`` that runs every command with ``execute``."""
    return _runner_git_class()(working_dir, execute)
