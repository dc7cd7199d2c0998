"""Output cleanup: old files only, empty folders, bytes counted, the loop under a signal, metrics."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from orchestrator.cli import models as models_cli
from orchestrator.core.gpus import Gpu
from orchestrator.core.layout import Layout
from orchestrator.core.plan import build_plan
from orchestrator.core.settings import Settings, load_settings
from orchestrator.machine.fs import write_json
from orchestrator.provision import cleanup

NOW = 1_700_000_000.0
HOUR = 3600.0


def settings_for(root: Path, **extra: str) -> Settings:
    return load_settings({"ROOT": str(root), "OUTPUT_MAX_AGE": "60m", "MIN_FREE_DISK": "0", **extra})


def put(path: Path, size: int, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age, NOW - age))
    return path


def age_dir(path: Path, age: float) -> None:
    os.utime(path, (NOW - age, NOW - age))


def test_only_old_files_are_deleted_empty_old_folders_removed_and_bytes_counted(root: Path) -> None:
    out = root / "comfyui_gpu0" / "output"
    tmp = root / "comfyui_gpu0" / "temp"
    old1 = put(out / "a.png", 100, 2 * HOUR)
    old2 = put(out / "batch" / "deep" / "b.png", 250, 3 * HOUR)
    young = put(out / "keep.png", 10, 60)
    old3 = put(tmp / "t.latent", 40, 2 * HOUR)
    fresh_empty = out / "just-created"
    fresh_empty.mkdir()
    for d in (out / "batch" / "deep", out / "batch"):
        age_dir(d, 2 * HOUR)
    result = cleanup.cleanup_once(settings_for(root), Layout(root), now=NOW)
    assert (result.files_deleted, result.bytes_freed) == (3, 390)
    assert not old1.exists()
    assert not old2.exists()
    assert not old3.exists()
    assert young.exists()
    assert not (out / "batch").exists()  # emptied old folders go, deepest first
    assert result.dirs_removed == 2
    assert fresh_empty.is_dir()  # a folder ComfyUI just made for a save stays
    assert out.is_dir()
    assert tmp.is_dir()


def test_the_applied_plan_names_the_folders_to_clean(root: Path) -> None:
    settings = settings_for(root, MOCK_GPU="1", NUM_GPUS="2")
    gpus = [
        Gpu(index=i, uuid=f"MOCK-{i}", pci_bus_id="", name="mock", memory_total=1, driver_version="")
        for i in range(2)
    ]
    plan = build_plan(settings, gpus)
    layout = Layout(root)
    write_json(layout.plan_file, plan.to_dict())
    assert cleanup.cleanup_dirs(layout) == (
        root / "comfyui_gpu0" / "output",
        root / "comfyui_gpu0" / "temp",
        root / "comfyui_gpu1" / "output",
        root / "comfyui_gpu1" / "temp",
    )
    put(root / "comfyui_gpu1" / "temp" / "x", 5, 2 * HOUR)
    put(root / "comfyui_gpu1" / "input" / "y", 5, 2 * HOUR)  # inputs are not outputs
    assert cleanup.cleanup_once(settings, layout, now=NOW).files_deleted == 1
    assert (root / "comfyui_gpu1" / "input" / "y").exists()


def test_without_a_plan_the_instance_folders_are_globbed(root: Path) -> None:
    for i in (0, 3):
        (root / f"comfyui_gpu{i}" / "output").mkdir(parents=True)
    (root / "comfyui_gpu3" / "temp").mkdir()
    write_json(Layout(root).plan_file, {"broken": True})
    assert cleanup.cleanup_dirs(Layout(root)) == (
        root / "comfyui_gpu0" / "output",
        root / "comfyui_gpu3" / "output",
        root / "comfyui_gpu3" / "temp",
    )


def test_symlinks_are_removed_as_links_and_never_followed(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    put(outside / "keep.bin", 10, 5 * HOUR)
    out = root / "comfyui_gpu0" / "output"
    out.mkdir(parents=True)
    link = out / "link"
    link.symlink_to(outside)
    os.utime(link, (NOW - 2 * HOUR, NOW - 2 * HOUR), follow_symlinks=False)
    cleanup.cleanup_once(settings_for(root), Layout(root), now=NOW)
    assert not link.is_symlink()
    assert (outside / "keep.bin").exists()


def test_totals_accumulate_in_the_status_file_and_metrics_pass_promtool(root: Path) -> None:
    layout = Layout(root)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(cleanup.CleanupCollector(layout))
    assert registry.get_sample_value("orchestrator_cleanup_runs_total") == 0
    out = root / "comfyui_gpu0" / "output"
    put(out / "a", 100, 2 * HOUR)
    cleanup.cleanup_once(settings_for(root), layout, now=NOW)
    put(out / "b", 50, 2 * HOUR)
    cleanup.cleanup_once(settings_for(root), layout, now=NOW)
    status = json.loads(layout.cleanup_status_file.read_text())
    assert (status["runs_total"], status["files_deleted_total"], status["bytes_freed_total"]) == (2, 2, 150)
    assert status["last_run"]["files_deleted"] == 1
    assert registry.get_sample_value("orchestrator_cleanup_bytes_freed_total") == 150
    assert registry.get_sample_value("orchestrator_cleanup_files_deleted_total") == 2
    assert registry.get_sample_value("orchestrator_cleanup_runs_total") == 2
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed")
    proc = subprocess.run(
        ["promtool", "check", "metrics"], input=generate_latest(registry), capture_output=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_output_max_age_zero_turns_cleanup_off(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    put(root / "comfyui_gpu0" / "output" / "a", 1, 100 * HOUR)
    args = argparse.Namespace(once=True, json=False)
    assert models_cli.cmd_cleanup(settings_for(root, OUTPUT_MAX_AGE="0"), args) == 0
    assert "cleanup is off" in capsys.readouterr().out
    assert (root / "comfyui_gpu0" / "output" / "a").exists()


def test_once_prints_json(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = time.time() - 2 * HOUR
    f = root / "comfyui_gpu0" / "output" / "a"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"12345")
    os.utime(f, (old, old))
    assert models_cli.cmd_cleanup(settings_for(root), argparse.Namespace(once=True, json=True)) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["files_deleted"], result["bytes_freed"]) == (1, 5)


@pytest.fixture
def proc_holder() -> Iterator[list[subprocess.Popen[str]]]:
    held: list[subprocess.Popen[str]] = []
    yield held
    for p in held:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_the_loop_runs_every_interval_and_stops_on_sigterm(
    root: Path, proc_holder: list[subprocess.Popen[str]]
) -> None:
    out = root / "comfyui_gpu0" / "output"
    out.mkdir(parents=True)
    env = {
        **os.environ,
        "ROOT": str(root),
        "OUTPUT_MAX_AGE": "1s",
        "CLEANUP_INTERVAL": "0.2s",
        "LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from orchestrator.cli.main import main; sys.exit(main())",
            "cleanup",
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc_holder.append(proc)
    status = Layout(root).cleanup_status_file
    deadline = time.monotonic() + 20
    while not status.exists() and time.monotonic() < deadline:  # the first pass ran
        assert proc.poll() is None
        time.sleep(0.05)
    f = out / "late.png"
    f.write_bytes(b"abc")
    old = time.time() - 10
    os.utime(f, (old, old))
    deadline = time.monotonic() + 20
    while f.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not f.exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    runs = [json.loads(line) for line in proc.stdout.read().splitlines()] if proc.stdout else []
    assert len(runs) >= 2
    assert sum(r["files_deleted"] for r in runs) == 1


# ---------------------------------------------------------------- the disk floor
class Disk:
    """A filesystem of ``size`` bytes whose free space grows as files under ``root`` are deleted."""

    def __init__(self, root: Path, size: int, free: int) -> None:
        self.root, self.size, self.base_free = root, size, free
        self.start = self.used()

    def used(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("comfyui_gpu*/**/*") if p.is_file())

    def __call__(self, path: Path) -> os.statvfs_result:
        free = self.base_free + (self.start - self.used())
        return os.statvfs_result((1, 1, self.size, free, free, 0, 0, 0, 0, 255))


def test_below_the_floor_the_oldest_outputs_go_first_until_enough_is_free(root: Path) -> None:
    out = root / "comfyui_gpu0" / "output"
    oldest = put(out / "1.png", 400, 50 * 60)
    older = put(root / "comfyui_gpu1" / "temp" / "2.latent", 300, 40 * 60)
    newer = put(out / "sub" / "3.png", 500, 30 * 60)
    young = put(out / "4.png", 900, 10)  # inside the grace period
    disk = Disk(root, size=100_000, free=1_000)
    settings = settings_for(root, MIN_FREE_DISK="1600")  # 600 bytes short
    layout = Layout(root)
    result = cleanup.cleanup_once(settings, layout, now=NOW, statvfs=disk)
    assert not oldest.exists()
    assert not older.exists()  # 400 + 300 >= 600: enough
    assert newer.exists()
    assert young.exists()
    assert (result.floor_files_deleted, result.floor_bytes_freed) == (2, 700)
    assert result.files_deleted == 2  # none of them was older than OUTPUT_MAX_AGE
    registry = CollectorRegistry(auto_describe=True)
    registry.register(cleanup.CleanupCollector(layout))
    assert registry.get_sample_value("orchestrator_cleanup_floor_files_deleted_total") == 2
    assert registry.get_sample_value("orchestrator_cleanup_floor_bytes_freed_total") == 700
    assert cleanup.cleanup_once(settings, layout, now=NOW, statvfs=disk).floor_files_deleted == 0


def test_the_floor_never_takes_files_of_a_job_still_running(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = root / "comfyui_gpu0" / "output"
    before = put(out / "before.png", 100, 20 * 60)
    during = put(out / "during.png", 100, 5 * 60)  # written after the running job was accepted
    layout = Layout(root)
    write_json(layout.jobs_dir / f"{'a' * 32}.json", {"version": 1, "response": {
        "id": "a" * 32, "status": "running", "created_at": NOW - 10 * 60, "attempts": 1}})
    write_json(layout.jobs_dir / f"{'b' * 32}.json", {"version": 1, "response": {
        "id": "b" * 32, "status": "success", "created_at": NOW - 30 * 60, "attempts": 1}})
    disk = Disk(root, size=100_000, free=0)
    result = cleanup.cleanup_once(settings_for(root, MIN_FREE_DISK="10K"), layout, now=NOW, statvfs=disk)
    assert not before.exists()
    assert during.exists()
    assert result.floor_files_deleted == 1
    lines = [r.getMessage() for r in caplog.records if "below MIN_FREE_DISK" in r.getMessage()]
    assert len(lines) == 1
    assert "lower MIN_FREE_DISK" in lines[0]


def test_above_the_floor_nothing_young_is_touched(root: Path) -> None:
    kept = put(root / "comfyui_gpu0" / "output" / "a.png", 100, 30 * 60)
    disk = Disk(root, size=100_000, free=50_000)
    result = cleanup.cleanup_once(settings_for(root, MIN_FREE_DISK="5%"), Layout(root), now=NOW, statvfs=disk)
    assert kept.exists()
    assert result.floor_files_deleted == 0
