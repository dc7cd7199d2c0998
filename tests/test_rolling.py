"""Rolling restarts with drain.

Tier 1: the pure parts (readiness with an instance planned out, routing past a drained one, the
log line that explains a failure). Tier 2: the monitor's drain primitive against real HTTP
instances and a fake supervisord. Tier 3: a real machine (real supervisord, the simulator as
ComfyUI): a node added while jobs run rolls every instance with no failed job and the node loaded;
a bad flag stops the roll after the first instance and ``up --wait`` names it and why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from support import Machine, simulated_machine, txt2img, wait_until

from orchestrator.core.errors import SupervisorError
from orchestrator.core.health import HealthConfig
from orchestrator.core.instances import InstanceView
from orchestrator.core.plan import build_plan
from orchestrator.core.readiness import InstanceStatus, readiness
from orchestrator.core.routing import RouteError, route
from orchestrator.core.settings import load_settings
from orchestrator.core.states import InstanceState, ProcessInfo, ProcessState
from orchestrator.lifecycle.rolling import explaining_line
from orchestrator.machine.gpu import MockBackend
from orchestrator.machine.ports import free_port_block
from orchestrator.machine.state import create_instance_dirs
from orchestrator.monitor.loop import Monitor
from orchestrator.simulator.startup import declared_classes


# ================================================================ tier 1: pure
def status(gpu: int, *, state: InstanceState = InstanceState.READY, **kw: Any) -> InstanceStatus:
    return InstanceStatus(
        gpu=gpu, name=f"comfyui_gpu{gpu}", port=8188 + gpu, state=state, reason="r", since=1.0,
        process_state="RUNNING", pid=100 + gpu, start_time=1.0, uptime=1.0, restarts=0, failed_custom_nodes=(),
        queue_pending=0, queue_running=0, last_probe=1.0, probe_duration=0.01, device="cpu", **kw,
    )


def test_readyz_with_the_default_does_not_require_the_instance_planned_out_but_an_explicit_minimum_holds() -> None:
    rolling = [status(0, draining=True, planned_out=True), status(1), status(2), status(3)]
    r = readiness(rolling, None)
    assert r.ready
    assert r.ready_count == 3
    assert r.required == 3
    restarting = [status(0, state=InstanceState.STARTING, planned_out=True), status(1), status(2), status(3)]
    assert readiness(restarting, None).ready
    # a crash is not planned: the default still needs every instance
    crashed = [status(0, state=InstanceState.STARTING), status(1), status(2), status(3)]
    assert not readiness(crashed, None).ready
    assert readiness(rolling, 3).ready
    assert not readiness(rolling, 4).ready
    assert not rolling[0].ready


def test_the_router_sends_no_job_to_a_drained_instance() -> None:
    views = [InstanceView(0, "comfyui_gpu0", 8188, InstanceState.READY, draining=True),
             InstanceView(1, "comfyui_gpu1", 8189, InstanceState.READY, queue_pending=3)]
    assert route(views, {}, max_queue_depth=8).index == 1
    with pytest.raises(RouteError) as exc:
        route(views, {}, max_queue_depth=8, gpu=0)
    assert exc.value.status == 503
    with pytest.raises(RouteError):
        route(views[:1], {}, max_queue_depth=8)


def test_the_explaining_line_is_the_last_error_line_of_the_log() -> None:
    lines = ["Starting server", "usage: main.py [-h]", "main.py: error: argument --lowvram: not allowed with argument --cpu"]
    assert explaining_line(lines) == lines[-1]
    assert explaining_line(["Traceback (most recent call last):", "ModuleNotFoundError: No module named 'x'",
                            "shutting down"]) == "ModuleNotFoundError: No module named 'x'"
    assert explaining_line(["just starting"]) == "just starting"
    assert explaining_line([]) == "(its log is empty)"


def test_the_simulator_lists_the_classes_a_custom_node_declares() -> None:
    assert declared_classes('NODE_CLASS_MAPPINGS = {"HelloNode": Hello, "Other": O}\n') == ("HelloNode", "Other")
    assert declared_classes("NODE_CLASS_MAPPINGS = make()\n") == ()
    assert declared_classes("def (") == ()


# ================================================================ tier 2: the drain primitive
class BusyComfy:
    """An instance whose queue holds ``busy`` prompts until told otherwise; records control calls."""

    def __init__(self) -> None:
        self.busy = 0
        self.calls: list[str] = []

    async def system_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"system": {}, "devices": [{"name": "cpu", "type": "cpu", "vram_total": 1}]})

    async def queue(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            body = await request.json()
            self.calls.append(f"queue {json.dumps(body, sort_keys=True)}")
            if body.get("clear"):
                self.busy = 0
            return web.json_response({})
        running = [[0, f"p{i}"] for i in range(min(self.busy, 1))]
        pending = [[i, f"q{i}"] for i in range(max(self.busy - 1, 0))]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def interrupt(self, request: web.Request) -> web.StreamResponse:
        self.calls.append("interrupt")
        return web.json_response({})


class StillSupervisor:
    def __init__(self, names: list[str]) -> None:
        now = time.time()
        self.procs = [ProcessInfo(n, ProcessState.RUNNING, 4000 + i, now, now, 0, "", "") for i, n in enumerate(names)]

    def processes(self) -> list[ProcessInfo]:
        return list(self.procs)

    def process(self, name: str) -> ProcessInfo:
        for p in self.procs:
            if p.name == name:
                return p
        raise SupervisorError(name)


@asynccontextmanager
async def drain_rig(tmp_path: Path) -> AsyncIterator[tuple[Monitor, list[BusyComfy]]]:
    base = free_port_block(2)
    settings = load_settings({
        "ROOT": str(tmp_path), "MOCK_GPU": "1", "NUM_GPUS": "2", "WORKER_BASE_COMFYUI_PORT": str(base),
        "PROBE_INTERVAL": "5", "PROBE_TIMEOUT": "1", "GPU_SAMPLE_INTERVAL": "1",
    })
    backend = MockBackend(2, 2**30)
    plan = build_plan(settings, backend.list_gpus())
    create_instance_dirs(plan)
    comfies = [BusyComfy() for _ in plan.instances]
    sup = StillSupervisor([i.name for i in plan.instances])
    monitor = Monitor(settings, plan, supervisor_factory=lambda timeout: sup, backend_factory=lambda: backend)  # type: ignore[arg-type,return-value]
    monitor.loop.cfg = HealthConfig(startup_timeout=5, unhealthy_threshold=3)
    async with AsyncExitStack() as stack:
        for inst, fake in zip(plan.instances, comfies, strict=True):
            app = web.Application()
            app.router.add_get("/system_stats", fake.system_stats)
            app.router.add_route("*", "/queue", fake.queue)
            app.router.add_post("/interrupt", fake.interrupt)
            runner = web.AppRunner(app, shutdown_timeout=0.1)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", inst.port).start()
            stack.push_async_callback(runner.cleanup)
        await monitor.start()
        try:
            deadline = time.monotonic() + 30
            while not all(s.ready for s in monitor.instance_statuses()):
                assert time.monotonic() < deadline, [s.state for s in monitor.instance_statuses()]
                await asyncio.sleep(0.05)
            yield monitor, comfies
        finally:
            await monitor.close()


def test_a_drain_closes_routing_at_once_and_ends_when_the_queue_is_empty(tmp_path: Path) -> None:
    async def main() -> None:
        async with drain_rig(tmp_path) as (monitor, comfies):
            comfies[0].busy = 2  # seen at the drain's own probe (PROBE_INTERVAL is 5 s)
            task = asyncio.create_task(monitor.drain(0, timeout=30))
            await asyncio.sleep(0.3)
            assert not task.done()
            view = {v.index: v for v in monitor.snapshot()}
            assert view[0].draining
            assert not view[0].ready
            assert view[1].ready
            st = monitor.instance_status(0)
            assert st.draining
            assert st.planned_out
            assert not st.ready
            assert monitor.readiness().ready  # the default needs the 1 instance not planned out
            comfies[0].busy = 0
            result = await asyncio.wait_for(task, 15)
            assert result.drained
            assert result.interrupted == 0
            assert result.gpu == 0
            assert comfies[0].calls == []  # nothing interrupted
            assert monitor.snapshot()[0].draining  # still closed until undrained or restarted
            assert not monitor.undrain(0).draining
            assert monitor.snapshot()[0].ready

    asyncio.run(main())


def test_a_drain_past_its_timeout_clears_the_queue_and_interrupts(tmp_path: Path) -> None:
    async def main() -> None:
        async with drain_rig(tmp_path) as (monitor, comfies):
            comfies[1].busy = 3
            result = await asyncio.wait_for(monitor.drain(1, timeout=1.0), 15)
            assert not result.drained
            assert result.interrupted == 3
            assert comfies[1].calls == ['queue {"clear": true}', "interrupt"]
            assert comfies[0].calls == []
            with pytest.raises(KeyError):
                await monitor.drain(7, timeout=1.0)

    asyncio.run(main())


def test_a_drain_that_may_not_cut_jobs_gives_up_at_its_timeout_and_routes_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with drain_rig(tmp_path) as (monitor, comfies):
            comfies[1].busy = 2
            result = await asyncio.wait_for(monitor.drain(1, timeout=1.0, interrupt=False), 15)
            assert not result.drained
            assert result.interrupted == 0
            assert comfies[1].calls == []  # a recycle never interrupts a job
            assert not monitor.snapshot()[1].draining  # routed to again

    asyncio.run(main())


# ================================================================ tier 3: a real machine

@dataclasses.dataclass
class Load:
    """Clients posting 1 s jobs to the monitor's job API in a loop; every answer kept."""

    m: Machine
    clients: int
    results: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    def run(self, k: int) -> None:
        n = 0
        token = self.m.env.get("ORCHESTRATOR_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        while not self.stop.is_set():
            n += 1
            try:
                body = {"workflow": txt2img(f"c{k}", seed=k * 10000 + n)}
                r = requests.post(f"{self.m.monitor_url}/jobs", json=body, headers=headers, timeout=120)
                ok = r.status_code == 200 and r.json().get("status") == "success"
                self.results.append((r.status_code if ok else -r.status_code, "" if ok else r.text[:300]))
            except (requests.RequestException, ValueError) as exc:
                self.results.append((0, repr(exc)))

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(150)


def instances(m: Machine) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = requests.get(f"{m.monitor_url}/instances", timeout=5).json()["instances"]
    return data


def slow_jobs(m: Machine, seconds: float) -> None:
    for i in range(m.num_gpus):
        (m.root / f"comfyui_gpu{i}" / "user" / "simulator_faults.json").write_text(json.dumps({"exec_time": seconds}))


@pytest.fixture
def machine(tmp_path: Path) -> Callable[..., Machine]:
    made: list[Machine] = []

    def make(num_gpus: int, **env: str) -> Machine:
        m = simulated_machine(tmp_path / f"m{len(made)}", num_gpus, **env)
        made.append(m)
        return m

    yield make  # type: ignore[misc]
    for m in made:
        m.down()


@pytest.mark.integration
def test_a_node_added_while_jobs_run_rolls_every_instance_with_no_failed_job(machine: Callable[..., Machine]) -> None:
    m = machine(2, ORCHESTRATOR_TOKEN="tok-roll-1")
    first = m.run("up", "--skip-provision", "--wait", "--timeout", "90", check=True)
    for port in m.ports:
        assert f"READY http://127.0.0.1:{port}" in first.stdout
    old = {i["generation"] for i in instances(m)}
    assert len(old) == 1
    assert None not in old
    assert all(i["current"] for i in instances(m))
    slow_jobs(m, 1.0)
    node = m.root / "ComfyUI" / "custom_nodes" / "hello-nodes"
    node.mkdir()
    (node / "__init__.py").write_text('NODE_CLASS_MAPPINGS = {"HelloRollNode": object}\n')

    codes: list[int | None] = []
    watching = threading.Event()

    def watch_readyz() -> None:
        while not watching.is_set():
            try:
                codes.append(requests.get(f"{m.monitor_url}/readyz", timeout=10).status_code)
            except requests.RequestException:
                codes.append(None)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_readyz, daemon=True)
    with Load(m, clients=2) as load:
        assert wait_until(lambda: len(load.results) >= 2, 60)
        watcher.start()
        out = m.run("up", "--skip-provision", check=True, timeout=300).stdout
        watching.set()
        time.sleep(1.5)
    watcher.join(5)
    assert "rolling comfyui_gpu0, comfyui_gpu1 to generation" in out, out
    assert "custom nodes +hello-nodes" in out, out
    assert "roll done" in out, out
    failed = [r for r in load.results if r[0] != 200]
    assert not failed, failed
    assert len(load.results) >= 4
    assert codes
    assert all(c == 200 for c in codes), codes
    now = instances(m)
    assert len({i["generation"] for i in now}) == 1
    assert now[0]["generation"] not in old
    assert all(i["current"] and i["ready"] and not i["draining"] for i in now)
    for port in m.ports:
        assert "HelloRollNode" in requests.get(f"http://127.0.0.1:{port}/object_info", timeout=10).json()
    metrics = requests.get(f"{m.monitor_url}/metrics", timeout=5).text
    lines = [ln for ln in metrics.splitlines() if ln.startswith("comfyui_instance_generation_info{")]
    assert len(lines) == 2
    assert all(f'generation="{now[0]["generation"]}"' in ln and ln.endswith(" 1.0") for ln in lines)
    # the drain endpoints need the token
    assert requests.post(f"{m.monitor_url}/instances/0/drain", timeout=5).status_code == 401
    # `restart all --rolling`: new processes, one at a time, on the same generation
    pids = {i["gpu"]: i["pid"] for i in now}
    again = m.run("restart", "all", "--rolling", check=True, timeout=300).stdout
    assert "rolling restart done" in again
    after = instances(m)
    assert all(i["pid"] not in (None, pids[i["gpu"]]) and i["generation"] == now[0]["generation"] for i in after)


@pytest.mark.integration
def test_a_bad_flag_stops_the_roll_after_the_first_instance_and_up_wait_names_it(
    machine: Callable[..., Machine],
) -> None:
    m = machine(3)
    m.run("up", "--skip-provision", "--wait", "--timeout", "90", check=True)
    old = instances(m)[0]["generation"]
    monitor_pid = m.status()["programs"]["monitor"]["pid"]
    r = m.run("up", "--skip-provision", "--wait", "--timeout", "60", COMFY_ARGS="--lowvram", timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ROLL STOPPED: comfyui_gpu0" in r.stdout, r.stdout
    assert "argument --lowvram: not allowed with argument --cpu" in r.stdout
    assert "comfyui_gpu1, comfyui_gpu2 keep serving the old generation" in r.stdout
    assert "not READY on the current generation" in r.stderr
    by_name = {i["name"]: i for i in instances(m)}
    for name in ("comfyui_gpu1", "comfyui_gpu2"):
        assert by_name[name]["ready"]
        assert by_name[name]["generation"] == old
        assert not by_name[name]["current"]
    assert m.ready()  # the two serving are enough while the failed one is planned out
    st = m.run("status", check=True).stdout
    assert f"old generation {old}" in st
    # a flag only instances read rolls them and leaves the monitor (and the jobs it tracks) alone
    assert m.status()["programs"]["monitor"]["pid"] == monitor_pid
