"""Read-only commands create nothing (not even $ROOT/logs); without ROOT they find a running demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import clean_env

from orchestrator.machine import state as paths

CLI = [sys.executable, "-c", "import sys; from orchestrator.cli.main import main; sys.exit(main())"]


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["down"],
        ["logs", "0"],
        ["gpus"],
        ["plan"],
        ["config"],
        ["health"],
        ["models", "sync", "--dry-run"],
        ["models", "status"],
        ["nodes", "sync", "--dry-run"],
    ],
    ids=lambda c: " ".join(c),
)
def test_a_read_only_command_with_a_wrong_root_creates_nothing(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "no-such-root"
    env = clean_env(MOCK_GPU="1", NUM_GPUS="1", SHARED_REPO_URL="", XDG_RUNTIME_DIR=str(tmp_path / "run"))
    run_cli(["--root", str(missing), *command], env)
    assert not missing.exists()
    assert not (tmp_path / "run").exists()


def test_a_read_only_command_logs_to_the_file_only_when_the_log_folder_exists(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "logs").mkdir(parents=True)
    env = clean_env(MOCK_GPU="1", NUM_GPUS="1", XDG_RUNTIME_DIR=str(tmp_path / "run"), LOG_LEVEL="debug")
    run_cli(["--root", str(root), "status"], env)
    assert (root / "logs" / "orchestrator.log").exists()
    assert sorted(p.name for p in root.iterdir()) == ["logs"]


def fake_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pid: int) -> tuple[Path, dict[str, str]]:
    runtime = tmp_path / "run"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    root = tmp_path / "demo-root"
    (root / ".orchestrator").mkdir(parents=True)
    paths.write_demo_pointer(
        {"ROOT": str(root), "MOCK_GPU": "1", "NUM_GPUS": "3", "HF_TOKEN": "not-recorded"}, pid=pid
    )
    env = clean_env(XDG_RUNTIME_DIR=str(runtime))
    return root, env


def test_without_root_gpus_and_plan_use_the_running_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, env = fake_demo(tmp_path, monkeypatch, os.getpid())  # this test process stands in for the demo
    assert "not-recorded" not in paths.demo_pointer().read_text()
    assert paths.running_demo() == {"ROOT": str(root), "MOCK_GPU": "1", "NUM_GPUS": "3"}
    gpus = run_cli(["gpus", "--json"], env)
    assert gpus.returncode == 0, gpus.stderr
    assert len(json.loads(gpus.stdout)) == 3
    assert str(root) in gpus.stderr  # said, not silent
    plan = run_cli(["plan", "--json"], env)
    assert plan.returncode == 0, plan.stderr
    assert str(root) in plan.stdout
    status = run_cli(["status", "--json"], env)  # looks at the demo's ROOT (nothing applied in this fake one)
    assert str(root) in status.stderr
    assert not (root / "logs").exists()
    explicit = run_cli(["--root", str(tmp_path / "other"), "gpus", "--json"], {**env, "MOCK_GPU": "1"})
    assert str(root) not in explicit.stderr  # a ROOT given anywhere wins
    paths.remove_demo_pointer(os.getpid())
    assert not paths.demo_pointer().exists()
    assert paths.running_demo() is None


def test_a_pointer_left_by_a_demo_that_died_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fake_demo(tmp_path, monkeypatch, dead.pid)
    assert paths.running_demo() is None


def test_logs_json_is_one_object_per_line_with_the_gpu_and_the_text_of_the_same_lines(tmp_path: Path) -> None:
    from orchestrator.core.layout import Layout
    from orchestrator.core.plan import build_plan
    from orchestrator.core.settings import load_settings
    from orchestrator.machine.fs import write_json
    from orchestrator.machine.gpu import detect

    root = tmp_path / "root"
    settings = load_settings({"ROOT": str(root), "MOCK_GPU": "1", "NUM_GPUS": "2"})
    plan = build_plan(settings, detect(settings))
    write_json(Layout(root).plan_file, plan.to_dict())
    for inst in plan.instances:
        inst.log_file.parent.mkdir(parents=True, exist_ok=True)
        inst.log_file.write_text(f"first of gpu{inst.index}\n\"quoted\" \\ line\nlast of gpu{inst.index}\n")
    env = clean_env(MOCK_GPU="1", NUM_GPUS="2", XDG_RUNTIME_DIR=str(tmp_path / "run"))
    r = run_cli(["--root", str(root), "logs", "all", "-n", "2", "--json"], env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows == [
        {"gpu": 0, "line": "\"quoted\" \\ line"}, {"gpu": 0, "line": "last of gpu0"},
        {"gpu": 1, "line": "\"quoted\" \\ line"}, {"gpu": 1, "line": "last of gpu1"},
    ]
    text = run_cli(["--root", str(root), "logs", "1", "-n", "2"], env)
    assert text.stdout.splitlines() == ["\"quoted\" \\ line", "last of gpu1"]
