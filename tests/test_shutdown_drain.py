"""SIGTERM → drain → exit, on real processes: a container's ``orchestrator up --foreground``
(supervisord in the foreground after the exec) with the simulator as ComfyUI.

supervisord stops the monitor first (its priority is above the instances'); the monitor refuses
new jobs (503 ``draining``), reports /readyz 503, lets the running job finish on its instance,
then exits, and only then are the instances stopped.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support import Machine, gone, readyz_code, simulated_machine, stop_process, txt2img, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def foreground(tmp_path: Path) -> Iterator[tuple[Machine, subprocess.Popen[bytes]]]:
    """One simulated instance (6 s per prompt) under a foreground supervisord, as in the image."""
    m = simulated_machine(tmp_path / "m", 1, SIM_EXEC_TIME="6", SHUTDOWN_DRAIN_TIMEOUT="60")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "up", "--foreground", "--skip-provision"],
        env=m.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield m, proc
    finally:
        if proc.poll() is None:
            stop_process(proc, 90)
        m.down()


def test_sigterm_drains_running_jobs_refuses_new_ones_then_exits(
    foreground: tuple[Machine, subprocess.Popen[bytes]],
) -> None:
    m, proc = foreground
    wait_for(m.ready, 90, 0.2, what="the instance READY under the foreground supervisord")

    answer: dict[str, Any] = {}

    def run_job() -> None:
        body = {"workflow": txt2img("drain", seed=7), "wait": True}
        r = requests.post(f"{m.monitor_url}/jobs", json=body, timeout=120)
        answer.update(status_code=r.status_code, body=r.json())

    worker = threading.Thread(target=run_job)
    worker.start()
    wait_for(
        lambda: requests.get(f"{m.monitor_url}/scaling", timeout=5).json()["jobs_running"] == 1,
        30, 0.1, what="the job running on its instance",
    )

    proc.send_signal(signal.SIGTERM)  # what `docker stop` / the kubelet sends to the container

    def draining() -> dict[str, Any] | None:
        r = requests.get(f"{m.monitor_url}/readyz", timeout=5)
        return r.json() if r.status_code == 503 and "draining" in r.json()["reason"] else None

    wait_for(draining, 30, 0.1, what="/readyz 503 while draining")
    refused = requests.post(f"{m.monitor_url}/jobs", json={"workflow": txt2img("late")}, timeout=10)
    assert refused.status_code == 503
    assert refused.json()["error"] == "draining"
    scaling = requests.get(f"{m.monitor_url}/scaling", timeout=5).json()
    assert (scaling["draining"], scaling["free_slots"], scaling["jobs_running"]) == (True, 0, 1)

    worker.join(90)
    assert answer["status_code"] == 200, answer
    assert answer["body"]["status"] == "success", answer  # finished on an instance still running
    assert proc.wait(60) is not None  # supervisord, then the container, exits
    assert readyz_code(m) is None
    assert all(gone(p) for p in _instance_pids(m))


def _instance_pids(m: Machine) -> list[int]:
    """Processes still holding the instances' ports (none once the machine is down)."""
    import psutil

    ports = set(m.ports) | {m.monitor_port}
    return [
        c.pid for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in ports and c.pid
    ]


# ---------------------------------------------------------------- the parts, without processes
def test_supervisord_stops_the_monitor_first_and_waits_out_its_drain(tmp_path: Path) -> None:
    from orchestrator.core.gpus import Gpu
    from orchestrator.core.layout import Layout
    from orchestrator.core.plan import build_plan
    from orchestrator.core.settings import load_settings
    from orchestrator.lifecycle.launch import extra_programs

    settings = load_settings({"ROOT": str(tmp_path), "MOCK_GPU": "1", "SHUTDOWN_DRAIN_TIMEOUT": "90.5s"})
    plan = build_plan(settings, [Gpu(0, "GPU-0", "0000:01:00.0", "mock", 1, "0", mock=True)])
    [monitor] = [p for p in extra_programs(settings, Layout(tmp_path), plan) if p.name == "monitor"]
    # supervisord stops programs in reverse priority order, one after the other; the instances' is 100.
    assert monitor.priority > 100
    assert monitor.stopwaitsecs >= 91 + 5  # the drain, then uvicorn's own graceful shutdown


class FakeJobs:
    def __init__(self) -> None:
        self.draining = False
        self.busy = True

    def drain(self) -> None:
        self.draining = True

    def idle(self) -> bool:
        return not self.busy


def draining_server(grace: float) -> tuple[Any, FakeJobs]:
    import uvicorn

    from orchestrator.monitor.app import DrainingServer

    jobs = FakeJobs()
    server = DrainingServer(uvicorn.Config(app=lambda *a: None), jobs, grace)  # type: ignore[arg-type]
    return server, jobs


def test_the_first_signal_drains_and_the_server_exits_once_idle() -> None:
    import asyncio

    server, jobs = draining_server(60)
    server.handle_exit(signal.SIGTERM, None)
    assert jobs.draining
    assert not server.should_exit
    asyncio.run(server.on_tick(1))
    assert not server.should_exit  # a job still runs
    jobs.busy = False
    asyncio.run(server.on_tick(2))
    assert server.should_exit


def test_the_grace_period_ends_the_drain_and_a_second_signal_exits_at_once() -> None:
    import asyncio
    import time

    server, jobs = draining_server(60)
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit
    late, _ = draining_server(60)
    late.handle_exit(signal.SIGTERM, None)
    late.drain_deadline = time.monotonic() - 1  # the grace period is over, the job still runs
    asyncio.run(late.on_tick(1))
    assert late.should_exit
    now, now_jobs = draining_server(0)
    now.handle_exit(signal.SIGTERM, None)
    assert now.should_exit
    assert not now_jobs.draining


def test_an_up_that_restarts_only_the_monitor_lets_its_running_job_answer(
    machine: Any,
) -> None:
    """A changed monitor setting restarts the monitor alone: it drains first, so the caller waiting
    on its job gets the answer, and `up` waits for that longer than its usual client timeout."""
    m: Machine = machine(1, SIM_EXEC_TIME="14", SHUTDOWN_DRAIN_TIMEOUT="60")
    m.up()
    wait_for(m.ready, 60, 0.2, what="the instance READY")
    answer: dict[str, Any] = {}

    def run_job() -> None:
        r = requests.post(f"{m.monitor_url}/jobs", json={"workflow": txt2img("reconcile", seed=3)}, timeout=120)
        answer.update(status_code=r.status_code, body=r.json())

    worker = threading.Thread(target=run_job)
    worker.start()
    wait_for(
        lambda: requests.get(f"{m.monitor_url}/scaling", timeout=5).json()["jobs_running"] == 1,
        30, 0.1, what="the job running on its instance",
    )
    r = m.run("up", "--skip-provision", timeout=180, PROBE_INTERVAL="0.4")  # the monitor's env changes
    assert r.returncode == 0, r.stderr
    assert "restarted monitor" in r.stdout
    worker.join(60)
    assert answer["status_code"] == 200, answer
    assert answer["body"]["status"] == "success"
    wait_for(m.ready, 60, 0.2, what="the new monitor READY")
