"""Collectors on a fresh registry: names, labels, omitted samples, promtool, never blocking on NVML."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from orchestrator.core.errors import ConfigError
from orchestrator.core.gpus import Gpu, GpuSample
from orchestrator.core.layout import Layout
from orchestrator.core.readiness import GpuStatus, InstanceStatus
from orchestrator.core.settings import Settings, load_settings
from orchestrator.core.states import InstanceState
from orchestrator.machine.fs import write_json
from orchestrator.monitor.metrics import build_registry
from orchestrator.monitor.sampler import GpuSampler

GPUS = [
    Gpu(0, "GPU-aaaa", "00000000:01:00.0", "NVIDIA H100 80GB HBM3", 80 * 2**30, "550.54"),
    Gpu(1, "GPU-bbbb", "00000000:02:00.0", "NVIDIA H100 80GB HBM3", 80 * 2**30, "550.54"),
]


def status(gpu: int, state: InstanceState = InstanceState.READY, **kw: object) -> InstanceStatus:
    base = InstanceStatus(
        gpu=gpu, name=f"comfyui_gpu{gpu}", port=8188 + gpu, state=state, reason="answering", since=1.0,
        process_state="RUNNING", pid=100 + gpu, start_time=1_700_000_000.0, uptime=10.0, restarts=2,
        failed_custom_nodes=(), queue_pending=3, queue_running=1, last_probe=1.0, probe_duration=0.012,
        device="cpu",
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


class FakeSource:
    def __init__(self, statuses: Sequence[InstanceStatus], gpus: Sequence[GpuStatus] = ()) -> None:
        self.statuses = list(statuses)
        self.gpus = list(gpus)
        self.supervisord_ok = True

    def instance_statuses(self) -> list[InstanceStatus]:
        return list(self.statuses)

    def gpu_statuses(self) -> list[GpuStatus]:
        return list(self.gpus)


def settings_for(root: Path, **env: str) -> Settings:
    return load_settings({"ROOT": str(root), **env})


def full_sample(gpu: Gpu, **kw: object) -> GpuSample:
    base = GpuSample(
        index=gpu.index, uuid=gpu.uuid, utilization=87.0, memory_used=10 * 2**30, memory_free=70 * 2**30,
        temperature=61.0, power=412.5, sm_clock=1980.0, memory_clock=2619.0,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def full_source() -> FakeSource:
    statuses = [
        status(0, failed_custom_nodes=("ComfyUI-Broken", "was-node-suite")),
        status(1, InstanceState.UNHEALTHY, queue_pending=None, queue_running=None, start_time=None),
    ]
    gpus = [GpuStatus(g, full_sample(g), 1.0) for g in GPUS]
    return FakeSource(statuses, gpus)


def test_instance_metrics_carry_gpu_instance_and_port_labels(tmp_path: Path) -> None:
    reg = build_registry(full_source(), settings_for(tmp_path), Layout(tmp_path), hostname="worker-1")
    labels = {"gpu": "0", "instance": "comfyui_gpu0", "port": "8188"}
    assert reg.get_sample_value("comfyui_instance_up", labels) == 1
    assert reg.get_sample_value("comfyui_instance_ready", labels) == 1
    assert reg.get_sample_value("comfyui_instance_restarts_total", labels) == 2
    assert reg.get_sample_value("comfyui_instance_queue_pending", labels) == 3
    assert reg.get_sample_value("comfyui_instance_queue_running", labels) == 1
    assert reg.get_sample_value("comfyui_instance_probe_duration_seconds", labels) == 0.012
    assert reg.get_sample_value("comfyui_instance_start_time_seconds", labels) == 1_700_000_000
    node = {**labels, "node": "ComfyUI-Broken"}
    assert reg.get_sample_value("comfyui_instance_failed_custom_nodes", node) == 1
    assert reg.get_sample_value("orchestrator_supervisord_up") == 1


def test_the_state_gauge_is_the_state_code_with_the_state_named_in_a_label(tmp_path: Path) -> None:
    reg = build_registry(full_source(), settings_for(tmp_path), Layout(tmp_path), hostname="h")
    one = {"gpu": "1", "instance": "comfyui_gpu1", "port": "8189"}
    assert reg.get_sample_value("comfyui_instance_state", {**one, "state": "UNHEALTHY"}) == 3
    assert reg.get_sample_value("comfyui_instance_ready", one) == 0
    # unknown values are omitted, not exported as 0
    assert reg.get_sample_value("comfyui_instance_queue_pending", one) is None
    assert reg.get_sample_value("comfyui_instance_start_time_seconds", one) is None
    text = generate_latest(reg).decode()
    assert text.count("comfyui_instance_state{") == 2


def test_gpu_gauges_use_dcgm_names_units_and_labels(tmp_path: Path) -> None:
    s = settings_for(tmp_path, GPU_METRICS_HOST_LABEL="Hostname")
    reg = build_registry(full_source(), s, Layout(tmp_path), hostname="worker-1")
    labels = {
        "gpu": "0", "UUID": "GPU-aaaa", "pci_bus_id": "00000000:01:00.0", "device": "nvidia0",
        "model_name": "NVIDIA H100 80GB HBM3", "Hostname": "worker-1", "DCGM_FI_DRIVER_VERSION": "550.54",
    }
    assert reg.get_sample_value("DCGM_FI_DEV_GPU_UTIL", labels) == 87
    assert reg.get_sample_value("DCGM_FI_DEV_FB_USED", labels) == 10 * 1024  # MiB, like dcgm-exporter
    assert reg.get_sample_value("DCGM_FI_DEV_FB_FREE", labels) == 70 * 1024
    assert reg.get_sample_value("DCGM_FI_DEV_GPU_TEMP", labels) == 61
    assert reg.get_sample_value("DCGM_FI_DEV_POWER_USAGE", labels) == 412.5
    assert reg.get_sample_value("DCGM_FI_DEV_SM_CLOCK", labels) == 1980
    assert reg.get_sample_value("DCGM_FI_DEV_MEM_CLOCK", labels) == 2619


def test_the_host_and_model_label_names_are_configurable(tmp_path: Path) -> None:
    s = settings_for(tmp_path, GPU_METRICS_HOST_LABEL="node", GPU_METRICS_MODEL_LABEL="modelName")
    reg = build_registry(full_source(), s, Layout(tmp_path), hostname="w2")
    labels = {"gpu": "1", "UUID": "GPU-bbbb", "pci_bus_id": "00000000:02:00.0", "device": "nvidia1",
              "modelName": "NVIDIA H100 80GB HBM3", "node": "w2", "DCGM_FI_DRIVER_VERSION": "550.54"}
    assert reg.get_sample_value("DCGM_FI_DEV_GPU_UTIL", labels) == 87


@pytest.mark.parametrize("label", ["host-name", "__host", "gpu", "9x"])
def test_an_unusable_host_label_is_a_config_error(tmp_path: Path, label: str) -> None:
    with pytest.raises(ConfigError, match="GPU_METRICS_HOST_LABEL"):
        build_registry(full_source(), settings_for(tmp_path, GPU_METRICS_HOST_LABEL=label), Layout(tmp_path))


def test_unsupported_fields_are_omitted_and_a_failed_gpu_exports_no_readings(tmp_path: Path) -> None:
    src = full_source()
    src.gpus = [
        GpuStatus(GPUS[0], full_sample(GPUS[0], power=None, temperature=None), 1.0),
        GpuStatus(GPUS[1], GpuSample(index=1, uuid="GPU-bbbb", failed=True, error="GPU is lost"), 1.0),
    ]
    reg = build_registry(src, settings_for(tmp_path), Layout(tmp_path), hostname="h")
    text = generate_latest(reg).decode()
    assert 'DCGM_FI_DEV_POWER_USAGE{' not in text
    assert 'DCGM_FI_DEV_GPU_TEMP{' not in text
    assert text.count("DCGM_FI_DEV_GPU_UTIL{") == 1
    assert reg.get_sample_value(
        "orchestrator_gpu_failed",
        {"gpu": "1", "UUID": "GPU-bbbb", "pci_bus_id": "00000000:02:00.0", "device": "nvidia1",
         "model_name": "NVIDIA H100 80GB HBM3", "Hostname": "h", "DCGM_FI_DRIVER_VERSION": "550.54",
         "reason": "lost"},
    ) == 1


def test_gpu_metrics_off_exports_no_dcgm_gauges(tmp_path: Path) -> None:
    reg = build_registry(full_source(), settings_for(tmp_path, GPU_METRICS="off"), Layout(tmp_path))
    assert "DCGM_" not in generate_latest(reg).decode()


def test_provisioning_metrics_come_from_status_json_without_credentials(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_json(layout.status_file, {
        "stages": {"detect": 0.01, "sync": 12.5, "nodes": 40.0, "render": 0.002, "start": {"seconds": 3.0}},
        "comfy": {"url": "https://x:ghp_secretvalue@github.com/stakeordie/ComfyUI.git", "ref": "forward",
                  "commit": "02a1b01", "fallback": True},
        "nodes": {"counts": {"installed": 58, "failed": 2, "skipped": 1}, "failed": ["a", "b"]},
        "updated": 1.0,
    })
    reg = build_registry(FakeSource([status(0)]), settings_for(tmp_path), layout, hostname="h")
    assert reg.get_sample_value("orchestrator_stage_duration_seconds", {"stage": "nodes"}) == 40
    assert reg.get_sample_value("orchestrator_stage_duration_seconds", {"stage": "start"}) == 3
    assert reg.get_sample_value("orchestrator_nodes", {"state": "failed"}) == 2
    assert reg.get_sample_value("orchestrator_comfy_fallback") == 1
    text = generate_latest(reg).decode()
    assert 'comfy_fallback="true"' in text
    assert 'comfy_repo="https://github.com/stakeordie/ComfyUI.git"' in text
    assert "ghp_secretvalue" not in text


def test_the_status_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    reg = build_registry(FakeSource([]), settings_for(tmp_path), layout, hostname="h")
    assert reg.get_sample_value("orchestrator_comfy_fallback") == 0
    write_json(layout.status_file, {"comfy": {"fallback": True}, "stages": {}})
    assert reg.get_sample_value("orchestrator_comfy_fallback") == 1


def test_a_dead_instance_disappears_from_the_next_scrape(tmp_path: Path) -> None:
    src = full_source()
    reg = build_registry(src, settings_for(tmp_path), Layout(tmp_path), hostname="h")
    assert "comfyui_gpu1" in generate_latest(reg).decode()
    src.statuses = src.statuses[:1]
    assert "comfyui_gpu1" not in generate_latest(reg).decode()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_the_exposition_passes_promtool_check_metrics(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_json(layout.status_file, {"stages": {"detect": 0.1}, "nodes": {"counts": {"installed": 3}},
                                    "comfy": {"url": "file:///x", "ref": "forward", "commit": "abc"}})
    reg = build_registry(full_source(), settings_for(tmp_path), layout, hostname="worker-1")
    text = generate_latest(reg)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


class BlockingBackend:
    """A GPU backend whose second sample hangs until released (a stuck NVML call)."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()
        self.entered = threading.Event()

    def list_gpus(self) -> list[Gpu]:
        return list(GPUS)

    def sample(self, gpus: Sequence[Gpu]) -> list[GpuSample]:
        self.calls += 1
        if self.calls > 1:
            self.entered.set()
            self.release.wait(10)
        return [full_sample(g, utilization=float(self.calls)) for g in gpus]

    def close(self) -> None:
        return None


def test_a_scrape_never_waits_on_a_stuck_gpu_sample(tmp_path: Path) -> None:
    backend = BlockingBackend()
    sampler = GpuSampler(lambda: backend, GPUS, interval=0.01)
    src = FakeSource([status(0)])
    src.gpu_statuses = sampler.statuses  # type: ignore[method-assign]
    reg = build_registry(src, settings_for(tmp_path), Layout(tmp_path), hostname="h")
    sampler.start()
    try:
        assert backend.entered.wait(30)
        # The sample stays stuck until ``release`` (set only below): a scrape that waited on it would
        # never return. The deadline only catches that hang; how fast a scrape is belongs in bench/.
        scraped: list[str] = []
        scrape = threading.Thread(target=lambda: scraped.append(generate_latest(reg).decode()), daemon=True)
        scrape.start()
        scrape.join(30)
        assert not scrape.is_alive(), "the scrape waited on the stuck GPU sample"
        text = scraped[0]
        assert 'DCGM_FI_DEV_GPU_UTIL{' in text  # the previous sample is still served
    finally:
        backend.release.set()
        sampler.stop()


def test_the_fast_renderer_is_byte_identical_to_generate_latest(tmp_path: Path) -> None:
    from prometheus_client import Counter, Histogram, Info

    from orchestrator.monitor.metrics import TextRenderer

    src = full_source()
    src.statuses[0] = status(0, failed_custom_nodes=('odd "node"\\name', "multi\nline"))
    reg = build_registry(src, settings_for(tmp_path), Layout(tmp_path), hostname="h")
    jobs = Counter("comfyui_jobs", "Jobs by outcome", ["status"], registry=reg)
    hist = Histogram("comfyui_job_duration_seconds", "Job time", registry=reg)
    Info("orchestrator_extra", "Info metric", registry=reg).info({"a": "b"})
    renderer = TextRenderer()
    for i in range(3):  # the label-set cache must not serve stale values
        jobs.labels("succeeded").inc()
        hist.observe(0.1 * i)
        src.statuses[1] = status(1, restarts=i)
        assert renderer.render(reg) == generate_latest(reg)
    assert b'node="odd \\"node\\"\\\\name"' in renderer.render(reg)
