"""ComfyUI code tree and shared config repo, against real local git repos (file:// URLs)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from support import Recording, commit_file, git, make_repo

from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import FORK_URL, Settings, load_settings
from orchestrator.machine.ports import free_port_block
from orchestrator.provision.git import command as git_command
from orchestrator.provision.git import worktree as git_worktree
from orchestrator.provision.git.client import GitClient, RetryPolicy
from orchestrator.provision.repos import shipped as repos_shipped
from orchestrator.provision.repos import state as repos_state
from orchestrator.provision.repos import sync as repos_sync
from orchestrator.provision.repos import targets as repos_targets


@pytest.fixture
def upstream(tmp_path: Path) -> tuple[Path, str, str]:
    """The "official" repo: (path, pinned commit, newer tip)."""
    path = tmp_path / "upstream"
    pinned = make_repo(path, {"main.py": "print('pinned')\n", "custom_nodes/example_node.py.example": "x\n"})
    tip = commit_file(path, "main.py", "print('newer')\n")
    return path, pinned, tip


@pytest.fixture
def fork(tmp_path: Path) -> Path:
    """The fork: default branch main, the followed branch forward."""
    path = tmp_path / "fork"
    make_repo(path, {"main.py": "print('fork main')\n"})
    git(path, "checkout", "-q", "-b", "forward")
    commit_file(path, "main.py", "print('fork forward')\n")
    git(path, "checkout", "-q", "main")
    return path


def settings_for(root: Path, **env: str) -> Settings:
    """COMFY_UPDATE=always unless a test says otherwise: most tests here follow every fetch."""
    return load_settings({"ROOT": str(root), "GIT_TIMEOUT": "30", "COMFY_UPDATE": "always", **env})


def quick_git(runner: git_command.GitRunner = git_command.git_runner, attempts: int = 2) -> GitClient:
    return GitClient(
        timeout=30,
        runner=runner,
        retry=RetryPolicy(attempts=attempts, initial=0, maximum=0),
        sleep=lambda s: None,
    )


def no_git(args: Sequence[str], *, cwd: Path | None, timeout: float | None, env: Mapping[str, str]) -> str:
    raise AssertionError(f"git was called: {args}")


def comfy_settings(root: Path, fork: Path, upstream: tuple[Path, str, str], **env: str) -> Settings:
    base = {
        "COMFY_REPO_URL": f"file://{fork}",
        "COMFY_BRANCH": "forward",
        "COMFY_FALLBACK_URL": f"file://{upstream[0]}",
        "COMFY_COMMIT": upstream[1],
    }
    base.update(env)
    return settings_for(root, **base)


# ---------------------------------------------------------------- the fork rule (pure)
def test_the_default_url_is_the_fork_and_follows_the_branch() -> None:
    s = load_settings({})
    assert repos_targets.is_fork(s)
    assert repos_targets.comfy_target(s) == repos_targets.Target(FORK_URL, branch="forward")
    assert repos_targets.is_fork(load_settings({"COMFY_REPO_URL": "https://GitHub.com/stakeordie/ComfyUI/"}))


def test_another_url_is_pinned_unless_a_branch_is_set_explicitly() -> None:
    other = load_settings({"COMFY_REPO_URL": "https://example.com/me/ComfyUI.git"})
    assert repos_targets.comfy_target(other) == repos_targets.Target(other.comfy_repo_url, commit=other.comfy_commit)
    followed = load_settings({"COMFY_REPO_URL": "https://example.com/me/ComfyUI.git", "COMFY_BRANCH": "dev"})
    assert repos_targets.comfy_target(followed).branch == "dev"


def test_unsafe_repository_settings_are_config_errors(root: Path) -> None:
    s = settings_for(root, COMFY_REPO_URL="ext::sh -c touch% /tmp/pwned")
    with pytest.raises(ConfigError, match="COMFY_REPO_URL"):
        repos_sync.sync_comfy(s, Layout(root), git=quick_git(no_git))
    s = settings_for(root, SHARED_REPO_URL="https://h/r", SHARED_BRANCH="--upload-pack=x")
    with pytest.raises(ConfigError, match="SHARED_BRANCH"):
        repos_sync.sync_shared(s, Layout(root), git=quick_git(no_git))
    assert not (root / "ComfyUI").exists()


# ---------------------------------------------------------------- ComfyUI
def test_the_fork_is_cloned_at_its_branch_and_fast_forwarded_later(
    root: Path, fork: Path, upstream: tuple[Path, str, str]
) -> None:
    s = comfy_settings(root, fork, upstream)
    layout = Layout(root)
    first = repos_sync.sync_comfy(s, layout, git=quick_git())
    assert first.ref == "forward"
    assert not first.fallback
    assert first.changed
    assert first.commit == git(fork, "rev-parse", "forward")
    assert (root / "ComfyUI" / "main.py").read_text() == "print('fork forward')\n"
    git(fork, "checkout", "-q", "forward")
    newer = commit_file(fork, "main.py", "print('fork forward 2')\n")
    second = repos_sync.sync_comfy(s, layout, git=quick_git())
    assert second.changed
    assert second.commit == newer
    assert (root / "ComfyUI" / "main.py").read_text() == "print('fork forward 2')\n"
    third = repos_sync.sync_comfy(s, layout, git=quick_git())
    assert not third.changed
    assert third.commit == newer
    assert json.loads((root / ".orchestrator" / "repos.json").read_text())["comfy"]["commit"] == newer


def test_another_url_is_checked_out_at_the_pin_and_a_pin_in_place_costs_no_git_at_all(
    root: Path, upstream: tuple[Path, str, str]
) -> None:
    path, pinned, _tip = upstream
    s = settings_for(
        root, COMFY_REPO_URL=f"file://{path}", COMFY_COMMIT=pinned, COMFY_FALLBACK_URL=f"file://{path}"
    )
    first = repos_sync.sync_comfy(s, Layout(root), git=quick_git())
    assert first.commit == pinned
    assert first.ref == pinned
    assert not first.fallback
    assert (root / "ComfyUI" / "main.py").read_text() == "print('pinned')\n"
    second = repos_sync.sync_comfy(s, Layout(root), git=quick_git(no_git))
    assert second.commit == pinned
    assert not second.changed
    assert second.warnings == ()


def test_an_unreachable_repo_falls_back_to_the_official_one_at_the_pin_loudly(
    root: Path, upstream: tuple[Path, str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = comfy_settings(root, tmp_path / "no-such-fork", upstream)
    with caplog.at_level(logging.ERROR, logger="orchestrator.provision.repos"):
        result = repos_sync.sync_comfy(s, Layout(root), git=quick_git())
    assert result.fallback
    assert result.commit == upstream[1]
    assert result.url == f"file://{upstream[0]}"
    assert any("FALLING BACK" in w for w in result.warnings)
    assert any("FALLING BACK" in r.getMessage() for r in caplog.records)
    assert repos_state.load_status(Layout(root))["comfy"]["fallback"] is True


def test_connection_failures_are_retried_before_falling_back(
    root: Path, upstream: tuple[Path, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    port = free_port_block(1)  # nothing listens there: connection refused
    s = settings_for(
        root,
        COMFY_REPO_URL=f"https://127.0.0.1:{port}/ComfyUI.git",
        COMFY_BRANCH="forward",
        COMFY_FALLBACK_URL=f"file://{upstream[0]}",
        COMFY_COMMIT=upstream[1],
    )
    runner = Recording(git_command.git_runner)
    result = repos_sync.sync_comfy(s, Layout(root), git=quick_git(runner, attempts=3))
    primary = [c for c in runner.calls if "clone" in c and any("127.0.0.1" in a for a in c)]
    assert len(primary) == 3
    assert result.fallback
    assert result.commit == upstream[1]


def test_after_a_fallback_the_configured_repo_is_used_again_once_reachable(
    root: Path, upstream: tuple[Path, str, str], tmp_path: Path
) -> None:
    later = tmp_path / "late-fork"
    s = comfy_settings(root, later, upstream)
    assert repos_sync.sync_comfy(s, Layout(root), git=quick_git()).fallback
    again = repos_sync.sync_comfy(s, Layout(root), git=quick_git())
    assert again.fallback
    assert any("cannot fetch" in w for w in again.warnings)
    make_repo(later, {"main.py": "print('late')\n"}, branch="forward")
    recovered = repos_sync.sync_comfy(s, Layout(root), git=quick_git())
    assert not recovered.fallback
    assert recovered.ref == "forward"
    assert recovered.commit == git(later, "rev-parse", "HEAD")
    assert (root / "ComfyUI" / "main.py").read_text() == "print('late')\n"


def test_a_failed_fetch_keeps_the_checkout_and_warns(
    root: Path, fork: Path, upstream: tuple[Path, str, str]
) -> None:
    s = comfy_settings(root, fork, upstream)
    first = repos_sync.sync_comfy(s, Layout(root), git=quick_git())
    fork.rename(fork.with_name("gone"))
    offline = repos_sync.sync_comfy(s, Layout(root), git=quick_git())
    assert offline.commit == first.commit
    assert not offline.changed
    assert not offline.fallback
    assert any("cannot fetch" in w and "keeping" in w for w in offline.warnings)


def test_a_missing_branch_fails_with_one_line_naming_the_branches_that_exist(
    root: Path, fork: Path, upstream: tuple[Path, str, str]
) -> None:
    s = comfy_settings(root, fork, upstream, COMFY_BRANCH="nope")
    with pytest.raises(repos_targets.MissingBranchError) as info:
        repos_sync.sync_comfy(s, Layout(root), git=quick_git())
    message = str(info.value)
    assert "\n" not in message
    assert f"ComfyUI: branch 'nope' does not exist in file://{fork}; branches there: forward, main" in message
    assert "COMFY_ON_MISSING_BRANCH=fallback" in message
    assert info.value.available == ("forward", "main")
    assert not (root / "ComfyUI").exists()  # not silently replaced by upstream


def test_a_failed_branch_switch_fails_and_leaves_the_running_code_alone(
    root: Path, fork: Path, upstream: tuple[Path, str, str]
) -> None:
    first = repos_sync.sync_comfy(comfy_settings(root, fork, upstream), Layout(root), git=quick_git())
    with pytest.raises(repos_targets.MissingBranchError, match=r"branches there: forward, main\. Still checked out: forward @ "):
        repos_sync.sync_comfy(comfy_settings(root, fork, upstream, COMFY_BRANCH="nope"), Layout(root), git=quick_git())
    assert repos_state.code_report(root / "ComfyUI", {"wanted": "forward"})["commit"] == first.commit
    recorded = json.loads((root / ".orchestrator" / "repos.json").read_text())["comfy"]
    assert (recorded["ref"], recorded["wanted"]) == ("forward", "forward")


def test_with_fallback_allowed_a_missing_branch_keeps_the_tree_and_reports_what_runs(
    root: Path, fork: Path, upstream: tuple[Path, str, str]
) -> None:
    first = repos_sync.sync_comfy(comfy_settings(root, fork, upstream), Layout(root), git=quick_git())
    s = comfy_settings(root, fork, upstream, COMFY_BRANCH="nope", COMFY_ON_MISSING_BRANCH="fallback")
    result = repos_sync.sync_comfy(s, Layout(root), git=quick_git())
    assert (result.ref, result.wanted, result.commit, result.fallback) == ("forward", "nope", first.commit, True)
    assert any("branch 'nope' does not exist" in w and "keeping forward" in w for w in result.warnings)
    report = repos_state.code_report(root / "ComfyUI", result.to_dict())
    assert (report["ref"], report["commit"], report["wanted"], report["fallback"]) == (
        "forward", first.commit, "nope", True,
    )


def test_with_fallback_allowed_a_first_boot_on_a_missing_branch_runs_the_fallback_at_the_pin(
    root: Path, fork: Path, upstream: tuple[Path, str, str]
) -> None:
    s = comfy_settings(root, fork, upstream, COMFY_BRANCH="nope", COMFY_ON_MISSING_BRANCH="fallback")
    result = repos_sync.sync_comfy(s, Layout(root), git=quick_git())
    assert result.fallback
    assert (result.ref, result.commit, result.wanted) == (upstream[1], upstream[1], "nope")
    assert "branches there: forward, main" in result.warnings[0]


def test_a_warm_sync_within_the_update_interval_runs_no_fetch(
    root: Path, fork: Path, upstream: tuple[Path, str, str], tmp_path: Path
) -> None:
    shared = tmp_path / "shared-src"
    make_repo(shared, {"config_nodes.json": "{}\n"})
    env = {"COMFY_UPDATE": "interval", "COMFY_UPDATE_INTERVAL": "1h", "SHARED_REPO_URL": f"file://{shared}"}
    s = comfy_settings(root, fork, upstream, **env)
    layout = Layout(root)
    first = repos_sync.sync_comfy(s, layout, git=quick_git(), clock=lambda: 1000.0)
    first_shared = repos_sync.sync_shared(s, layout, git=quick_git(), clock=lambda: 1000.0)
    git(fork, "checkout", "-q", "forward")
    newer = commit_file(fork, "main.py", "print('fork forward 2')\n")
    newer_shared = commit_file(shared, "config_nodes.json", '{"custom_nodes": []}\n')

    counting = Recording(git_command.git_runner)
    warm = repos_sync.sync_comfy(s, layout, git=quick_git(counting), clock=lambda: 1000.0 + 3599)
    warm_shared = repos_sync.sync_shared(s, layout, git=quick_git(counting), clock=lambda: 1000.0 + 3599)
    assert counting.calls == []  # no fetch, no git subprocess at all
    assert (warm.commit, warm_shared.commit) == (first.commit, first_shared.commit)

    due = repos_sync.sync_comfy(s, layout, git=quick_git(), clock=lambda: 1000.0 + 3600)
    due_shared = repos_sync.sync_shared(s, layout, git=quick_git(), clock=lambda: 1000.0 + 3600)
    assert (due.commit, due_shared.commit) == (newer, newer_shared)
    assert due.fetched_at == 1000.0 + 3600

    never = comfy_settings(root, fork, upstream, **{**env, "COMFY_UPDATE": "never"})
    commit_file(fork, "main.py", "print('fork forward 3')\n")
    assert repos_sync.sync_comfy(never, layout, git=quick_git(no_git), clock=lambda: 1e12).commit == newer
    always = comfy_settings(root, fork, upstream, **{**env, "COMFY_UPDATE": "always"})
    assert repos_sync.sync_comfy(always, layout, git=quick_git(), clock=lambda: 1000.0 + 3601).commit != newer


def test_a_changed_branch_is_applied_at_once_whatever_the_update_policy(
    root: Path, fork: Path, upstream: tuple[Path, str, str]
) -> None:
    layout = Layout(root)
    repos_sync.sync_comfy(comfy_settings(root, fork, upstream, COMFY_UPDATE="never"), layout, git=quick_git())
    main = repos_sync.sync_comfy(
        comfy_settings(root, fork, upstream, COMFY_UPDATE="never", COMFY_BRANCH="main"), layout, git=quick_git()
    )
    assert (main.ref, main.commit, main.fallback) == ("main", git(fork, "rev-parse", "main"), False)


def test_update_policy_is_a_pure_decision() -> None:
    assert repos_targets.update_due("always", 3600, 100.0, 101.0)
    assert not repos_targets.update_due("never", 3600, None, 1e9)
    assert repos_targets.update_due("interval", 3600, None, 0.0)
    assert not repos_targets.update_due("interval", 3600, 100.0, 3699.0)
    assert repos_targets.update_due("interval", 3600, 100.0, 3700.0)
    assert repos_targets.update_due("interval", 3600, 5000.0, 100.0)  # the clock went backwards


def test_a_folder_without_a_valid_head_is_redone_and_keeps_its_custom_nodes(
    root: Path, fork: Path, upstream: tuple[Path, str, str]
) -> None:
    comfy = root / "ComfyUI"
    (comfy / "custom_nodes" / "mine").mkdir(parents=True)
    (comfy / "custom_nodes" / "mine" / "node.py").write_text("keep me\n")
    git(comfy, "init", "-q")  # like a clone killed before it wrote a ref
    (root / git_worktree.partial_name("ComfyUI")).mkdir()  # and a leftover temp clone
    result = repos_sync.sync_comfy(comfy_settings(root, fork, upstream), Layout(root), git=quick_git())
    assert result.commit == git(fork, "rev-parse", "forward")
    assert (comfy / "main.py").read_text() == "print('fork forward')\n"
    assert (comfy / "custom_nodes" / "mine" / "node.py").read_text() == "keep me\n"
    assert git_worktree.read_head(comfy) == result.commit
    assert [p.name for p in root.iterdir() if ".partial-" in p.name] == []


# ---------------------------------------------------------------- shared
@pytest.fixture
def shared_repo(tmp_path: Path) -> Path:
    path = tmp_path / "emprops_shared"
    make_repo(path, {"config_nodes.json": '{"custom_nodes": []}\n', "comfy_dir_config.yaml": "comfyui: {}\n"})
    return path


def test_the_shared_repo_fast_forwards_but_never_discards_local_work(root: Path, shared_repo: Path) -> None:
    s = settings_for(root, SHARED_REPO_URL=f"file://{shared_repo}")
    layout = Layout(root)
    first = repos_sync.sync_shared(s, layout, git=quick_git())
    assert first.ref == "main"
    assert (root / "shared" / "config_nodes.json").exists()
    newer = commit_file(shared_repo, "static-models.json", "{}\n")
    assert repos_sync.sync_shared(s, layout, git=quick_git()).commit == newer
    # A local edit of a file the next upstream commit also changes: keep it and warn.
    (root / "shared" / "comfy_dir_config.yaml").write_text("comfyui: {local: true}\n")
    upstream_change = commit_file(shared_repo, "comfy_dir_config.yaml", "comfyui: {upstream: true}\n")
    kept = repos_sync.sync_shared(s, layout, git=quick_git())
    assert kept.commit == newer
    assert kept.warnings
    assert (root / "shared" / "comfy_dir_config.yaml").read_text() == "comfyui: {local: true}\n"
    # A local commit plus an upstream commit: diverged, local history kept.
    git(root / "shared", "commit", "-q", "-am", "local")
    local = git(root / "shared", "rev-parse", "HEAD")
    diverged = repos_sync.sync_shared(s, layout, git=quick_git())
    assert diverged.commit == local != upstream_change
    assert any("diverged" in w for w in diverged.warnings)


def test_the_shared_repo_can_be_pinned(root: Path, shared_repo: Path) -> None:
    first = git(shared_repo, "rev-parse", "HEAD")
    commit_file(shared_repo, "x.txt", "x\n")
    s = settings_for(root, SHARED_REPO_URL=f"file://{shared_repo}", SHARED_COMMIT=first)
    assert repos_sync.sync_shared(s, Layout(root), git=quick_git()).commit == first
    assert not (root / "shared" / "x.txt").exists()


def test_without_a_shared_repo_the_shipped_defaults_are_used_and_local_edits_survive(root: Path) -> None:
    s = settings_for(root, SHARED_REPO_URL="")
    result = repos_sync.sync_shared(s, Layout(root), git=quick_git(no_git))
    assert result.url == repos_targets.SHIPPED
    assert result.changed
    shipped = repos_shipped.shipped_shared_dir() / "config_nodes.json"
    assert (root / "shared" / "config_nodes.json").read_bytes() == shipped.read_bytes()
    (root / "shared" / "config_nodes.json").write_text('{"custom_nodes": []}\n')
    again = repos_sync.sync_shared(s, Layout(root), git=quick_git(no_git))
    assert not again.changed
    assert (root / "shared" / "config_nodes.json").read_text() == '{"custom_nodes": []}\n'


def test_an_unreachable_shared_repo_uses_the_shipped_defaults_then_adopts_the_repo(
    root: Path, tmp_path: Path
) -> None:
    later = tmp_path / "late-shared"
    s = settings_for(root, SHARED_REPO_URL=f"file://{later}")
    first = repos_sync.sync_shared(s, Layout(root), git=quick_git())
    assert first.url == repos_targets.SHIPPED
    assert first.fallback
    (root / "shared" / "models").mkdir()  # the shared model tree lives here too
    (root / "shared" / "static-models.json").write_text('{"edited": true}\n')
    make_repo(
        later,
        {
            "config_nodes.json": '{"custom_nodes": [{"name": "x", "url": "https://h/x"}]}\n',
            "static-models.json": "{}\n",
        },
    )
    adopted = repos_sync.sync_shared(s, Layout(root), git=quick_git())
    assert adopted.url == f"file://{later}"
    assert not adopted.fallback
    assert git_worktree.read_head(root / "shared") == git(later, "rev-parse", "HEAD")
    assert "x" in (root / "shared" / "config_nodes.json").read_text()  # the shipped copy was replaced
    assert (root / "shared" / "static-models.json").read_text() == '{"edited": true}\n'  # local edit kept
    assert any("locally edited" in w for w in adopted.warnings)
    assert (root / "shared" / "models").is_dir()


def test_one_function_resolves_the_shared_dir_for_every_command(root: Path) -> None:
    s = settings_for(root, SHARED_REPO_URL="")
    read_only = repos_sync.resolve_shared(s, Layout(root), install=False)
    assert read_only.shared_dir == repos_shipped.shipped_shared_dir()
    assert list(root.iterdir()) == []  # nothing written
    installed = repos_sync.resolve_shared(s, Layout(root), install=True)
    assert installed.shared_dir == root / "shared"
    assert (root / "shared" / "comfy_dir_config.yaml").is_file()
    (root / "shared" / "models.yaml").write_text("models: []\n")
    assert repos_sync.resolve_shared(s, Layout(root), install=False).shared_dir == root / "shared"


def test_the_shipped_defaults_are_found_in_the_source_checkout() -> None:
    assert (repos_shipped.shipped_shared_dir() / "config_nodes.json").exists()
