"""GPU faults: the device plugin's classification (pure), then the real Monitor loop with the mock
backend emitting Xid events: a critical Xid fences the GPU (no routing, instance stopped, /readyz,
/gpus and the metrics name it), an application Xid restarts only that GPU's instance."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from aiohttp import web
from prometheus_client import generate_latest
from support import simulated_machine, txt2img, wait_for

from orchestrator.core.gpufaults import (
    APPLICATION_XIDS,
    EventKind,
    GpuEvent,
    GpuHealth,
    Verdict,
    classify,
)
from orchestrator.core.gpus import Gpu, GpuSample
from orchestrator.core.health import HealthConfig
from orchestrator.core.layout import Layout
from orchestrator.core.plan import build_plan
from orchestrator.core.readiness import GpuStatus, InstanceStatus
from orchestrator.core.routing import RouteError, route
from orchestrator.core.settings import load_settings
from orchestrator.core.states import InstanceState, ProcessInfo, ProcessState
from orchestrator.machine.gpu import MOCK_EVENTS_FILE, MockBackend
from orchestrator.machine.ports import free_port_block
from orchestrator.machine.state import create_instance_dirs
from orchestrator.monitor.api import create_app
from orchestrator.monitor.loop import Monitor
from orchestrator.monitor.metrics import build_registry


# ================================================================ pure classification
@pytest.mark.parametrize("xid", sorted(APPLICATION_XIDS))
def test_application_xids_restart_the_instance(xid: int) -> None:
    assert classify(GpuEvent(EventKind.XID, 0, xid)) is Verdict.RESTART_INSTANCE


@pytest.mark.parametrize("xid", [48, 63, 64, 74, 79, 94, 95, 109, 119, 1])
def test_any_other_critical_xid_fails_the_gpu(xid: int) -> None:
    assert classify(GpuEvent(EventKind.XID, 0, xid)) is Verdict.MARK_FAILED


def test_ecc_events_are_counted_only() -> None:
    h = GpuHealth()
    h, v1 = h.apply(GpuEvent(EventKind.ECC_SINGLE, 0))
    h, v2 = h.apply(GpuEvent(EventKind.ECC_DOUBLE, 0))
    assert (v1, v2) == (Verdict.COUNT, Verdict.COUNT)
    assert (h.ecc_single, h.ecc_double, h.failed, h.last_xid) == (1, 1, False, None)


def test_health_folds_events_and_a_failed_gpu_asks_for_nothing_more() -> None:
    h = GpuHealth(listening=True)
    h, v = h.apply(GpuEvent(EventKind.XID, 1, 13))
    assert v is Verdict.RESTART_INSTANCE
    assert not h.failed
    assert h.last_xid == 13
    h, v = h.apply(GpuEvent(EventKind.XID, 1, 79))
    assert v is Verdict.MARK_FAILED
    assert h.failed
    assert h.reason == "critical Xid 79 (GPU has fallen off the bus)"
    assert h.failed_reason_label == "xid_79"
    h, v = h.apply(GpuEvent(EventKind.XID, 1, 13))  # already stopped: no restart
    assert v is Verdict.COUNT
    h, v = h.apply(GpuEvent(EventKind.XID, 1, 48))
    assert v is Verdict.COUNT
    assert (h.failed_xid, h.last_xid, h.xid_events) == (79, 48, 4)


# ================================================================ the monitor, with a fake supervisord
class FakeComfy:
    async def system_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"system": {}, "devices": [{"name": "cpu", "type": "cpu", "vram_total": 1}]})

    async def queue(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"queue_running": [], "queue_pending": []})


class FakeSupervisor:
    """Records calls; stop/start change the process table as supervisord would."""

    def __init__(self, names: list[str]) -> None:
        self.lock = threading.Lock()
        self.procs = {n: self._info(n, ProcessState.RUNNING, 1000 + i) for i, n in enumerate(names)}
        self.calls: list[tuple[str, ...]] = []

    @staticmethod
    def _info(name: str, state: ProcessState, pid: int) -> ProcessInfo:
        now = time.time()
        return ProcessInfo(name, state, pid if state is ProcessState.RUNNING else 0, now, now, 0, "", "")

    def processes(self) -> list[ProcessInfo]:
        with self.lock:
            return list(self.procs.values())

    def start(self, name: str, wait: bool = False) -> None:
        with self.lock:
            self.calls.append(("start", name))
            self.procs[name] = self._info(name, ProcessState.RUNNING, 5000 + len(self.calls))

    def stop(self, name: str, wait: bool = True) -> None:
        with self.lock:
            self.calls.append(("stop", name))
            self.procs[name] = self._info(name, ProcessState.STOPPED, 0)

    def signal(self, name: str, sig: str) -> None:
        with self.lock:
            self.calls.append(("signal", name, sig))


class Rig:
    def __init__(self, monitor: Monitor, sup: FakeSupervisor, backend: MockBackend, tmp: Path) -> None:
        self.monitor, self.sup, self.backend, self.tmp = monitor, sup, backend, tmp

    async def until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll ``predicate``; the deadline only ends a failing test, it measures nothing."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; calls {self.sup.calls}; {self.monitor.readiness().reason}")
            await asyncio.sleep(0.02)

    def client(self) -> httpx.AsyncClient:
        registry = build_registry(self.monitor, self.monitor.settings, Layout(self.tmp), hostname="h")
        app = create_app(self.monitor, self.monitor.settings, registry)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://monitor")


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    base = free_port_block(2)
    settings = load_settings({
        "ROOT": str(tmp_path), "MOCK_GPU": "1", "NUM_GPUS": "2", "WORKER_BASE_COMFYUI_PORT": str(base),
        "PROBE_INTERVAL": "0.2", "PROBE_TIMEOUT": "1", "GPU_SAMPLE_INTERVAL": "0.1", "METRICS_CACHE": "0",
    })
    backend = MockBackend(2, 2**30)
    plan = build_plan(settings, backend.list_gpus())
    create_instance_dirs(plan)
    sup = FakeSupervisor([i.name for i in plan.instances])
    monitor = Monitor(settings, plan, supervisor_factory=lambda timeout: sup, backend_factory=lambda: backend)
    monitor.loop.cfg = HealthConfig(startup_timeout=30, unhealthy_threshold=3, backoff_base=0.2)
    async with AsyncExitStack() as stack:
        for inst in plan.instances:
            app = web.Application()
            fake = FakeComfy()
            app.router.add_get("/system_stats", fake.system_stats)
            app.router.add_get("/queue", fake.queue)
            runner = web.AppRunner(app, shutdown_timeout=0.1)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", inst.port).start()
        await monitor.start()
        try:
            r = Rig(monitor, sup, backend, tmp_path)
            await r.until(lambda: monitor.readiness().ready)
            yield r
        finally:
            await monitor.close()


def run(fn: Callable[[Path], Any], tmp_path: Path) -> None:
    asyncio.run(fn(tmp_path))


def test_a_critical_xid_on_gpu_1_fences_it_everywhere(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        async with rig(tmp) as r:
            assert all(h.listening for h in r.monitor.gpu_faults.health().values())
            r.backend.push_event(1, 79)
            await r.until(lambda: ("stop", "comfyui_gpu1") in r.sup.calls)
            # routing: GPU 1 never gets a job, pinned or not
            views = r.monitor.snapshot()
            assert "Xid 79" in views[1].fenced
            assert not views[0].fenced
            for _ in range(3):
                assert route(views, {}, max_queue_depth=8).index == 0
            with pytest.raises(RouteError, match="GPU 1 failed: critical Xid 79") as err:
                route(views, {}, max_queue_depth=8, gpu=1)
            assert err.value.status == 503
            # the instance stays stopped: the probe loop neither restarts nor starts it
            await asyncio.sleep(1.0)
            assert [c for c in r.sup.calls if c[0] == "start"] == []
            st = r.monitor.instance_status(1)
            assert st.state is InstanceState.UNHEALTHY
            assert "GPU 1 failed" in st.reason
            assert r.monitor.instance_status(0).state is InstanceState.READY
            async with r.client() as http:
                ready = await http.get("/readyz")
                assert ready.status_code == 503
                assert "GPU 1 failed: critical Xid 79 (GPU has fallen off the bus)" in ready.json()["reason"]
                gpus = {g["index"]: g for g in (await http.get("/gpus")).json()["gpus"]}
                assert (gpus[1]["health"], gpus[1]["last_xid"], gpus[1]["fault_events"]) == ("failed", 79, True)
                assert "Xid 79" in gpus[1]["health_reason"]
                assert gpus[0]["health"] == "ok"
                status = (await http.get("/status")).json()
                assert status["gpus"][1]["health"] == "failed"
                assert "GPU 1 failed" in status["reason"]
                text = (await http.get("/metrics")).text
            assert 'orchestrator_gpu_failed{' in text
            failed = [line for line in text.splitlines() if line.startswith("orchestrator_gpu_failed{")]
            assert any('gpu="1"' in line and 'reason="xid_79"' in line and line.endswith(" 1.0") for line in failed)
            assert any('gpu="0"' in line and 'reason=""' in line and line.endswith(" 0.0") for line in failed)
            xids = [line for line in text.splitlines() if line.startswith("DCGM_FI_DEV_XID_ERRORS{")]
            assert any('gpu="1"' in line and line.endswith(" 79.0") for line in xids)

    run(main, tmp_path)


def test_an_application_xid_restarts_only_its_instance(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        async with rig(tmp) as r:
            r.backend.push_event(0, 13)
            await r.until(lambda: ("start", "comfyui_gpu0") in r.sup.calls)
            await r.until(lambda: r.monitor.instance_status(0).ready)
            assert all(c[1] == "comfyui_gpu0" for c in r.sup.calls)
            assert r.monitor.instance_status(0).restarts == 1
            assert r.monitor.instance_status(1).restarts == 0
            assert not any(v.fenced for v in r.monitor.snapshot())
            assert r.monitor.readiness().ready
            assert r.monitor.gpu_faults.health()[0].last_xid == 13

    run(main, tmp_path)


def test_an_event_nvml_cannot_place_applies_to_every_gpu(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        async with rig(tmp) as r:
            r.backend.push_event(None, 79)
            await r.until(lambda: {("stop", "comfyui_gpu0"), ("stop", "comfyui_gpu1")} <= set(r.sup.calls))
            with pytest.raises(RouteError, match=r"no READY instance to run the job \(0:FENCED, 1:FENCED\)"):
                route(r.monitor.snapshot(), {}, max_queue_depth=8)

    run(main, tmp_path)


# ================================================================ the dcgm health fields on /metrics
class GpuSource:
    def __init__(self, gpus: list[GpuStatus]) -> None:
        self.gpus = gpus
        self.supervisord_ok = True

    def instance_statuses(self) -> list[InstanceStatus]:
        return []

    def gpu_statuses(self) -> list[GpuStatus]:
        return self.gpus


def test_the_health_fields_use_dcgm_names_and_a_missing_one_is_omitted(tmp_path: Path) -> None:
    a = Gpu(0, "GPU-aaaa", "00000000:01:00.0", "NVIDIA H100 80GB HBM3", 80 * 2**30, "550.54.15")
    b = Gpu(1, "GPU-bbbb", "00000000:02:00.0", "NVIDIA L4", 24 * 2**30, "550.54.15")
    full = GpuSample(0, a.uuid, total_energy=123_456_789, memory_temperature=71.0, pcie_replay=7,
                     ecc_sbe_volatile=3, ecc_dbe_volatile=0, ecc_sbe_aggregate=11, ecc_dbe_aggregate=1,
                     remapped_rows_correctable=2, remapped_rows_uncorrectable=1, row_remap_failure=0,
                     power_violation=5000.0, thermal_violation=0.0, throttle_reasons=4)
    bare = GpuSample(1, b.uuid, utilization=3.0)  # no ECC, no HBM, no energy counter
    src = GpuSource([
        GpuStatus(a, full, 1.0, GpuHealth(listening=True, last_xid=48, failed=True, failed_xid=48, reason="r")),
        GpuStatus(b, bare, 1.0, GpuHealth(listening=False, listen_error="not supported")),
    ])
    s = load_settings({"ROOT": str(tmp_path)})
    reg = build_registry(src, s, Layout(tmp_path), hostname="h")
    labels = {"gpu": "0", "UUID": "GPU-aaaa", "pci_bus_id": "00000000:01:00.0", "device": "nvidia0",
              "model_name": "NVIDIA H100 80GB HBM3", "Hostname": "h", "DCGM_FI_DRIVER_VERSION": "550.54.15"}
    expected = {
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 123_456_789, "DCGM_FI_DEV_MEMORY_TEMP": 71,
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": 7, "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": 3,
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 0, "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": 11,
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": 1, "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": 2,
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": 1, "DCGM_FI_DEV_ROW_REMAP_FAILURE": 0,
        "DCGM_FI_DEV_POWER_VIOLATION": 5000, "DCGM_FI_DEV_THERMAL_VIOLATION": 0,
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": 4, "DCGM_FI_DEV_XID_ERRORS": 48,
    }
    for name, value in expected.items():
        assert reg.get_sample_value(name, labels) == value, name
    assert reg.get_sample_value("orchestrator_gpu_failed", {**labels, "reason": "xid_48"}) == 1
    text = generate_latest(reg).decode()
    for name in expected:  # GPU 1 lacks every one of them (and its listener is off: no Xid field)
        assert f'{name}{{' in text
        assert not any(line.startswith(name + "{") and 'gpu="1"' in line for line in text.splitlines()), name
    assert 'DCGM_FI_DEV_GPU_UTIL{' in text
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
        # Parses (exit 1 would be a format error); the one lint is dcgm-exporter's own name, kept
        # exactly so that NVIDIA's dashboards work: "..._COUNTER should not include type 'counter'".
        lints = [line for line in (r.stdout + r.stderr).decode().splitlines() if line]
        assert r.returncode in (0, 3), lints
        assert lints == ["DCGM_FI_DEV_PCIE_REPLAY_COUNTER metric name should not include type 'counter'"]


# ================================================================ a real machine (supervisord, the simulator)
def test_on_a_real_machine_xid_79_fences_gpu_1_and_xid_13_restarts_only_gpu_0(tmp_path: Path) -> None:
    m = simulated_machine(tmp_path / "root", 2)
    m.up()
    try:
        wait_for(m.ready, 90, 0.2, what="/readyz 200")
        url = m.monitor_url
        events = m.layout.state_dir / MOCK_EVENTS_FILE

        def inst(gpu: int) -> dict[str, Any]:
            return dict(requests.get(f"{url}/instances/{gpu}", timeout=5).json())

        pid0 = inst(0)["pid"]
        with events.open("a") as fh:
            fh.write(json.dumps({"gpu": 1, "xid": 79}) + "\n")
        wait_for(lambda: inst(1)["process_state"] == "STOPPED", 60, 0.2, what="GPU 1's instance stopped")
        ready = requests.get(f"{url}/readyz", timeout=5)
        assert ready.status_code == 503
        assert "GPU 1 failed: critical Xid 79" in ready.json()["reason"]
        for n in range(3):
            r = requests.post(f"{url}/jobs", json={"workflow": txt2img(f"x{n}"), "timeout": 60}, timeout=90)
            assert r.status_code == 200, r.text
            assert r.json()["instance"]["gpu"] == 0
        pinned = requests.post(f"{url}/jobs", json={"workflow": txt2img("p"), "gpu": 1}, timeout=30)
        assert pinned.status_code == 503
        row = {r["gpu"]: r for r in m.status()["instances"]}[1]
        assert "GPU 1 failed: critical Xid 79" in row["reason"]
        with events.open("a") as fh:
            fh.write(json.dumps({"gpu": 0, "xid": 13}) + "\n")
        wait_for(lambda: inst(0)["pid"] not in (None, pid0) and inst(0)["state"] == "READY", 60, 0.2,
                 what="GPU 0 restarted")
        assert inst(0)["restarts"] == 1
        assert inst(1)["process_state"] == "STOPPED"  # the failed GPU's instance stays down
    finally:
        m.down()
