"""`orchestrator models sync|status`, tiers, tokens per host, a killed sync, and the download metrics."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest
from test_downloads import FileSpec, RangeServer, blob

from orchestrator.cli import models as models_cli
from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings, load_settings
from orchestrator.machine.ports import free_port_block
from orchestrator.provision.models import sources
from orchestrator.provision.models import status as models_status
from orchestrator.provision.models import sync as models
from orchestrator.provision.models.downloads import Engine
from orchestrator.provision.models.tasks import DownloadOptions, DownloadTask

CONFIG = Path(__file__).resolve().parents[1] / "shared" / "comfy_dir_config.yaml"
FIXTURE_CONFIG = Path("/work/shared/fixtures/emprops_shared/comfy_dir_config.yaml")
CLI = [sys.executable, "-c", "import sys; from orchestrator.cli.main import main; sys.exit(main())"]
FAST = DownloadOptions(
    connect_timeout=2,
    read_timeout=5,
    attempts=2,
    backoff_initial=0,
    backoff_max=0,
    free_space_margin=0,
    sleep=lambda s: None,
)


@pytest.fixture
def server() -> Iterator[RangeServer]:
    srv = RangeServer().start()
    yield srv
    srv.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_root(root: Path, manifest: str) -> Layout:
    layout = Layout(root)
    layout.shared_dir.mkdir(parents=True, exist_ok=True)
    source = FIXTURE_CONFIG if FIXTURE_CONFIG.exists() else CONFIG
    (layout.shared_dir / "comfy_dir_config.yaml").write_text(source.read_text())
    (layout.shared_dir / "models.yaml").write_text(manifest)
    return layout


def env_for(root: Path, srv: RangeServer | None, **extra: str) -> dict[str, str]:
    port = srv.port if srv else free_port_block(1)
    env = {
        "ROOT": str(root),
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "CIVITAI_ENDPOINT": f"http://localhost:{port}",
        "LOG_LEVEL": "warning",
    }
    env.update(extra)
    return env


def settings_for(root: Path, srv: RangeServer | None, **extra: str) -> Settings:
    return load_settings(env_for(root, srv, **extra))


def models_dir(root: Path) -> Path:
    return root / "ComfyUI" / "models"


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CIVITAI_", "MODELS_"))}
    full.update(env)
    return subprocess.run([*CLI, *args], env=full, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- dry run
DRY_MANIFEST = f"""
models:
  - url: https://example.invalid/files/sd15.safetensors?token=url-secret
    dest: checkpoints/SD15
    sha256: {"b" * 64}
  - hf: stabilityai/sdxl-vae/sdxl_vae.safetensors
    dest: vae
  - civitai: 128713
    dest: loras
  - civitai: 4242
    dest: loras
    filename: named.safetensors
    when: background
  - hf: owner/whole-repo
    dest: diffusers/whole
"""


def test_dry_run_json_lists_file_destination_and_action_for_every_source_kind_without_network(
    root: Path,
) -> None:
    make_root(root, DRY_MANIFEST)
    proc = run_cli(["models", "sync", "--dry-run", "--json"], env_for(root, None, HF_TOKEN="hf-secret-value"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dry_run"] is True
    rows = [(i["kind"], i["file"], i["dest"], i["action"]) for i in report["items"]]
    m = models_dir(root)
    assert rows == [
        ("url", "sd15.safetensors", str(m / "checkpoints" / "SD15"), "download"),
        ("hf", "sdxl_vae.safetensors", str(m / "vae"), "download"),
        ("civitai", None, str(m / "loras"), "download"),
        ("civitai", "named.safetensors", str(m / "loras"), "download"),
        ("hf", None, str(m / "diffusers" / "whole"), "list-repo"),
    ]
    assert report["items"][0]["source"] == "https://example.invalid/files/sd15.safetensors"
    assert "url-secret" not in proc.stdout
    assert "hf-secret-value" not in proc.stdout
    # Nothing written: no tree, no rebased config, no status.
    assert not (root / "ComfyUI").exists()
    assert not Layout(root).extra_model_paths.exists()


def test_dry_run_reports_skip_verify_and_resume_from_local_state(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"weights"
    layout = make_root(
        root,
        f"""
models:
  - url: https://h.invalid/a.safetensors
    dest: vae
    sha256: {sha(data)}
  - url: https://h.invalid/b.safetensors
    dest: vae
  - url: https://h.invalid/c.safetensors
    dest: vae
""",
    )
    settings = settings_for(root, None)
    vae = models_dir(root) / "vae"
    vae.mkdir(parents=True)
    (vae / "b.safetensors").write_bytes(b"present")
    entries = models.manifest.load_entries(settings, layout)
    (vae / f".{sources.entry_task(settings, entries[2], vae).key}.part").write_bytes(b"half")
    (vae / "a.safetensors").write_bytes(data)
    engine = Engine(layout.state_dir, options=FAST)
    assert engine.download(sources.entry_task(settings, entries[0], vae)).state == "verified"

    def no_network(*a: Any, **k: Any) -> Any:
        raise AssertionError("network used in a dry run")

    monkeypatch.setattr(requests.Session, "request", no_network)
    report = models.sync_models(settings, layout, dry_run=True)
    assert [(i.file, i.action) for i in report.items] == [
        ("a.safetensors", "skip"),
        ("b.safetensors", "verify"),
        ("c.safetensors", "resume"),
    ]


# ---------------------------------------------------------------- real syncs
def test_sync_fetches_every_kind_and_sends_each_token_only_to_its_own_host(root: Path, server: RangeServer) -> None:
    other = RangeServer().start()
    try:
        f_url, f_hf, f_civ, f_rep1, f_rep2 = (blob(40_000 + i, seed=i) for i in range(5))
        other.files["/dl/plain.safetensors"] = FileSpec(f_url)
        server.files["/owner/repo/resolve/main/sub/vae.safetensors"] = FileSpec(f_hf)
        server.files["/api/download/models/77"] = FileSpec(
            f_civ, disposition='attachment; filename="civ lora.safetensors"'
        )
        server.files["/api/models/owner/whole"] = FileSpec(
            json={
                "siblings": [
                    {"rfilename": "model_index.json", "size": len(f_rep1)},
                    {
                        "rfilename": "unet/diffusion.safetensors",
                        "lfs": {"sha256": sha(f_rep2), "size": len(f_rep2)},
                    },
                ]
            }
        )
        server.files["/owner/whole/resolve/main/model_index.json"] = FileSpec(f_rep1)
        server.files["/owner/whole/resolve/main/unet/diffusion.safetensors"] = FileSpec(f_rep2)
        layout = make_root(
            root,
            f"""
models:
  - url: {other.url("/dl/plain.safetensors")}
    dest: checkpoints
    sha256: {sha(f_url)}
  - hf: owner/repo/sub/vae.safetensors
    dest: vae
    sha256: {sha(f_hf)}
  - civitai: 77
    dest: loras/style
  - hf: owner/whole
    dest: diffusers/whole
""",
        )
        settings = settings_for(root, server, HF_TOKEN="hf-secret-token", CIVITAI_TOKEN="cv-secret-token")
        report = models.sync_models(settings, layout, options=FAST)
        assert report.failed == (), report.to_dict()
        m = models_dir(root)
        assert (m / "checkpoints" / "plain.safetensors").read_bytes() == f_url
        assert (m / "vae" / "vae.safetensors").read_bytes() == f_hf
        assert (m / "loras" / "style" / "civ lora.safetensors").read_bytes() == f_civ
        assert (m / "diffusers" / "whole" / "model_index.json").read_bytes() == f_rep1
        assert (m / "diffusers" / "whole" / "unet" / "diffusion.safetensors").read_bytes() == f_rep2
        auth = {r["path"]: r["auth"] for r in server.requests}
        assert auth["/owner/repo/resolve/main/sub/vae.safetensors"] == "Bearer hf-secret-token"
        assert auth["/api/models/owner/whole"] == "Bearer hf-secret-token"
        assert auth["/api/download/models/77"] == "Bearer cv-secret-token"
        assert [r["auth"] for r in other.requests] == [None]
        status = layout.models_status_file.read_text()
        assert "secret-token" not in status
        assert "secret-token" not in json.dumps(report.to_dict())
        data = json.loads(status)
        assert (data["files_total"], data["files_done"], data["files_failed"]) == (5, 5, 0)
        assert data["bytes_done"] == data["bytes_total"] == sum(map(len, (f_url, f_hf, f_civ, f_rep1, f_rep2)))
        assert data["running"] is False
        assert data["throughput_bytes_per_second"] == 0
        # Warm boot: everything skipped without a single request.
        before = len(server.requests) + len(other.requests)
        again = models.sync_models(settings, layout, options=FAST)
        assert {i.action for i in again.items} == {"skipped"}
        assert len(server.requests) + len(other.requests) - before == 1  # only the repo listing
    finally:
        other.stop()


def test_tiers_split_the_manifest_between_before_start_and_background(root: Path, server: RangeServer) -> None:
    server.files["/a.bin"] = FileSpec(blob(1000, seed=1))
    server.files["/b.bin"] = FileSpec(blob(1000, seed=2))
    layout = make_root(
        root,
        f"""
models:
  - url: {server.url("/a.bin")}
    dest: checkpoints
  - url: {server.url("/b.bin")}
    dest: checkpoints
    when: background
""",
    )
    settings = settings_for(root, server)
    first = models.sync_models(settings, layout, tier="before_start", options=FAST)
    assert [i.file for i in first.items] == ["a.bin"]
    assert not (models_dir(root) / "checkpoints" / "b.bin").exists()
    second = models.sync_models(settings, layout, tier="background", options=FAST)
    assert [(i.file, i.action) for i in second.items] == [("b.bin", "downloaded")]
    with pytest.raises(ConfigError, match="invalid tier"):
        models.sync_models(settings, layout, tier="later")


def test_a_failed_required_model_fails_the_command_and_an_optional_one_only_warns(
    root: Path, server: RangeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.files["/ok.bin"] = FileSpec(blob(100))
    layout = make_root(
        root,
        f"""
models:
  - url: {server.url("/ok.bin")}
    dest: checkpoints
  - url: {server.url("/missing-optional.bin")}
    dest: checkpoints
    optional: true
""",
    )
    settings = settings_for(root, server)
    args = argparse.Namespace(dry_run=False, tier="all", json=False)
    assert models_cli.cmd_models_sync(settings, args) == 0
    out = capsys.readouterr().out
    assert "failed" in out
    assert "missing-optional.bin" in out
    (layout.shared_dir / "models.yaml").write_text(
        f"models:\n  - url: {server.url('/gone.bin')}\n    dest: vae\n    name: the-vae\n"
    )
    assert models_cli.cmd_models_sync(settings, args) == 1
    captured = capsys.readouterr()
    assert "the-vae" in captured.err
    assert "404" in captured.out


def test_an_unknown_category_stops_the_sync_before_anything_is_fetched(root: Path, server: RangeServer) -> None:
    server.files["/a.bin"] = FileSpec(blob(10))
    layout = make_root(root, f"models:\n  - url: {server.url('/a.bin')}\n    dest: lora\n")
    with pytest.raises(ConfigError, match=r"invalid model 'a.bin' \(models.yaml models\[0\]\).*'lora'.*loras"):
        models.sync_models(settings_for(root, server), layout)
    assert server.requests == []
    assert not (root / "ComfyUI").exists()


def test_no_comfy_dir_config_and_no_models_is_an_empty_report(root: Path) -> None:
    Layout(root).shared_dir.mkdir(parents=True)
    report = models.sync_models(load_settings({"ROOT": str(root)}), Layout(root))
    assert report.items == ()
    assert report.failed == ()
    assert report.tree.warnings


def test_models_sync_on_a_fresh_root_uses_the_shipped_defaults_as_up_does(root: Path) -> None:
    shipped = Path(__file__).resolve().parents[1] / "shared"
    dry = run_cli(["models", "sync", "--dry-run", "--json"], env_for(root, None, SHARED_REPO_URL=""))
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["dry_run"] is True
    assert not (root / "shared").exists()  # a dry run reads the shipped defaults in place
    proc = run_cli(["models", "sync", "--json"], env_for(root, None, SHARED_REPO_URL=""))
    assert proc.returncode == 0, proc.stderr
    config = root / "shared" / "comfy_dir_config.yaml"
    assert config.read_bytes() == (shipped / "comfy_dir_config.yaml").read_bytes()
    assert (models_dir(root) / "checkpoints").is_dir()


def test_status_reports_progress_as_text_and_json(
    root: Path, server: RangeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(root, server)
    assert models_cli.cmd_models_status(settings, argparse.Namespace(json=False)) == 0
    assert "no model sync has run yet" in capsys.readouterr().out
    server.files["/s.bin"] = FileSpec(blob(2048))
    layout = make_root(root, f"models:\n  - url: {server.url('/s.bin')}\n    dest: vae\n")
    models.sync_models(settings, layout, options=FAST)
    assert models_cli.cmd_models_status(settings, argparse.Namespace(json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["files"][0]["state"] == "downloaded"
    assert data["files"][0]["bytes_done"] == 2048
    assert set(data) >= {
        "updated",
        "files_total",
        "files_done",
        "files_failed",
        "bytes_total",
        "bytes_done",
        "throughput_bytes_per_second",
        "files",
    }
    models_cli.cmd_models_status(settings, argparse.Namespace(json=False))
    assert "1/1 files" in capsys.readouterr().out


# ---------------------------------------------------------------- a killed sync
@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_a_sync_killed_mid_download_completes_on_the_next_run_without_a_partial_file(
    root: Path, server: RangeServer, procs: list[subprocess.Popen[str]]
) -> None:
    data = blob(6 * 1024 * 1024, seed=9)
    server.files["/big.safetensors"] = FileSpec(data, rate=3_000_000)
    make_root(
        root,
        f"""
models:
  - url: {server.url("/big.safetensors")}
    dest: checkpoints
    sha256: {sha(data)}
""",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CIVITAI_", "MODELS_"))}
    env.update(env_for(root, server))
    proc = subprocess.Popen(
        [*CLI, "models", "sync"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    procs.append(proc)
    ckpt = models_dir(root) / "checkpoints"
    final = ckpt / "big.safetensors"
    deadline = time.monotonic() + 30
    part_size = 0
    while time.monotonic() < deadline:
        parts = list(ckpt.glob(".*.part")) if ckpt.exists() else []
        if parts and parts[0].stat().st_size > 1024 * 1024:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    (part,) = ckpt.glob(".*.part")
    part_size = part.stat().st_size
    assert 0 < part_size < len(data)
    assert not final.exists()
    status = json.loads(Layout(root).models_status_file.read_text())
    assert status["running"] is True  # the killed run never marked itself finished...
    assert models_status.read_status(Layout(root))["interrupted"] is True  # ...and readers notice
    assert status["files"][0]["state"] in ("queued", "downloading")  # (rewritten at most once a second)

    server.files["/big.safetensors"] = FileSpec(data)
    before = len(server.requests)
    done = run_cli(["models", "sync", "--json"], env_for(root, server))
    assert done.returncode == 0, done.stderr
    assert final.read_bytes() == data
    assert list(ckpt.glob(".*")) == []  # no part or meta file left
    second = server.requests[before:]
    assert len(second) == 1
    assert second[0]["range"] == f"bytes={part_size}-"
    assert second[0]["sent"] == len(data) - part_size
    assert json.loads(done.stdout)["items"][0]["bytes"] == len(data) - part_size


# ---------------------------------------------------------------- metrics and the status writer
def promtool_check(text: bytes) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed")
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_download_metrics_come_from_the_status_file_and_pass_promtool(root: Path) -> None:
    layout = Layout(root)
    registry = CollectorRegistry(auto_describe=True)
    collector = models_status.DownloadsCollector(layout, clock=lambda: 1000.0)
    registry.register(collector)
    assert registry.get_sample_value("orchestrator_download_files", {"state": "total"}) == 0
    from orchestrator.machine.fs import write_json

    write_json(
        layout.models_status_file,
        {
            "updated": 995.0,
            "pid": os.getpid(),
            "running": True,
            "files_total": 3,
            "files_done": 1,
            "files_failed": 1,
            "bytes_total": 3000,
            "bytes_done": 1200,
            "throughput_bytes_per_second": 512.0,
            "files": [],
        },
    )
    assert registry.get_sample_value("orchestrator_download_bytes", {"kind": "total"}) == 3000
    assert registry.get_sample_value("orchestrator_download_bytes", {"kind": "done"}) == 1200
    assert registry.get_sample_value("orchestrator_download_files", {"state": "failed"}) == 1
    assert registry.get_sample_value("orchestrator_download_throughput_bytes_per_second") == 512
    promtool_check(generate_latest(registry))
    # A sync that died long ago has no live throughput.
    collector.clock = lambda: 5000.0
    assert registry.get_sample_value("orchestrator_download_throughput_bytes_per_second") == 0


def test_the_status_file_is_rewritten_at_most_once_a_second(tmp_path: Path) -> None:
    now = [100.0]
    path = tmp_path / "status.json"
    writer = models_status.StatusWriter(path, tier="all", clock=lambda: now[0])
    task = DownloadTask(name="t", url="http://h/t?token=zzz-secret", dest_dir=tmp_path, filename="t")
    writer.begin([task])
    writer.started(task, 1000, 0)
    for _ in range(50):
        writer.advanced(task, 10)
    assert json.loads(path.read_text())["bytes_done"] == 0  # still the first write
    now[0] = 101.5
    writer.advanced(task, 10)
    data = json.loads(path.read_text())
    assert data["bytes_done"] == 510
    assert data["throughput_bytes_per_second"] > 0
    writer.close()
    assert "zzz-secret" not in path.read_text()
