"""Fast, honest readiness: STARTING instances are probed every PROBE_STARTING_INTERVAL, and a READY
instance whose probe fails is SUSPECT at once (no new jobs, not counted by /readyz) until it
answers again or reaches the restart threshold.

The real Monitor loop runs against a real HTTP instance (aiohttp) and a fake supervisord whose
program is a real process (so SIGSTOP is real). PROBE_INTERVAL is far past every deadline here:
whatever happens within a test's deadline came from the fast cadence, not the READY interval.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from orchestrator.core.health import HealthConfig
from orchestrator.core.plan import build_plan
from orchestrator.core.readiness import InstanceStatus, readiness
from orchestrator.core.routing import RouteError, route
from orchestrator.core.settings import load_settings
from orchestrator.core.states import InstanceState, ProcessInfo, ProcessState
from orchestrator.machine.gpu import MockBackend
from orchestrator.machine.ports import free_port_block
from orchestrator.machine.state import create_instance_dirs
from orchestrator.monitor.loop import Monitor


class OneProgram:
    """supervisord with one RUNNING program whose pid is a real (sleeping) process."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self.start_time = time.time()
        self.calls: list[tuple[str, ...]] = []

    def processes(self) -> list[ProcessInfo]:
        return [ProcessInfo(self.name, ProcessState.RUNNING, self.pid, self.start_time, time.time(), 0, "", "")]

    def start(self, name: str, wait: bool = False) -> None:
        self.calls.append(("start", name))

    def stop(self, name: str, wait: bool = True) -> None:
        self.calls.append(("stop", name))

    def signal(self, name: str, sig: str) -> None:
        self.calls.append(("signal", name, sig))


async def _stats(request: web.Request) -> web.StreamResponse:
    return web.json_response({"system": {}, "devices": [{"name": "cpu", "type": "cpu", "vram_total": 1}]})


async def _queue(request: web.Request) -> web.StreamResponse:
    return web.json_response({"queue_running": [], "queue_pending": []})


@asynccontextmanager
async def serving(port: int) -> AsyncIterator[None]:
    app = web.Application()
    app.router.add_get("/system_stats", _stats)
    app.router.add_get("/queue", _queue)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll; the deadline only ends a failing test (it is far below PROBE_INTERVAL), it measures nothing."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def monitored(tmp_path: Path, pid: int, **env: str) -> AsyncIterator[tuple[Monitor, OneProgram, int]]:
    port = free_port_block(1)
    settings = load_settings({
        "ROOT": str(tmp_path), "MOCK_GPU": "1", "NUM_GPUS": "1", "WORKER_BASE_COMFYUI_PORT": str(port),
        "PROBE_INTERVAL": "300", "PROBE_TIMEOUT": "1", "GPU_SAMPLE_INTERVAL": "1", **env,
    })
    backend = MockBackend(1, 2**30)
    plan = build_plan(settings, backend.list_gpus())
    create_instance_dirs(plan)
    sup = OneProgram(plan.instances[0].name, pid)
    monitor = Monitor(settings, plan, supervisor_factory=lambda timeout: sup, backend_factory=lambda: backend)
    monitor.loop.cfg = HealthConfig(startup_timeout=600, unhealthy_threshold=100)
    await monitor.start()
    try:
        yield monitor, sup, port
    finally:
        await monitor.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait(10)


def test_a_starting_instance_is_ready_soon_after_it_answers_not_at_the_next_probe_interval(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    async def main() -> None:
        async with monitored(tmp_path, sleeper.pid) as (monitor, _, port):
            # Nothing listens yet: a start in progress, probed every PROBE_STARTING_INTERVAL.
            await until(lambda: monitor.instance_status(0).last_probe is not None, "a first probe")
            assert monitor.instance_status(0).state is InstanceState.STARTING
            await asyncio.sleep(1.0)  # several fast probes fail: the next due is no PROBE_INTERVAL away
            async with serving(port):
                await until(lambda: monitor.instance_status(0).state is InstanceState.READY, "READY")
                assert "first good probe" in monitor.instance_status(0).reason

    asyncio.run(main())


def test_a_stopped_ready_instance_is_suspect_at_once_gets_no_jobs_and_is_ready_again_when_it_answers(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    async def main() -> None:
        async with monitored(tmp_path, sleeper.pid) as (monitor, sup, port), serving(port):
            await until(lambda: monitor.instance_status(0).state is InstanceState.READY, "READY")
            assert route(monitor.snapshot(), {}, max_queue_depth=8).index == 0
            os.kill(sleeper.pid, signal.SIGSTOP)  # the instance's process cannot answer any more
            await until(lambda: monitor.instance_status(0).state is InstanceState.SUSPECT, "SUSPECT")
            assert "is stopped (SIGSTOP)" in monitor.instance_status(0).reason
            with pytest.raises(RouteError) as refused:
                route(monitor.snapshot(), {}, max_queue_depth=8)
            assert refused.value.status == 503
            assert "0:SUSPECT" in str(refused.value)
            assert not monitor.readiness().ready
            assert "SUSPECT" in monitor.readiness().reason
            assert sup.calls == []  # not restarted before UNHEALTHY_THRESHOLD failed probes
            os.kill(sleeper.pid, signal.SIGCONT)
            await until(lambda: monitor.instance_status(0).state is InstanceState.READY, "READY again")
            assert monitor.readiness().ready
            assert "answering again" in monitor.instance_status(0).reason
            assert monitor.instance_status(0).restarts == 0

    asyncio.run(main())


def test_readiness_counts_a_suspect_instance_as_not_ready() -> None:
    def status(gpu: int, state: InstanceState) -> InstanceStatus:
        return InstanceStatus(gpu, f"comfyui_gpu{gpu}", 8188 + gpu, state, "r", 0.0, "RUNNING", 10 + gpu, 0.0,
                              1.0, 0, (), 0, 0, None, None, None)

    answer = readiness([status(0, InstanceState.READY), status(1, InstanceState.SUSPECT)], None)
    assert not answer.ready
    assert answer.ready_count == 1
    assert "comfyui_gpu1 SUSPECT" in answer.reason
    assert readiness([status(0, InstanceState.READY), status(1, InstanceState.SUSPECT)], 1).ready
