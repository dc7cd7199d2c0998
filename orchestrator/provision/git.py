"""Git through the one command runner (subproc): a timeout on every command, retries on transient network errors only.

    ProvisionError               (orchestrator.core.errors)
    └── GitError                 a git command failed: op, url, detail, transient, timed_out
        └── SshKeyError          an ssh URL needs a key and CUT_PK_1..3 / SSH_PRIVATE_KEY is missing or bad

Every git command goes through one seam, a :class:`GitRunner` (``git_runner`` in
production: git run through :mod:`orchestrator.machine.runner`, killed with its tree at the
deadline). Tests pass a runner that
records calls or injects failures. :class:`GitClient` adds what every caller needs: the
environment (``GIT_TERMINAL_PROMPT=0``, ``GIT_SSH_COMMAND`` for ssh URLs), timeouts, the retry
policy (tenacity: exponential backoff, bounded attempts, transient errors only), atomic clones
(a temp sibling directory renamed into place) and cheap, subprocess-free reads of HEAD and of
the origin URL.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import logging
import os
import re
import secrets as secrets_mod
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import tenacity

from orchestrator.core.errors import ProvisionError
from orchestrator.machine.fs import atomic_write

log = logging.getLogger(__name__)

BASE_ENV: Mapping[str, str] = {
    "GIT_TERMINAL_PROMPT": "0",  # never wait for a password on a headless machine
    "GCM_INTERACTIVE": "never",
    "LC_ALL": "C",  # English messages: the transient/permanent classifier reads them
    "LANGUAGE": "C",
}
# Needed only to clone submodules from file:// or local paths (mirrors and tests).
FILE_PROTOCOL = ("-c", "protocol.file.allow=always")
PARTIAL_MARK = ".partial-"
ADOPT_MARKER = "orchestrator-adopting"
SHA_RE = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


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


# ---------------------------------------------------------------- pure helpers
_PERMANENT = re.compile(
    r"not found|does not exist|does not appear to be a git repository|authentication failed"
    r"|permission denied|could not read (username|password)|terminal prompts disabled"
    r"|couldn't find remote ref|invalid refspec|unknown revision|not a valid|bad object"
    r"|host key verification failed|returned error: 40[134]|not our ref",
    re.I,
)
_TRANSIENT = re.compile(
    r"could not resolve host|connection (timed out|refused|reset|closed)|operation timed out|timed out"
    r"|early eof|rpc failed|remote end hung up|failed to connect|temporary failure|try again"
    r"|network is unreachable|no route to host|tls|ssl|gnutls|http/2 stream|unexpected disconnect"
    r"|returned error: (5\d\d|429)|index-pack failed|broken pipe|did not complete in",
    re.I,
)


def is_transient(detail: str, *, timed_out: bool = False) -> bool:
    """Whether a git failure is worth retrying: network trouble and timeouts, not a missing repo."""
    if timed_out:
        return True
    if _PERMANENT.search(detail):
        return False
    return bool(_TRANSIENT.search(detail))


_USERINFO = re.compile(r"(://)[^/@\s]+@")


def redact_url(text: str) -> str:
    """Hide credentials embedded in URLs (``https://user:token@host`` → ``https://***@host``)."""
    return _USERINFO.sub(r"\1***@", text)


_SCP_LIKE = re.compile(r"^[A-Za-z0-9._~+-]+@[A-Za-z0-9.-]+:(?!//)")
_SCP_LIKE_HOST = re.compile(r"^[A-Za-z0-9._~+-]+@([A-Za-z0-9.-]+):(?!//)")


def needs_ssh(url: str) -> bool:
    """True for ``ssh://``, ``git+ssh://`` and scp-like ``git@host:path`` URLs."""
    lowered = url.lower()
    return lowered.startswith(("ssh://", "git+ssh://", "ssh+git://")) or bool(_SCP_LIKE.match(url))


_HOST = re.compile(r"^[A-Za-z0-9+.-]+://(?:[^/@]*@)?(\[[^\]]+\]|[^/:]+)")


def url_host(url: str) -> str | None:
    """The host a URL talks to; None for local repositories."""
    if is_local(url):
        return None
    match = _HOST.match(url) or _SCP_LIKE_HOST.match(url)
    return match.group(1).lower() if match else None


def is_local(url: str) -> bool:
    return url.startswith(("file://", "/"))


_TRANSPORT = re.compile(r"^[A-Za-z0-9+.-]+::")


def url_problem(url: str) -> str | None:
    """Why ``url`` is not an acceptable repository URL, or None.

    Allowed: ``https://``, ``ssh://``, scp-like ``user@host:path``, ``file://`` and absolute
    local paths. Rejected: ``ext::``-style transports, anything that git could read as an
    option (a leading ``-``), whitespace and control characters.
    """
    if not url:
        return "is empty"
    if url.startswith("-"):
        return "must not start with '-'"
    if _TRANSPORT.match(url):
        return "uses a '<transport>::' URL (such as ext::), which can run commands"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "must not contain whitespace or control characters"
    lowered = url.lower()
    if lowered.startswith(("https://", "ssh://", "git+ssh://", "ssh+git://")):
        return None
    if lowered.startswith("file://") or url.startswith("/"):
        return None
    if _SCP_LIKE.match(url):
        return None
    if lowered.startswith(("http://", "git://")):
        return "uses an unauthenticated transport: use https:// or ssh"
    return "is not an https://, ssh://, git@host:path, file:// URL or absolute path"


_BAD_REF = re.compile(r"\.\.|@\{|[\x00-\x20\x7f~^:?*\[\\]|//|/\.|\.lock$|\.$|/$")


def ref_problem(ref: str) -> str | None:
    """Why ``ref`` is not a safe branch name, or None (git check-ref-format, simplified)."""
    if not ref:
        return "is empty"
    if ref.startswith("-"):
        return "must not start with '-'"
    if ref.startswith(("/", ".")) or _BAD_REF.search(ref):
        return "is not a valid branch name"
    return None


_COMMIT = re.compile(r"^[0-9a-fA-F]{7,64}$")


def commit_problem(commit: str) -> str | None:
    """Why ``commit`` is not an acceptable commit id (7-64 hex digits), or None."""
    if commit.startswith("-"):
        return "must not start with '-'"
    if not _COMMIT.match(commit):
        return "must be a commit id of 7-40 hex digits (use branch for a branch or tag)"
    return None


def same_commit(head: str | None, wanted: str) -> bool:
    """Whether the full sha ``head`` is ``wanted`` (which may be abbreviated)."""
    return bool(head) and len(wanted) >= 7 and str(head).lower().startswith(wanted.lower())


def normalise_repo_url(url: str) -> str:
    """For comparisons: lower-case scheme/host part, no trailing slash or ``.git``."""
    value = url.strip().rstrip("/")
    if value.endswith(".git"):
        value = value[: -len(".git")]
    scheme, sep, rest = value.partition("://")
    if sep:
        host, slash, path = rest.partition("/")
        return f"{scheme.lower()}://{host.lower()}{slash}{path}"
    return value


def same_url(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and normalise_repo_url(a) == normalise_repo_url(b)


# ---------------------------------------------------------------- reading a checkout without git
def git_dir(path: Path) -> Path | None:
    """The repository directory of the work tree ``path`` (``.git`` dir or ``gitdir:`` file)."""
    dot = path / ".git"
    try:
        if dot.is_dir():
            return dot
        text = dot.read_text().strip()
    except OSError:
        return None
    if text.startswith("gitdir:"):
        target = Path(text[len("gitdir:") :].strip())
        return target if target.is_absolute() else (path / target).resolve()
    return None


def _common_dir(gd: Path) -> Path:
    try:
        rel = (gd / "commondir").read_text().strip()
    except OSError:
        return gd
    return (gd / rel).resolve()


def _resolve_ref(gd: Path, ref: str, depth: int = 0) -> str | None:
    if depth > 5:
        return None
    for base in (gd, _common_dir(gd)):
        try:
            value = (base / ref).read_text().strip()
        except OSError:
            continue
        if value.startswith("ref:"):
            return _resolve_ref(gd, value[4:].strip(), depth + 1)
        return value if SHA_RE.match(value) else None
    try:
        packed = (_common_dir(gd) / "packed-refs").read_text()
    except OSError:
        return None
    for line in packed.splitlines():
        sha, _, name = line.partition(" ")
        if name.strip() == ref and SHA_RE.match(sha):
            return sha
    return None


def read_head(path: Path) -> str | None:
    """The commit checked out in ``path``; None when there is no repository or no valid HEAD.

    Pure file reads (no subprocess), so a warm start can look at 64 nodes in milliseconds.
    A checkout being adopted (see :func:`GitClient.adopt`) counts as having no HEAD.
    """
    gd = git_dir(path)
    if gd is None or (gd / ADOPT_MARKER).exists():
        return None
    try:
        head = (gd / "HEAD").read_text().strip()
    except OSError:
        return None
    if head.startswith("ref:"):
        return _resolve_ref(gd, head[4:].strip())
    return head if SHA_RE.match(head) else None


def current_branch(path: Path) -> str | None:
    """The checked-out branch name, None when detached or unreadable."""
    gd = git_dir(path)
    if gd is None:
        return None
    try:
        head = (gd / "HEAD").read_text().strip()
    except OSError:
        return None
    prefix = "ref: refs/heads/"
    return head[len(prefix) :] if head.startswith(prefix) else None


def remote_default_branch(path: Path) -> str | None:
    """The branch ``refs/remotes/origin/HEAD`` points at (recorded by clone), if known."""
    gd = git_dir(path)
    if gd is None:
        return None
    try:
        value = (_common_dir(gd) / "refs/remotes/origin/HEAD").read_text().strip()
    except OSError:
        return None
    prefix = "ref: refs/remotes/origin/"
    return value[len(prefix) :] if value.startswith(prefix) else None


_SECTION = re.compile(r'^\[\s*remote\s+"([^"]+)"\s*\]')


def origin_url(path: Path) -> str | None:
    """``remote.origin.url`` read from the repository's config file (no subprocess)."""
    gd = git_dir(path)
    if gd is None:
        return None
    try:
        text = (_common_dir(gd) / "config").read_text()
    except OSError:
        return None
    in_origin = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            match = _SECTION.match(line)
            in_origin = bool(match and match.group(1) == "origin")
            continue
        if in_origin:
            key, sep, value = line.partition("=")
            if sep and key.strip().lower() == "url":
                return value.strip().strip('"')
    return None


def is_shallow(path: Path) -> bool:
    gd = git_dir(path)
    return gd is not None and (_common_dir(gd) / "shallow").exists()


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


# ---------------------------------------------------------------- SSH key
def decode_private_key(material: str) -> bytes:
    """The private key file content from PEM/OpenSSH text or its base64 encoding.

    Raises:
        ValueError: not a private key (the message never quotes the material).
    """
    text = material.strip()
    if "-----BEGIN" not in text:
        compact = "".join(text.split())
        try:
            raw = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
            text = raw.decode("ascii").strip()
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
    text = text.replace("\\n", "\n")
    if "-----BEGIN" not in text or "PRIVATE KEY-----" not in text:
        raise ValueError("not a PEM/OpenSSH private key")
    return (text.strip() + "\n").encode()


class SshKey:
    """The key for ssh URLs, written lazily (mode 0600) the first time an ssh URL needs it."""

    def __init__(self, material: str, key_file: Path, source: str) -> None:
        self._material = material
        self.key_file = key_file
        self.source = source  # the variable names, for messages
        self._lock = threading.Lock()
        self._env: dict[str, str] | None = None

    def env(self, url: str) -> dict[str, str]:
        """``GIT_SSH_COMMAND`` for ``url``.

        Raises:
            SshKeyError: the key is missing or undecodable (the key itself is never quoted).
        """
        with self._lock:
            if self._env is not None:
                return self._env
            shown = redact_url(url)
            if not self._material:
                raise SshKeyError(
                    f"{shown} needs an SSH key: set CUT_PK_1..3 (base64, split) or SSH_PRIVATE_KEY",
                    url=shown,
                )
            try:
                key = decode_private_key(self._material)
            except ValueError as exc:
                raise SshKeyError(
                    f"{shown} needs an SSH key but {self.source} is {exc}: check the variable", url=shown
                ) from None
            self.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.key_file.parent.chmod(0o700)
            atomic_write(self.key_file, key, mode=0o600)
            known_hosts = self.key_file.parent / "known_hosts"
            command = [
                "ssh",
                "-i",
                str(self.key_file),
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                f"UserKnownHostsFile={known_hosts}",
                "-o",
                "BatchMode=yes",
            ]
            self._env = {"GIT_SSH_COMMAND": shlex.join(command)}
            return self._env


# ---------------------------------------------------------------- the runner seam
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

    Through :func:`orchestrator.machine.runner.run`, not GitPython's ``execute``: git runs in its own
    session and at the deadline its whole tree is killed; output goes through temporary files,
    so an ssh ControlPersist master or a hook's background helper holding git's stdout cannot
    keep us waiting; and git dies with us (PR_SET_PDEATHSIG) when ``up`` is killed.
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


class GitClient:
    """Git with timeouts, retries, ssh keys and atomic clones. Thread-safe."""

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
        return self._call(args, cwd=path, timeout=timeout, url=None, op=op or (args[0] if args else "git"))

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

    # -------------------------------------------------------------- composite operations
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
            self.run(path, "cat-file", "-e", f"{rev}^{{commit}}", op="cat-file")
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
        if current is None:
            self.run(path, "remote", "add", "origin", url, op="remote add")
        elif current != url:
            self.run(path, "remote", "set-url", "origin", url, op="remote set-url")

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
        return bool(self.run(path, "status", "--porcelain", "--untracked-files=no", op="status").strip())

    def is_ancestor(self, path: Path, ancestor: str, rev: str) -> bool:
        try:
            self.run(path, "merge-base", "--is-ancestor", ancestor, rev, op="merge-base")
        except GitError as exc:
            if exc.status == 1:
                return False
            raise
        return True

    def rev_parse(self, path: Path, rev: str) -> str:
        return self.run(path, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", op="rev-parse").strip()

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
