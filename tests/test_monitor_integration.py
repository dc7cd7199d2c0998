"""The monitor end to end.

Tier 1: the real Monitor loop against real HTTP instances (aiohttp) and a recording fake of
supervisord. Tier 2: a real machine (`orchestrator up --skip-provision`, real supervisord, the
simulator as ComfyUI) with crashes, the simulator's hang fault, SIGSTOP, slow starts, failed
custom-node imports, token rules and /metrics latency while an instance hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from prometheus_client import generate_latest
from support import Machine, clean_env, simulated_machine, wait_until

from orchestrator.core.errors import SupervisorError
from orchestrator.core.health import HealthConfig
from orchestrator.core.layout import Layout
from orchestrator.core.plan import build_plan
from orchestrator.core.settings import load_settings
from orchestrator.core.states import InstanceState, ProcessInfo, ProcessState
from orchestrator.machine.gpu import MockBackend
from orchestrator.machine.ports import free_port_block
from orchestrator.machine.state import create_instance_dirs
from orchestrator.monitor.loop import Monitor
from orchestrator.monitor.metrics import build_registry


# ================================================================ tier 1: fake supervisord
class FakeComfy:
    def __init__(self) -> None:
        self.mode = "ok"
        self.hanging = 0  # requests held by the hang right now

    async def system_stats(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "hang":
            self.hanging += 1
            try:
                await asyncio.sleep(30)
            finally:
                self.hanging -= 1
        return web.json_response({"system": {}, "devices": [{"name": "cpu", "type": "cpu", "vram_total": 1}]})

    async def queue(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"queue_running": [[1]], "queue_pending": [[2], [3]]})


class FakeSupervisor:
    """Records calls; a start gives the program a new pid and makes its instance answer again."""

    def __init__(self, names: list[str], comfies: dict[str, FakeComfy]) -> None:
        self.lock = threading.Lock()
        self.procs = {n: self._info(n, ProcessState.RUNNING, 1000 + i) for i, n in enumerate(names)}
        self.comfies = comfies
        self.calls: list[tuple[str, ...]] = []
        self.down = False

    @staticmethod
    def _info(name: str, state: ProcessState, pid: int) -> ProcessInfo:
        now = time.time()
        return ProcessInfo(name, state, pid if state is ProcessState.RUNNING else 0, now, now, 0, "", "")

    def processes(self) -> list[ProcessInfo]:
        if self.down:
            raise SupervisorError("supervisord is not running: run `orchestrator up`")
        with self.lock:
            return list(self.procs.values())

    def crash(self, name: str) -> None:
        with self.lock:
            self.procs[name] = self._info(name, ProcessState.RUNNING, self.procs[name].pid + 1)

    def set_state(self, name: str, state: ProcessState) -> None:
        with self.lock:
            self.procs[name] = self._info(name, state, 0)

    def start(self, name: str, wait: bool = False) -> None:
        with self.lock:
            self.calls.append(("start", name))
            self.procs[name] = self._info(name, ProcessState.RUNNING, 5000 + len(self.calls))
        self.comfies[name].mode = "ok"

    def stop(self, name: str, wait: bool = True) -> None:
        with self.lock:
            self.calls.append(("stop", name))
            self.procs[name] = self._info(name, ProcessState.STOPPED, 0)

    def signal(self, name: str, sig: str) -> None:
        with self.lock:
            self.calls.append(("signal", name, sig))


@asynccontextmanager
async def serving(fake: FakeComfy, port: int) -> AsyncIterator[None]:
    app = web.Application()
    app.router.add_get("/system_stats", fake.system_stats)
    app.router.add_get("/queue", fake.queue)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


class Rig:
    def __init__(self, monitor: Monitor, sup: FakeSupervisor, comfies: list[FakeComfy]) -> None:
        self.monitor = monitor
        self.sup = sup
        self.comfies = comfies

    def state(self, gpu: int) -> InstanceState:
        return self.monitor.instance_status(gpu).state

    async def until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        """Poll ``predicate``; the deadline only ends a failing test, it measures nothing."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                states = [s.state for s in self.monitor.instance_statuses()]
                raise AssertionError(f"timed out; states: {states}")
            await asyncio.sleep(0.02)


@asynccontextmanager
async def rig(tmp_path: Path, **env: str) -> AsyncIterator[Rig]:
    base = free_port_block(2)
    settings = load_settings({
        "ROOT": str(tmp_path), "MOCK_GPU": "1", "NUM_GPUS": "2", "WORKER_BASE_COMFYUI_PORT": str(base),
        "PROBE_INTERVAL": "0.2", "PROBE_TIMEOUT": "0.2", "GPU_SAMPLE_INTERVAL": "0.1", **env,
    })
    backend = MockBackend(2, 2**30)
    plan = build_plan(settings, backend.list_gpus())
    create_instance_dirs(plan)
    comfies = {inst.name: FakeComfy() for inst in plan.instances}
    sup = FakeSupervisor([i.name for i in plan.instances], comfies)
    monitor = Monitor(settings, plan, supervisor_factory=lambda timeout: sup, backend_factory=lambda: backend)
    monitor.loop.cfg = HealthConfig(startup_timeout=5, unhealthy_threshold=3, backoff_base=0.2)
    async with AsyncExitStack() as stack:
        for inst in plan.instances:
            await stack.enter_async_context(serving(comfies[inst.name], inst.port))
        await monitor.start()
        try:
            r = Rig(monitor, sup, list(comfies.values()))
            await r.until(lambda: all(s.ready for s in monitor.instance_statuses()))
            yield r
        finally:
            await monitor.close()


def run(fn: Callable[[Path], Any], tmp_path: Path) -> None:
    asyncio.run(fn(tmp_path))


def test_the_monitor_restarts_a_hung_instance_through_supervisord_and_it_is_ready_again(
    tmp_path: Path,
) -> None:
    async def main(tmp: Path) -> None:
        async with rig(tmp) as r:
            r.comfies[1].mode = "hang"
            await r.until(lambda: ("start", "comfyui_gpu1") in r.sup.calls)
            assert r.sup.calls == [("signal", "comfyui_gpu1", "CONT"), ("stop", "comfyui_gpu1"),
                                   ("start", "comfyui_gpu1")]
            await r.until(lambda: r.state(1) is InstanceState.READY)
            assert r.monitor.instance_status(1).restarts == 1
            assert r.monitor.instance_status(0).restarts == 0

    run(main, tmp_path)


def test_a_crash_restarted_by_supervisord_is_noticed_at_the_next_tick_and_counted_once(
    tmp_path: Path,
) -> None:
    async def main(tmp: Path) -> None:
        # An interval far past every deadline here: only the supervisord tick can notice the crash.
        async with rig(tmp, PROBE_INTERVAL="300") as r:
            r.sup.crash("comfyui_gpu0")
            await r.until(lambda: r.monitor.instance_status(0).restarts == 1, timeout=60)
            await r.until(lambda: r.state(0) is InstanceState.READY, timeout=60)
            assert r.sup.calls == []
            assert r.monitor.instance_status(0).restarts == 1

    run(main, tmp_path)


def test_a_hung_report_and_a_restart_request_restart_at_once(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        # An interval far past every deadline here: "at once" means before any probe could act.
        async with rig(tmp, PROBE_INTERVAL="300") as r:
            await asyncio.to_thread(r.monitor.report_hung, 0, "prompt p1 past its deadline")
            await r.until(lambda: ("start", "comfyui_gpu0") in r.sup.calls, timeout=60)
            r.monitor.request_restart(1, "restart requested over HTTP")
            await r.until(lambda: ("start", "comfyui_gpu1") in r.sup.calls, timeout=60)
            await r.until(lambda: all(s.ready for s in r.monitor.instance_statuses()), timeout=60)
            with pytest.raises(KeyError, match="no instance on GPU 9"):
                r.monitor.request_restart(9, "x")

    run(main, tmp_path)


def test_without_supervisord_the_monitor_is_not_alive_and_restarts_nothing(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        async with rig(tmp) as r:
            assert r.monitor.liveness().alive
            r.sup.down = True
            r.comfies[0].mode = "hang"
            await r.until(lambda: not r.monitor.liveness().alive)
            await r.until(lambda: r.state(0) is InstanceState.UNHEALTHY)
            assert r.sup.calls == []
            assert "supervisord" in r.monitor.liveness().reason

    run(main, tmp_path)


def test_readiness_is_false_whenever_supervisord_does_not_answer_even_with_every_instance_ready(
    tmp_path: Path,
) -> None:
    async def main(tmp: Path) -> None:
        async with rig(tmp) as r:
            assert r.monitor.readiness().ready
            r.sup.down = True  # the instances still answer their probes: only supervisord is gone
            await r.until(lambda: not r.monitor.readiness().ready)
            assert "supervisord" in r.monitor.readiness().reason
            r.sup.down = False
            await r.until(lambda: r.monitor.readiness().ready)

    run(main, tmp_path)


def test_a_dead_probe_loop_asks_to_stop_the_monitor_so_supervisord_restarts_it(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        async with rig(tmp) as r:
            stopped = asyncio.Event()
            r.monitor.on_loop_failure = stopped.set

            def broken() -> list[ProcessInfo]:
                raise KeyError("state")  # not an expected error: the loop dies

            r.sup.processes = broken  # type: ignore[method-assign]
            await asyncio.wait_for(stopped.wait(), 20)
            assert not r.monitor.liveness().alive

    run(main, tmp_path)


def test_a_fatal_program_is_started_again_with_backoff(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        async with rig(tmp) as r:
            r.sup.set_state("comfyui_gpu1", ProcessState.FATAL)
            await r.until(lambda: r.state(1) is InstanceState.FATAL)
            await r.until(lambda: ("start", "comfyui_gpu1") in r.sup.calls)
            await r.until(lambda: r.state(1) is InstanceState.READY)

    run(main, tmp_path)


def test_the_snapshot_gives_the_job_router_states_and_queue_depths(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        async with rig(tmp) as r:
            views = r.monitor.snapshot()
            got = [(v.index, v.name, v.ready) for v in views]
            assert got == [(0, "comfyui_gpu0", True), (1, "comfyui_gpu1", True)]
            assert (views[0].queue_pending, views[0].queue_running) == (2, 1)
            assert views[0].base_url.startswith("http://127.0.0.1:")

    run(main, tmp_path)


def test_a_scrape_never_waits_on_a_hung_instance(tmp_path: Path) -> None:
    # How fast /metrics is with one instance hung (p99) is measured by bench/bench_monitor.py.
    async def main(tmp: Path) -> None:
        # GPU 0's probe is held 30 s by the fake (the probe timeout is longer still): a scrape
        # that waited on it could not finish within the 10 s deadline below.
        async with rig(tmp, UNHEALTHY_THRESHOLD="100", PROBE_TIMEOUT="120") as r:
            registry = build_registry(r.monitor, r.monitor.settings, Layout(tmp), hostname="h")
            r.comfies[0].mode = "hang"
            await r.until(lambda: r.comfies[0].hanging > 0)  # a probe of GPU 0 is in flight, held
            for _ in range(5):
                text = (await asyncio.wait_for(asyncio.to_thread(generate_latest, registry), 10)).decode()
                assert r.comfies[0].hanging > 0  # still held while we scraped
            assert 'comfyui_instance_ready{gpu="0",instance="comfyui_gpu0"' in text
            assert "DCGM_FI_DEV_FB_USED{" in text

    run(main, tmp_path)


# ================================================================ tier 2: a real machine
def _pid(m: Machine, gpu: int) -> int:
    return int(requests.get(f"{m.monitor_url}/instances/{gpu}", timeout=2).json()["pid"] or 0)


def _instance(m: Machine, gpu: int) -> dict[str, Any]:
    try:
        return dict(requests.get(f"{m.monitor_url}/instances/{gpu}", timeout=2).json())
    except (requests.RequestException, ValueError):
        return {}


def _all_ready(m: Machine) -> bool:
    try:
        return requests.get(f"{m.monitor_url}/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _watch_until_restarted(m: Machine, gpu: int, old_pid: int, timeout: float = 60) -> list[str]:
    """Poll until the monitor shows the instance no longer READY with its old process; states seen.

    The deadline only ends a failing test: how fast a hang or crash is noticed is measured by
    bench/bench_monitor.py.
    """
    seen: list[str] = []

    def restarted() -> bool:
        info = _instance(m, gpu)
        state = info.get("state", "?")
        if not seen or seen[-1] != state:
            seen.append(state)
        # SUSPECT (a failed probe) is still READY's process: wait for UNHEALTHY or a new process.
        return state not in {"READY", "SUSPECT"} or bool(info.get("pid") and info.get("pid") != old_pid)

    if not wait_until(restarted, timeout, 0.05):
        raise AssertionError(f"GPU {gpu} was not declared unhealthy within {timeout}s (states {seen})")
    return seen


# What each simulator's fault file holds on a healthy box: GPU 1 reports two custom nodes whose
# import failed (read by the simulator at start).
BOX_FAULTS = {0: None, 1: {"import_failed": ["BrokenNode", "ComfyUI-Bad"]}}


def _reset_faults(root: Path) -> None:
    for gpu, faults in BOX_FAULTS.items():
        path = root / f"comfyui_gpu{gpu}" / "user" / "simulator_faults.json"
        if faults is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(faults))


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """One 2-GPU machine shared by the tier-2 tests; ``ready_box`` puts it back in shape for each."""
    m = simulated_machine(tmp_path_factory.mktemp("box"), 2, PROBE_TIMEOUT="0.5",
                          ORCHESTRATOR_TOKEN="t0ken-for-tests", GPU_SAMPLE_INTERVAL="0.5")
    _reset_faults(m.root)
    try:
        m.up()
        assert wait_until(lambda: _all_ready(m), 60, 0.2), m.run("status").stdout
        yield m
    finally:
        m.down()


@pytest.fixture
def ready_box(box: Machine) -> Machine:
    """The shared box, healthy: whatever an earlier (maybe failed) test left behind is undone first,
    so one failure does not cascade into every test after it."""
    _reset_faults(box.root)
    for gpu in range(box.num_gpus):  # a SIGSTOPped instance left by a failed test
        pid = _instance(box, gpu).get("pid")
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGCONT)
    if not wait_until(lambda: _all_ready(box), 30, 0.2):
        box.up()  # supervisord or the monitor gone: `up` reconciles; then restart every instance
        for gpu in range(box.num_gpus):
            box.run("restart", str(gpu))
        assert wait_until(lambda: _all_ready(box), 60, 0.2), box.run("status").stdout
    return box


@pytest.mark.integration
def test_readyz_is_200_and_metrics_pass_promtool_with_every_instance_and_gpu(ready_box: Machine) -> None:
    m = ready_box
    health = m.run("health")
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.startswith("ready")
    assert m.run("health", "--live").returncode == 0
    text = requests.get(f"{m.monitor_url}/metrics", timeout=5).text
    for gpu in (0, 1):
        assert f'comfyui_instance_ready{{gpu="{gpu}",instance="comfyui_gpu{gpu}"' in text
        assert f'device="nvidia{gpu}"' in text
    assert text.count("DCGM_FI_DEV_FB_USED{") == 2
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.integration
def test_import_failed_lines_name_the_nodes_in_the_api_and_the_metric(ready_box: Machine) -> None:
    m = ready_box
    assert wait_until(lambda: _instance(m, 1).get("failed_custom_nodes") == ["BrokenNode", "ComfyUI-Bad"], 10)
    assert _instance(m, 0)["failed_custom_nodes"] == []
    text = requests.get(f"{m.monitor_url}/metrics", timeout=5).text
    assert 'comfyui_instance_failed_custom_nodes{gpu="1",instance="comfyui_gpu1",node="BrokenNode"' in text


@pytest.mark.integration
def test_a_killed_instance_is_ready_again_and_counted_once(ready_box: Machine) -> None:
    m = ready_box
    before = _instance(m, 0)["restarts"]
    pid = _pid(m, 0)
    os.kill(pid, signal.SIGKILL)  # crash → READY time: bench/bench_monitor.py
    assert wait_until(lambda: _instance(m, 0).get("pid") not in (None, pid), 30, 0.05)
    assert wait_until(lambda: _instance(m, 0).get("state") == "READY", 60, 0.1)
    assert _instance(m, 0)["restarts"] == before + 1


@pytest.mark.integration
def test_the_simulators_hang_is_unhealthy_within_three_intervals_then_restarted_and_ready(
    ready_box: Machine,
) -> None:
    m = ready_box
    faults = m.root / "comfyui_gpu0" / "user" / "simulator_faults.json"
    pid = _pid(m, 0)
    scrapes: list[int | str] = []  # status codes, or the error
    stop = threading.Event()

    def scrape() -> None:
        with requests.Session() as client:
            while not stop.is_set():
                try:
                    scrapes.append(client.get(f"{m.monitor_url}/metrics", timeout=10).status_code)
                except requests.RequestException as exc:
                    scrapes.append(repr(exc))
                stop.wait(0.05)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        faults.write_text(json.dumps({"hang_after": 0}))  # re-read by the simulator every 0.5 s
        # Hang → UNHEALTHY → restarted time (3 intervals + a timeout + startup): bench/bench_monitor.py.
        seen = _watch_until_restarted(m, 0, pid)
    finally:
        faults.unlink(missing_ok=True)  # before the restarted simulator reads it
        stop.set()
        scraper.join()
    assert wait_until(lambda: _instance(m, 0).get("state") == "READY", 60, 0.1), seen
    assert _pid(m, 0) != pid
    log = (m.root / "logs" / "monitor.log").read_text()
    assert "comfyui_gpu0: READY -> SUSPECT: 1 failed probe(s)" in log
    assert "comfyui_gpu0: SUSPECT -> UNHEALTHY: 3 consecutive failed probes" in log
    # /metrics kept answering while the instance hung (its latency then: bench/bench_monitor.py)
    assert scrapes
    assert all(code == 200 for code in scrapes), scrapes


@pytest.mark.integration
def test_a_sigstopped_instance_is_unhealthy_within_three_intervals_then_restarted_and_ready(
    ready_box: Machine,
) -> None:
    m = ready_box
    pid = _pid(m, 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        seen = _watch_until_restarted(m, 1, pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert wait_until(lambda: _instance(m, 1).get("state") == "READY", 60, 0.1), seen
    assert _pid(m, 1) != pid
    readyz = requests.get(f"{m.monitor_url}/readyz", timeout=2)
    assert readyz.status_code == 200


@pytest.mark.integration
def test_restarting_over_http_needs_the_token(ready_box: Machine) -> None:
    m = ready_box
    url = f"{m.monitor_url}/instances/0/restart"
    assert requests.post(url, timeout=5).status_code == 401
    assert requests.post(url, headers={"Authorization": "Bearer nope"}, timeout=5).status_code == 401
    pid = _pid(m, 0)
    r = requests.post(url, headers={"Authorization": "Bearer t0ken-for-tests"}, timeout=5)
    assert r.status_code == 202
    assert wait_until(lambda: _instance(m, 0).get("pid") not in (None, pid), 10, 0.05)
    assert wait_until(lambda: _all_ready(m), 30, 0.1)
    assert "t0ken-for-tests" not in (m.root / "logs" / "monitor.log").read_text()


@pytest.mark.integration
def test_a_restarted_monitor_answers_right_from_its_first_request(ready_box: Machine) -> None:
    from orchestrator.machine.supervisor import Supervisor

    m = ready_box
    sup = Supervisor(m.layout, timeout=30)
    sup.stop("monitor")
    sup.start("monitor")
    first: dict[str, int] = {}

    def answered() -> bool:
        try:
            first["healthz"] = requests.get(f"{m.monitor_url}/healthz", timeout=2).status_code
            first["readyz"] = requests.get(f"{m.monitor_url}/readyz", timeout=2).status_code
        except requests.RequestException:
            return False
        return True

    assert wait_until(answered, 60, 0.05)
    assert first == {"healthz": 200, "readyz": 200}


@pytest.mark.integration
def test_a_slow_start_is_not_killed(ready_box: Machine) -> None:
    # 3 s of start with 0.5 s probes is 6 failed probes (> UNHEALTHY_THRESHOLD), far below
    # STARTUP_TIMEOUT: the monitor waits. (A start past STARTUP_TIMEOUT: see test_health.py.)
    m = ready_box
    faults = m.root / "comfyui_gpu1" / "user" / "simulator_faults.json"
    kept = json.loads(faults.read_text())
    faults.write_text(json.dumps({**kept, "start_delay": 3}))
    try:
        before, pid = _instance(m, 1)["restarts"], _pid(m, 1)
        auth = {"Authorization": "Bearer t0ken-for-tests"}
        r = requests.post(f"{m.monitor_url}/instances/1/restart", headers=auth, timeout=5)
        assert r.status_code == 202
        assert wait_until(lambda: _instance(m, 1).get("pid") not in (None, pid), 30, 0.05)
        slow_pid = _pid(m, 1)
        assert wait_until(lambda: _instance(m, 1).get("state") == "READY", 60, 0.1)
    finally:
        faults.write_text(json.dumps(kept))
    assert _pid(m, 1) == slow_pid  # the slow start itself became READY: it was not killed
    assert _instance(m, 1)["restarts"] == before + 1  # our restart only, nothing killed the slow start


@pytest.mark.slow
@pytest.mark.integration
def test_a_30_second_start_is_not_killed_with_the_default_startup_timeout(
    machine: Callable[..., Machine],
) -> None:
    m = machine(1, SIM_START_DELAY="30", PROBE_TIMEOUT="0.5")
    m.up()
    assert wait_until(lambda: _all_ready(m), 90, 0.5)
    assert _instance(m, 0)["restarts"] == 0


# ================================================================ the CLI, no machine needed
def _cli(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "orchestrator", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    port = str(free_port_block(1))
    env = clean_env(ROOT=str(tmp_path), ORCHESTRATOR_LISTEN="0.0.0.0", ORCHESTRATOR_PORT=port)
    r = _cli(env, "serve")
    assert r.returncode == 2
    assert "ORCHESTRATOR_LISTEN=0.0.0.0" in r.stderr
    assert "set ORCHESTRATOR_TOKEN" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_serve_without_an_applied_plan_says_to_run_up(tmp_path: Path) -> None:
    env = clean_env(ROOT=str(tmp_path), ORCHESTRATOR_PORT=str(free_port_block(1)))
    r = _cli(env, "serve")
    assert r.returncode == 1
    assert "run `orchestrator up`" in r.stderr


def test_health_exits_1_fast_when_no_monitor_answers(tmp_path: Path) -> None:
    env = clean_env(ROOT=str(tmp_path), ORCHESTRATOR_PORT=str(free_port_block(1)))
    r = _cli(env, "health")  # its probe has a 0.9 s timeout; how fast it exits is not measured here
    assert r.returncode == 1
    assert r.stdout.startswith("monitor not answering")
    assert _cli(env, "health", "--live").returncode == 1
