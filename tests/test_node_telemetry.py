"""Per-node job telemetry: node timings and cached nodes from the /ws events (upstream and fork),
in the job's result and in comfyui_node_execution_seconds / comfyui_job_nodes_cached_total."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from support import ComfyServer, ServedApp, http_client, jobs_app

from orchestrator.comfy.protocol import NodeProgress, NodeTiming, node_classes
from orchestrator.core.instances import InstanceView
from orchestrator.core.settings import load_settings
from orchestrator.core.states import InstanceState
from orchestrator.jobs.metrics import JobMetrics
from orchestrator.jobs.store import Job
from orchestrator.jobs.tracker import JobManager

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "workflow.json"
CLASSES = {"1": "EmptyImage", "2": "ImageInvert", "3": "SaveImage"}


def ev(kind: str, pid: str = "p", **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": {**data, "prompt_id": pid}}


def feed(progress: NodeProgress, events: list[tuple[float, dict[str, Any]]]) -> None:
    for now, message in events:
        progress.update(message, "p", now)


# ---------------------------------------------------------------- timings from events (pure)
def test_upstream_events_give_each_node_its_time_and_the_cached_ones_zero() -> None:
    progress = NodeProgress(total=4, class_types={**CLASSES, "4": "PreviewImage"})
    feed(progress, [
        (0.0, ev("execution_start")),
        (0.0, ev("execution_cached", nodes=["4"])),
        (1.0, ev("executing", node="1")),
        (1.5, ev("executing", node="2")),
        (1.6, ev("executing", node="9", pid="other")),  # another prompt's: ignored
        (3.5, ev("executing", node="3")),
        (4.0, ev("executed", node="3")),
        (9.0, ev("execution_success")),  # after the last node closed: does not extend it
        (9.0, ev("executing", node=None)),
    ])
    assert progress.timings() == [
        NodeTiming("4", "PreviewImage", 0.0, True),
        NodeTiming("1", "EmptyImage", 0.5, False),
        NodeTiming("2", "ImageInvert", 2.0, False),
        NodeTiming("3", "SaveImage", 0.5, False),
    ]
    assert progress.done == 4


def test_a_node_without_executed_ends_at_execution_success() -> None:
    progress = NodeProgress(total=1, class_types={"1": "EmptyImage"})
    feed(progress, [(2.0, ev("executing", node="1")), (2.25, ev("execution_success")), (3.0, ev("executing", node=None))])
    assert progress.timings() == [NodeTiming("1", "EmptyImage", 0.25, False)]


def test_the_forks_node_executing_names_the_class_and_does_not_restart_the_node() -> None:
    progress = NodeProgress(total=2)  # no workflow classes: the fork's message supplies them
    feed(progress, [
        (0.0, ev("executing", node="1")),
        (0.1, ev("node_executing", node="1", class_type="EmptyImage", progress={"current": 1, "total": 2})),
        (0.4, ev("executing", node="2")),
        (0.4, ev("node_executing", node="2", class_type="SaveImage", progress={"current": 2, "total": 2})),
        (1.0, ev("executing", node=None)),
    ])
    assert [(t.id, t.class_type, round(t.seconds, 6)) for t in progress.timings()] == [
        ("1", "EmptyImage", 0.4), ("2", "SaveImage", 0.6)]


def test_a_failing_node_is_timed_until_the_error() -> None:
    progress = NodeProgress(total=3, class_types=CLASSES)
    feed(progress, [(0.0, ev("executing", node="1")), (0.2, ev("executing", node="2")),
                    (0.7, ev("execution_error", node_id="2"))])
    assert [(t.id, round(t.seconds, 6)) for t in progress.timings()] == [("1", 0.2), ("2", 0.5)]


def test_without_a_clock_progress_is_counted_but_nothing_is_timed() -> None:
    progress = NodeProgress(total=2)
    for message in (ev("executing", node="1"), ev("executing", node="2"), ev("executing", node=None)):
        progress.update(message, "p")
    assert progress.done == 2
    assert progress.timings() == []


def test_node_classes_come_from_the_workflow() -> None:
    workflow = json.loads(EXAMPLE.read_text())["workflow"]
    assert node_classes(workflow)["3"] == "KSampler"
    assert node_classes(workflow)["4"] == "CheckpointLoaderSimple"


def test_job_metrics_observe_executed_nodes_by_class_and_count_cached_ones() -> None:
    registry = CollectorRegistry()
    metrics = JobMetrics(registry, dict, list)
    job = Job("j", {}, [], "filenames", None, 60, 0.0, 0.0, 60.0, status="success", execution_time=3.0)
    job.progress = NodeProgress(total=4, class_types=CLASSES)
    feed(job.progress, [(0.0, ev("execution_cached", nodes=["1", "2"])), (0.0, ev("executing", node="3")),
                        (2.0, ev("executed", node="3")), (2.0, ev("executing", node="4")), (3.0, ev("execution_success"))])
    metrics.finished(job)
    value = registry.get_sample_value
    assert value("comfyui_node_execution_seconds_count", {"class_type": "SaveImage"}) == 1
    assert value("comfyui_node_execution_seconds_sum", {"class_type": "SaveImage"}) == 2.0
    assert value("comfyui_node_execution_seconds_count", {"class_type": "unknown"}) == 1  # node 4: no class known
    assert value("comfyui_job_nodes_cached_total") == 2
    assert job.to_response().nodes[0].model_dump() == {"id": "1", "class_type": "EmptyImage", "seconds": 0.0,
                                                       "cached": True}


# ---------------------------------------------------------------- a job on a simulated instance
class OneInstance:
    def __init__(self, port: int) -> None:
        self.view = InstanceView(0, "comfyui_gpu0", port, InstanceState.READY)
        self.lock = threading.Lock()

    def snapshot(self) -> list[InstanceView]:
        return [self.view]

    def report_hung(self, index: int, reason: str) -> None:
        raise AssertionError(f"unexpected hung report: {reason}")


@pytest.fixture(scope="module", params=["upstream", "fork"])
def sim(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    from orchestrator.simulator.tree import write_code_tree

    base = tmp_path_factory.mktemp(f"sim-{request.param}")
    write_code_tree(base / "ComfyUI")
    server = ComfyServer(base / "ComfyUI", base / "inst", env={"SIM_EXEC_TIME": "0.5", "SIM_PROTOCOL": request.param})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_a_jobs_result_lists_its_nodes_with_timings_and_the_metric_has_samples(sim: ComfyServer) -> None:
    registry = CollectorRegistry()
    settings = load_settings({"ROOT": "/nonexistent-root", "PROBE_INTERVAL": "2"})
    manager = JobManager(settings, OneInstance(sim.port), registry, poll_interval=5, check_interval=0.1)
    workflow = json.loads(EXAMPLE.read_text())["workflow"]
    with ServedApp(jobs_app(manager)) as served, http_client(served.url, timeout=60) as client:
        first = client.post("/jobs", json={"workflow": workflow, "seed": 1234567}).json()
        again = client.post("/jobs", json={"workflow": workflow, "seed": 1234567}).json()
    assert first["status"] == "success", first
    nodes = first["nodes"]
    assert {n["id"]: n["class_type"] for n in nodes} == node_classes(workflow)
    assert not any(n["cached"] for n in nodes)
    by_class = {n["class_type"]: n["seconds"] for n in nodes}
    # 20 of the simulated 0.5 s go to the KSampler's steps: it is the slowest node by far.
    assert max(by_class, key=lambda c: by_class[c]) == "KSampler"
    assert by_class["KSampler"] > 0.2
    assert sum(by_class.values()) <= first["run_seconds"] + 0.05
    assert first["queue_wait_seconds"] is not None
    assert first["routing"]["instance"] == "comfyui_gpu0"
    assert first["routing"]["policy"] == "capacity"
    assert first["peak_vram_bytes"] is None  # simulated: no GPU to sample

    # The identical prompt again: everything comes from the instance's cache.
    assert again["status"] == "success", again
    assert [n["cached"] for n in again["nodes"]] == [True] * len(workflow)
    value = registry.get_sample_value
    assert value("comfyui_node_execution_seconds_count", {"class_type": "KSampler"}) == 1
    assert value("comfyui_node_execution_seconds_sum", {"class_type": "KSampler"}) == pytest.approx(
        by_class["KSampler"], abs=1e-3)
    assert value("comfyui_job_nodes_cached_total") == len(workflow)


# ---------------------------------------------------------------- peak GPU memory from the monitor's samples
def gpu_status(index: int, used: int | None, at: float | None, *, mock: bool = False, failed: bool = False) -> Any:
    from orchestrator.core.gpus import Gpu, GpuSample
    from orchestrator.core.readiness import GpuStatus

    gpu = Gpu(index, f"GPU-{index}", "0:0", "NVIDIA H100", 80 * 2**30, "550", mock=mock)
    return GpuStatus(gpu, GpuSample(index, gpu.uuid, failed=failed, memory_used=used), at)


def running_job(gpu: int, started_wall: float) -> Job:
    job = Job("j", {}, [], "filenames", None, 60, created_at=started_wall - 2, created_mono=100.0, deadline=160.0,
              status="running", started_mono=102.0)
    job.instance = InstanceView(gpu, f"comfyui_gpu{gpu}", 8188 + gpu, InstanceState.READY)
    return job


def test_peak_vram_is_the_most_its_device_used_in_samples_taken_while_it_ran() -> None:
    from orchestrator.jobs.vram import update_peak

    job = running_job(1, started_wall=1000.0)
    update_peak(job, [gpu_status(1, 9 * 2**30, 999.0)])  # sampled before the job started
    assert job.peak_vram_bytes is None
    update_peak(job, [gpu_status(0, 70 * 2**30, 1001.0), gpu_status(1, 5 * 2**30, 1001.0)])  # GPU 0: not its own
    update_peak(job, [gpu_status(1, 12 * 2**30, 1002.0)])
    update_peak(job, [gpu_status(1, 7 * 2**30, 1003.0), gpu_status(1, None, 1004.0, failed=True)])
    assert job.peak_vram_bytes == 12 * 2**30
    mock = running_job(0, started_wall=1000.0)
    update_peak(mock, [gpu_status(0, 3 * 2**30, 1001.0, mock=True)])
    assert mock.peak_vram_bytes is None  # mock GPUs report no real memory use


def test_the_manager_watches_running_jobs_on_the_monitors_samples() -> None:
    import asyncio

    from orchestrator.jobs.vram import watch_peaks

    job = running_job(0, started_wall=1000.0)
    readings = iter([1 * 2**30, 4 * 2**30, 2 * 2**30])

    def statuses() -> list[Any]:
        return [gpu_status(0, next(readings, 2 * 2**30), 1005.0)]

    async def main() -> None:
        task = asyncio.create_task(watch_peaks(lambda: [job], statuses, interval=0.001))
        for _ in range(5000):
            if job.peak_vram_bytes == 4 * 2**30:
                break
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(main())
    assert job.peak_vram_bytes == 4 * 2**30
