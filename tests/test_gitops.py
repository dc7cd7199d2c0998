"""Git wrapper: classification, retries, timeouts, SSH keys, subprocess-free reads."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import commit_file, git, make_repo

from orchestrator.provision.git import command as git_command
from orchestrator.provision.git import urls as git_urls
from orchestrator.provision.git import worktree as git_worktree
from orchestrator.provision.git.client import GitClient, RetryPolicy
from orchestrator.provision.git.command import GitError, SshKeyError
from orchestrator.provision.git.ssh import SshKey

FAKE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
)


class Recorder:
    """A runner that fails with ``failures`` (in order), then runs the real git."""

    def __init__(self, failures: Sequence[GitError] = (), real: bool = True) -> None:
        self.failures = list(failures)
        self.calls: list[tuple[list[str], dict[str, str]]] = []
        self.real = real

    def __call__(
        self, args: Sequence[str], *, cwd: Path | None, timeout: float | None, env: Mapping[str, str]
    ) -> str:
        self.calls.append((list(args), dict(env)))
        if self.failures:
            raise self.failures.pop(0)
        if not self.real:
            return ""
        return git_command.git_runner(args, cwd=cwd, timeout=timeout, env=env)


def transient() -> GitError:
    return GitError("x", detail="fatal: unable to access 'https://h/r/': Could not resolve host: h")


def client(runner: git_command.GitRunner, sleeps: list[float] | None = None, **kw: object) -> GitClient:
    record = sleeps if sleeps is not None else []
    return GitClient(
        timeout=30,
        runner=runner,
        retry=RetryPolicy(attempts=4, initial=2, maximum=5),
        sleep=record.append,
        **kw,
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("detail", "timed_out", "expected"),
    [
        ("fatal: unable to access 'https://github.com/x/': Could not resolve host: github.com", False, True),
        ("ssh: connect to host github.com port 22: Connection refused", False, True),
        ("error: RPC failed; curl 56 GnuTLS recv error (-9)\nfatal: early EOF", False, True),
        ("The requested URL returned error: 502", False, True),
        ("", True, True),
        (
            "remote: Repository not found.\nfatal: repository 'https://github.com/x/y/' not found",
            False,
            False,
        ),
        ("fatal: '/tmp/nope' does not appear to be a git repository", False, False),
        (
            "git@github.com: Permission denied (publickey).\nfatal: Could not read from remote repository.",
            False,
            False,
        ),
        ("fatal: could not read Username for 'https://github.com': terminal prompts disabled", False, False),
        ("fatal: Remote branch nope not found in upstream origin", False, False),
        ("something nobody has seen before", False, False),
    ],
)
def test_only_network_trouble_and_timeouts_count_as_transient(
    detail: str, timed_out: bool, expected: bool
) -> None:
    assert git_urls.is_transient(detail, timed_out=timed_out) is expected


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/a/b.git",
        "ssh://git@github.com/a/b.git",
        "git@github.com:a/b.git",
        "file:///srv/m/b",
        "/srv/mirror/b",
    ],
)
def test_accepted_url_schemes(url: str) -> None:
    assert git_urls.url_problem(url) is None


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ext::sh -c touch% /tmp/x", "transport"),
        ("fd::3", "transport"),
        ("--upload-pack=touch /tmp/x", "'-'"),
        ("-oProxyCommand=x", "'-'"),
        ("https://h/a b", "whitespace"),
        ("http://h/r", "unauthenticated"),
        ("git://h/r", "unauthenticated"),
        ("relative/path", "absolute"),
        ("", "empty"),
    ],
)
def test_dangerous_or_unknown_urls_are_rejected_with_a_reason(url: str, fragment: str) -> None:
    problem = git_urls.url_problem(url)
    assert problem is not None
    assert fragment in problem


def test_branches_and_commits_that_git_could_read_as_options_are_rejected() -> None:
    assert git_urls.ref_problem("-f") is not None
    assert git_urls.ref_problem("a..b") is not None
    assert git_urls.ref_problem("feature/x-1.2") is None
    assert git_urls.commit_problem("--all") is not None
    assert git_urls.commit_problem("14cfba14655eb19058963fb0d858b0bdb2d89cf0") is None
    assert git_urls.commit_problem("main") is not None


def test_credentials_in_urls_are_hidden() -> None:
    assert (
        git_urls.redact_url("clone https://user:tok3n@github.com/a/b failed")
        == "clone https://***@github.com/a/b failed"
    )


def test_urls_that_need_ssh() -> None:
    assert git_urls.needs_ssh("git@github.com:a/b.git")
    assert git_urls.needs_ssh("ssh://git@github.com/a/b")
    assert not git_urls.needs_ssh("https://github.com/a/b")
    assert not git_urls.needs_ssh("file:///x")


def test_head_and_origin_are_read_without_git(tmp_path: Path) -> None:
    src = tmp_path / "src"
    first = make_repo(src, {"a.txt": "1"})
    assert git_worktree.read_head(src) == first
    assert git_worktree.current_branch(src) == "main"
    git(src, "pack-refs", "--all")  # the ref now lives in packed-refs only
    assert git_worktree.read_head(src) == first
    git(src, "checkout", "-q", "--detach", first)
    assert git_worktree.read_head(src) == first
    assert git_worktree.current_branch(src) is None
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", f"file://{src}", str(clone))
    assert git_worktree.origin_url(clone) == f"file://{src}"


def test_a_folder_without_a_valid_head_reads_as_broken(tmp_path: Path) -> None:
    assert git_worktree.read_head(tmp_path / "missing") is None
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")  # a clone killed before its first ref was written looks like this
    assert git_worktree.read_head(empty) is None


def test_transient_failures_are_retried_with_exponential_backoff(tmp_path: Path) -> None:
    src = tmp_path / "src"
    sha = make_repo(src, {"a.txt": "1"})
    runner = Recorder([transient(), transient()])
    sleeps: list[float] = []
    dest = tmp_path / "dest"
    client(runner, sleeps).clone(f"file://{src}", dest)
    assert git_worktree.read_head(dest) == sha
    assert len(runner.calls) == 3
    assert sleeps == [2, 4]


def test_retries_are_bounded(tmp_path: Path) -> None:
    runner = Recorder([transient() for _ in range(10)])
    sleeps: list[float] = []
    with pytest.raises(GitError) as info:
        client(runner, sleeps).clone("https://example.invalid/r.git", tmp_path / "d")
    assert info.value.transient
    assert len(runner.calls) == 4
    assert sleeps == [2, 4, 5]
    assert "Could not resolve host" in str(info.value)


def test_repository_not_found_is_not_retried(tmp_path: Path) -> None:
    runner = Recorder()
    sleeps: list[float] = []
    with pytest.raises(GitError) as info:
        client(runner, sleeps).clone(f"file://{tmp_path}/nope", tmp_path / "d")
    assert not info.value.transient
    assert len(runner.calls) == 1
    assert sleeps == []
    assert "does not appear to be a git repository" in str(info.value)


def test_every_git_command_runs_without_a_terminal_prompt(tmp_path: Path) -> None:
    runner = Recorder(real=False)
    client(runner).run(tmp_path, "status")
    assert runner.calls[0][1]["GIT_TERMINAL_PROMPT"] == "0"


def test_a_hanging_git_is_killed_after_its_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text("#!/bin/sh\nsleep 30\n")
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(GitError) as info:  # the fake would exit 0 after 30 s had it not been killed
        git_command.git_runner(["fetch"], cwd=tmp_path, timeout=1, env={})
    assert info.value.timed_out
    assert git_urls.is_transient(info.value.detail, timed_out=info.value.timed_out)


def test_ssh_key_from_split_base64_parts_is_written_0600_and_used_only_for_ssh(tmp_path: Path) -> None:
    encoded = base64.b64encode(FAKE_KEY.encode()).decode()
    parts = encoded[:10] + encoded[10:30] + encoded[30:]
    key = SshKey(parts, tmp_path / "ssh" / "id", "CUT_PK_1..3")
    runner = Recorder(real=False)
    c = client(runner, ssh=key)
    c.network(tmp_path, "ls-remote", "https://github.com/a/b", url="https://github.com/a/b", op="ls-remote")
    assert "GIT_SSH_COMMAND" not in runner.calls[0][1]
    assert not (tmp_path / "ssh" / "id").exists()  # written lazily, only when an ssh URL needs it
    c.network(tmp_path, "ls-remote", "git@github.com:a/b", url="git@github.com:a/b", op="ls-remote")
    command = runner.calls[1][1]["GIT_SSH_COMMAND"]
    assert "IdentitiesOnly=yes" in command
    assert "StrictHostKeyChecking=accept-new" in command
    key_file = tmp_path / "ssh" / "id"
    assert key_file.read_text() == FAKE_KEY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in command


def test_a_missing_or_bad_key_fails_only_ssh_urls_and_never_shows_the_key(tmp_path: Path) -> None:
    secret_material = "c2VjcmV0LW5vdC1hLWtleS1hdC1hbGw="  # base64 of something that is not a key
    c = client(Recorder(real=False), ssh=SshKey(secret_material, tmp_path / "id", "SSH_PRIVATE_KEY"))
    c.network(tmp_path, "ls-remote", "https://h/r", url="https://h/r", op="ls-remote")  # fine
    with pytest.raises(SshKeyError) as info:
        c.network(tmp_path, "ls-remote", "git@h:r", url="git@h:r", op="ls-remote")
    assert "SSH_PRIVATE_KEY" in str(info.value)
    assert secret_material not in str(info.value)
    assert "secret" not in str(info.value)
    missing = client(Recorder(real=False), ssh=SshKey("", tmp_path / "id2", "CUT_PK_1..3"))
    with pytest.raises(SshKeyError, match="CUT_PK_1"):
        missing.network(tmp_path, "ls-remote", "ssh://git@h/r", url="ssh://git@h/r", op="ls-remote")


def test_leftover_partial_clones_are_removed(tmp_path: Path) -> None:
    leftover = tmp_path / git_worktree.partial_name("node")
    leftover.mkdir()
    (tmp_path / "keep").mkdir()
    assert git_worktree.remove_partials(tmp_path) == [leftover]
    assert not leftover.exists()
    assert (tmp_path / "keep").exists()


def test_ensure_commit_fetches_an_older_commit_into_a_shallow_clone(tmp_path: Path) -> None:
    src = tmp_path / "src"
    first = make_repo(src, {"a.txt": "1"})
    commit_file(src, "a.txt", "2")
    dest = tmp_path / "dest"
    c = client(Recorder())
    c.clone(f"file://{src}", dest, shallow=True, no_checkout=True)
    assert not c.has_commit(dest, first)
    c.ensure_commit(dest, f"file://{src}", first)
    assert c.has_commit(dest, first)


def test_hosts_are_read_from_every_url_form() -> None:
    assert git_urls.url_host("https://user:tok@GitHub.com/a/b") == "github.com"
    assert git_urls.url_host("ssh://git@github.com:22/a/b") == "github.com"
    assert git_urls.url_host("git@github.com:a/b.git") == "github.com"
    assert git_urls.url_host("file:///srv/a") is None
    assert git_urls.url_host("/srv/a") is None


def test_a_host_that_exhausted_its_retries_is_tried_once_for_the_rest_of_the_run(tmp_path: Path) -> None:
    runner = Recorder([transient() for _ in range(10)])
    sleeps: list[float] = []
    c = client(runner, sleeps)
    for name in ("a", "b", "c"):
        with pytest.raises(GitError):
            c.clone(f"https://example.invalid/{name}.git", tmp_path / name)
    assert len(runner.calls) == 4 + 1 + 1
    assert sleeps == [2, 4, 5]


def test_a_reftable_repository_is_read_by_asking_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    first = make_repo(src, {"a.txt": "1"})
    (src / ".git" / "reftable").mkdir()  # refs in a reftable cannot be read from files
    asked: list[list[str]] = []

    def recording(args: Sequence[str], **kwargs: Any) -> str:
        asked.append(list(args))
        return git_command.git_runner(args, **kwargs)

    monkeypatch.setattr(git_worktree, "git_runner", recording)
    assert git_worktree.read_head(src) == first
    assert git_worktree.current_branch(src) == "main"
    assert [a[0] for a in asked] == ["rev-parse", "symbolic-ref"]


def test_local_commands_go_through_gitpython_with_the_runner_and_its_deadline(tmp_path: Path) -> None:
    seen: list[tuple[list[str], float | None]] = []

    def runner(args: Sequence[str], *, cwd: Path | None, timeout: float | None, env: Mapping[str, str]) -> str:
        seen.append((list(args), timeout))
        return " M a.txt"

    c = client(runner)
    assert c.cmd(tmp_path).rev_parse("HEAD", kill_after_timeout=5) == " M a.txt"
    assert c.is_dirty(tmp_path)
    assert seen == [(["rev-parse", "HEAD"], 5), (["status", "--porcelain", "--untracked-files=no"], 30)]
