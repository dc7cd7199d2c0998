"""Memory budgets and recycling: the pure policy with values, cgroup v2 detection on fake cgroup
trees (and what this machine really has), the memory sampler on real processes, the recycle action
against a fake monitor, and end to end: a simulated instance whose RSS grows past its budget is
drained and recycled with no failed job, and comfyui_instance_recycles_total{reason="memory"}
counts it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import generate_latest
from support import simulated_machine, txt2img, wait_for

from orchestrator.core.errors import ConfigError
from orchestrator.core.instances import InstanceView
from orchestrator.core.layout import Layout
from orchestrator.core.memory import (
    MemoryPolicy,
    RecycleReason,
    instance_budget,
    recycle_reason,
    to_fraction,
    to_memory_max,
)
from orchestrator.core.plan import build_plan
from orchestrator.core.readiness import InstanceStatus
from orchestrator.core.settings import load_settings
from orchestrator.core.states import InstanceState
from orchestrator.machine.cgroups import CgroupError, MemoryCgroups, detect
from orchestrator.machine.gpu import MockBackend
from orchestrator.monitor.drain import DrainResult
from orchestrator.monitor.metrics import build_registry
from orchestrator.monitor.recycle import MemoryReport, MemoryWatch, drain_and_restart, policy_for
from orchestrator.monitor.sampler import EXECUTED, ExecutionCounter, InstanceMemory, MemorySampler

MIB = 2**20
GIB = 2**30


# ================================================================ the pure policy
def test_the_budget_high_water_mark_comes_first() -> None:
    p = MemoryPolicy(budget=10 * GIB, high_water=0.9, growth_max=GIB, jobs_max=100)
    assert recycle_reason(p, 9 * GIB - 1, 7 * GIB, 0) is RecycleReason.GROWTH  # just under the mark
    assert recycle_reason(p, 9 * GIB, 0, 500) is RecycleReason.MEMORY
    assert recycle_reason(p, 9 * GIB - 1, 8 * GIB, 99) is None  # growth exactly 1 GiB - 1: kept
    assert recycle_reason(p, 2 * GIB, GIB, 100) is RecycleReason.JOBS
    assert recycle_reason(p, 2 * GIB + 1, GIB, 0) is RecycleReason.GROWTH


def test_rules_that_are_off_never_recycle() -> None:
    assert recycle_reason(MemoryPolicy(), 10**15, 0, 10**9) is None
    assert not MemoryPolicy().active
    assert MemoryPolicy(jobs_max=5).active


def test_the_auto_budget_splits_host_ram_less_the_reserve() -> None:
    assert instance_budget(-1, 64 * GIB, 4, 4 * GIB) == 15 * GIB
    assert instance_budget(-1, 4 * GIB, 2, 4 * GIB) is None  # nothing left after the reserve
    assert instance_budget(None, 64 * GIB, 4, 4 * GIB) is None  # off
    assert instance_budget(24 * GIB, 64 * GIB, 4, 4 * GIB) == 24 * GIB


def test_settings_parse_and_bad_values_name_the_variable() -> None:
    assert to_memory_max("auto") == -1
    assert to_memory_max("off") is None
    assert to_memory_max("24G") == 24 * GIB
    assert to_fraction("90%") == 0.9
    assert to_fraction("0.8") == 0.8
    s = load_settings({"INSTANCE_MEMORY_MAX": "2G", "INSTANCE_MEMORY_GROWTH_MAX": "500M", "RECYCLE_AFTER_JOBS": "50"})
    p = policy_for(s, 2, host_total=64 * GIB)
    assert (p.budget, p.high_water, p.growth_max, p.jobs_max) == (2 * GIB, 0.9, 500 * MIB, 50)
    assert policy_for(load_settings({}), 2, host_total=20 * GIB).budget == 8 * GIB  # (20 - 4) / 2
    with pytest.raises(ConfigError, match=r"invalid INSTANCE_MEMORY_HIGH_WATER='1.5': expected a fraction"):
        load_settings({"INSTANCE_MEMORY_HIGH_WATER": "1.5"})
    with pytest.raises(ConfigError, match="INSTANCE_MEMORY_MAX='lots'"):
        load_settings({"INSTANCE_MEMORY_MAX": "lots"})


# ================================================================ cgroup v2 detection
def fake_cgroup(root: Path, *, v2: bool = True, controllers: str = "cpu io memory pids") -> Path:
    """A cgroup tree like /sys/fs/cgroup with this process in /kubepods/pod1."""
    own = root / "kubepods" / "pod1"
    own.mkdir(parents=True)
    if v2:
        (root / "cgroup.controllers").write_text(controllers + "\n")
        (own / "cgroup.controllers").write_text(controllers + "\n")
        (own / "cgroup.subtree_control").write_text("\n")
        (own / "cgroup.procs").write_text("101\n102\n")
    (root / "self_cgroup").write_text("0::/kubepods/pod1\n" if v2 else "4:memory:/kubepods/pod1\n")
    return own


def test_cgroup_v1_is_reported_unavailable_with_why(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, v2=False)
    support = detect(tmp_path, tmp_path / "self_cgroup")
    assert not support.available
    assert support.describe().startswith("cgroup: unavailable (not cgroup v2:")


def test_a_cgroup_without_the_memory_controller_is_unavailable(tmp_path: Path) -> None:
    own = fake_cgroup(tmp_path, controllers="cpu pids")
    support = detect(tmp_path, tmp_path / "self_cgroup")
    assert support.describe() == f"cgroup: unavailable (the memory controller is not delegated to {own})"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: the read-only branch needs a user")
def test_a_read_only_cgroup_is_unavailable(tmp_path: Path) -> None:
    own = fake_cgroup(tmp_path)
    own.chmod(0o555)
    try:
        assert "is not writable" in detect(tmp_path, tmp_path / "self_cgroup").why
    finally:
        own.chmod(0o755)


def test_a_delegated_v2_cgroup_gets_a_child_per_instance_with_memory_max(tmp_path: Path) -> None:
    own = fake_cgroup(tmp_path)
    support = detect(tmp_path, tmp_path / "self_cgroup")
    assert support.available
    assert support.path == own
    cg = MemoryCgroups(support)
    path = cg.limit("comfyui_gpu0", 3 * GIB)
    assert (path / "memory.max").read_text() == str(3 * GIB)
    # our own processes went to a leaf first (cgroup v2: no members next to limited children)
    assert (own / "orchestrator" / "cgroup.procs").read_text() in {"101", "102"}
    assert (own / "cgroup.subtree_control").read_text() == "+memory"
    cg.join("comfyui_gpu0", 4242)
    assert cg.members("comfyui_gpu0") == [4242]
    # a restarted monitor finds itself in the leaf and still manages the same children
    (tmp_path / "self_cgroup").write_text("0::/kubepods/pod1/orchestrator\n")
    (own / "orchestrator" / "cgroup.controllers").write_text("memory\n")
    assert detect(tmp_path, tmp_path / "self_cgroup").path == own


def test_unavailable_support_refuses_to_build_cgroups(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, v2=False)
    with pytest.raises(CgroupError, match="cgroup: unavailable"):
        MemoryCgroups(detect(tmp_path, tmp_path / "self_cgroup"))


def test_this_machine_is_detected_as_it_is() -> None:
    support = detect()
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()
    print(support.describe())
    if not v2:
        assert not support.available
        assert "not cgroup v2" in support.why
    else:
        assert support.available or support.why


# ================================================================ the sampler on real processes
def test_the_sampler_reads_the_process_tree_rss_vram_and_prompt_count(tmp_path: Path) -> None:
    log_file = tmp_path / "comfyui.log"
    log_file.write_text("Prompt executed in 0.1 seconds\n")  # an earlier process: not counted
    code = "import subprocess,sys,time; b=b'x'*(64<<20); p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        def child_pid() -> int:
            import psutil

            kids = psutil.Process(proc.pid).children()
            return kids[0].pid if kids else 0

        child = wait_for(child_pid, 30, what="the child process")
        pid = {"0": proc.pid}
        sampler = MemorySampler(
            lambda: {0: int(pid["0"])}, {0: log_file}, lambda gpu: ((child, 5 * MIB), (999999, 7 * MIB)), 1.0
        )
        sampler.sample_once()
        with log_file.open("a") as fh:
            fh.write("got prompt\nPrompt executed in 0.05 seconds\nPrompt exec")
        wait_for(lambda: sampler.sample_once() or sampler.latest()[0].rss > 64 * MIB, 30, what="the 64 MiB in RSS")
        with log_file.open("a") as fh:
            fh.write("uted in 0.2 seconds\n")  # a line written in two pieces counts once
        sampler.sample_once()
        mem = sampler.latest()[0]
        assert mem.pid == proc.pid
        assert mem.rss > 64 * MIB  # the parent's 64 MiB plus the child's interpreter
        assert mem.vram == 5 * MIB  # only the GPU memory of processes in its tree
        assert mem.jobs == 2
    finally:
        proc.kill()
        proc.wait()
    sampler.sample_once()
    assert 0 not in sampler.latest()  # gone: no sample, no series


def test_the_execution_counter_follows_a_rotated_log(tmp_path: Path) -> None:
    log_file = tmp_path / "x.log"
    log_file.write_bytes(EXECUTED * 3)
    counter = ExecutionCounter(log_file)
    counter.reset()
    assert counter.new() == 0
    log_file.unlink()
    log_file.write_bytes(EXECUTED + b"1\n")
    assert counter.new() == 1


# ================================================================ the recycle action
class FakeTarget:
    def __init__(self) -> None:
        self.queue = 2
        self.inflight = 1
        self.pid = 100
        self.restarts: list[str] = []
        self.probed = 0.0
        self.ready = True
        self.drains: list[str] = []

    def snapshot(self) -> list[InstanceView]:
        return [InstanceView(0, "comfyui_gpu0", 8188, InstanceState.READY, queue_pending=self.queue)]

    def instance_status(self, gpu: int) -> InstanceStatus:
        state = InstanceState.READY if self.ready else InstanceState.STARTING
        return InstanceStatus(0, "comfyui_gpu0", 8188, state, "", 0.0, "RUNNING", self.pid, None, None, 0, (),
                              self.queue, 0, time.time(), None, None)

    def request_restart(self, gpu: int, reason: str) -> InstanceStatus:
        self.restarts.append(reason)
        self.ready = False
        return self.instance_status(gpu)

    def jobs_in_flight(self, gpu: int) -> int:
        return self.inflight

    async def drain(self, gpu: int, timeout: float, *, interrupt: bool = True) -> DrainResult:
        """The monitor's drain as a recycle sees it (monitor.drain is tested in test_rolling)."""
        assert not interrupt, "a recycle never cuts a job"
        self.drains.append("drain")
        deadline = time.monotonic() + timeout
        while self.queue or self.inflight:
            if time.monotonic() > deadline:
                self.drains.append("given up")
                return DrainResult(gpu, "comfyui_gpu0", False, 0, timeout)
            await asyncio.sleep(0.01)
        return DrainResult(gpu, "comfyui_gpu0", True, 0, 0.0)


def test_a_recycle_drains_without_cutting_jobs_then_restarts_and_waits_for_the_new_process() -> None:
    async def main() -> None:
        t = FakeTarget()
        task = asyncio.create_task(drain_and_restart(t, 0, "RSS over budget", timeout=30, clock=time.monotonic,
                                                     poll=0.01))
        await asyncio.sleep(0.2)
        assert t.drains == ["drain"]
        assert t.restarts == []  # jobs queued: never restarted mid-job
        t.queue = 0
        await asyncio.sleep(0.2)
        assert t.restarts == []  # one of our jobs is still in flight
        t.inflight = 0
        await wait_async(lambda: bool(t.restarts))
        assert not task.done()  # until the new process is READY
        t.pid, t.ready = 101, True
        assert await asyncio.wait_for(task, 30) is True
        assert t.restarts == ["recycle: RSS over budget"]

    asyncio.run(main())


def test_a_recycle_whose_queue_never_empties_gives_up_untouched() -> None:
    async def main() -> None:
        t = FakeTarget()
        done = await drain_and_restart(t, 0, "x", timeout=0.3, clock=time.monotonic, poll=0.01)
        assert done is False
        assert t.restarts == []
        assert t.drains == ["drain", "given up"]

    asyncio.run(main())


async def wait_async(check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# ================================================================ end to end
def recycles(text: str, gpu: int, reason: str) -> float:
    for line in text.splitlines():
        if line.startswith("comfyui_instance_recycles_total{") and f'gpu="{gpu}"' in line and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return -1.0


@pytest.mark.timeout(300)
def test_an_instance_growing_past_its_budget_is_drained_and_recycled_with_no_failed_job(tmp_path: Path) -> None:
    m = simulated_machine(
        tmp_path / "root", 2, INSTANCE_MEMORY_MAX="400M", INSTANCE_MEMORY_HIGH_WATER="0.9",
        MEMORY_SAMPLE_INTERVAL="0.2",
    )
    m.up()
    try:
        wait_for(m.ready, 90, 0.2, what="/readyz 200")
        old_pid = requests.get(f"{m.monitor_url}/instances/0", timeout=5).json()["pid"]
        fault = m.layout.instance_dir(0) / "user" / "simulator_faults.json"
        fault.write_text(json.dumps({"leak_per_prompt": 40 * MIB, "exec_time": 0.1}))
        results: list[dict[str, Any]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def submit(n: int) -> None:
            while not stop.is_set():
                r = requests.post(f"{m.monitor_url}/jobs", json={"workflow": txt2img(f"rc{n}"), "timeout": 120},
                                  timeout=150)
                with lock:
                    results.append({"code": r.status_code, **(r.json() if r.content else {})})

        with ThreadPoolExecutor(3) as pool:
            for n in range(3):
                pool.submit(submit, n)

            def recycled() -> bool:
                text = requests.get(f"{m.monitor_url}/metrics", timeout=5).text
                return recycles(text, 0, "memory") >= 1

            try:
                wait_for(recycled, 180, 0.5, what="a recycle of GPU 0 for memory")
                fault.write_text("{}")  # the next process leaks no more
                wait_for(lambda: requests.get(f"{m.monitor_url}/instances/0", timeout=5).json()["state"] == "READY",
                         90, 0.2, what="GPU 0 READY again")
            finally:
                stop.set()
        new = requests.get(f"{m.monitor_url}/instances/0", timeout=5).json()
        assert new["pid"] != old_pid
        # The new process is sampled within a sampling round (later on a busy machine).
        def sampled() -> str | None:
            text = requests.get(f"{m.monitor_url}/metrics", timeout=5).text
            return text if 'comfyui_instance_memory_rss_bytes{gpu="0"' in text else None

        text = wait_for(sampled, 30, 0.2, what="GPU 0's new process sampled")
        assert recycles(text, 1, "memory") == 0
        failed = [r for r in results if r["code"] != 200 or r.get("status") != "success"]
        on_gpu0 = [r for r in results if (r.get("instance") or {}).get("gpu") == 0]
        assert len(on_gpu0) >= 3  # GPU 0 ran jobs before its recycle
        assert failed == []
    finally:
        m.down()


# ================================================================ metrics
class MemSource:
    supervisord_ok = True

    def instance_statuses(self) -> list[InstanceStatus]:
        return [
            InstanceStatus(g, f"comfyui_gpu{g}", 8188 + g, InstanceState.READY, "", 0.0, "RUNNING", 10 + g, None,
                           None, 0, (), 0, 0, None, None, None)
            for g in (0, 1)
        ]

    def gpu_statuses(self) -> list[Any]:
        return []

    def memory_report(self) -> MemoryReport:
        samples = {
            0: InstanceMemory(0, 10, 3 * GIB, GIB, 5 * GIB, 4, 1.0),
            1: InstanceMemory(1, 11, 2 * GIB, GIB, None, 0, 1.0),  # NVML cannot list its processes
        }
        return MemoryReport(samples, 8 * GIB, {(0, "memory"): 2, (0, "jobs"): 1})


def test_memory_metrics_per_instance_and_recycles_by_reason(tmp_path: Path) -> None:
    reg = build_registry(MemSource(), load_settings({"ROOT": str(tmp_path)}), Layout(tmp_path), hostname="h")
    l0 = {"gpu": "0", "instance": "comfyui_gpu0", "port": "8188"}
    l1 = {"gpu": "1", "instance": "comfyui_gpu1", "port": "8189"}
    assert reg.get_sample_value("comfyui_instance_memory_rss_bytes", l0) == 3 * GIB
    assert reg.get_sample_value("comfyui_instance_gpu_memory_used_bytes", l0) == 5 * GIB
    assert reg.get_sample_value("comfyui_instance_gpu_memory_used_bytes", l1) is None  # omitted, not 0
    assert reg.get_sample_value("comfyui_instance_memory_budget_bytes", l1) == 8 * GIB
    assert reg.get_sample_value("comfyui_instance_recycles_total", {**l0, "reason": "memory"}) == 2
    assert reg.get_sample_value("comfyui_instance_recycles_total", {**l0, "reason": "jobs"}) == 1
    assert reg.get_sample_value("comfyui_instance_recycles_total", {**l1, "reason": "growth"}) == 0
    text = generate_latest(reg).decode()
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr


def test_the_watch_recycles_once_per_process_and_counts_by_reason(tmp_path: Path) -> None:
    async def main() -> None:
        settings = load_settings({"ROOT": str(tmp_path), "MOCK_GPU": "1", "NUM_GPUS": "1",
                                  "INSTANCE_MEMORY_MAX": "off", "RECYCLE_AFTER_JOBS": "3"})
        plan = build_plan(settings, MockBackend(1, GIB).list_gpus())
        target = FakeTarget()
        target.queue = target.inflight = 0
        watch = MemoryWatch(target, settings, plan, dict, lambda gpu: None, clock=time.monotonic, wall=time.time)
        samples = {0: InstanceMemory(0, 100, 500 * MIB, 400 * MIB, None, 2, 1.0)}
        watch.sampler.latest = lambda: samples  # type: ignore[method-assign]
        watch.check_once()
        assert not watch._tasks  # 2 prompts: kept
        samples[0] = dataclasses.replace(samples[0], jobs=3)
        watch.check_once()
        await wait_async(lambda: bool(target.restarts))
        assert target.drains == ["drain"]
        assert target.restarts[0].startswith("recycle: ran 3 prompts")
        target.pid, target.ready = 101, True
        await asyncio.wait_for(watch._tasks[0], 30)
        assert watch.recycles == {(0, "jobs"): 1}
        watch.check_once()  # the old process's sample lingers until the next round: no second recycle
        assert watch._tasks[0].done()
        assert len(target.restarts) == 1

    asyncio.run(main())


class TwoGpus:
    """A monitor of two instances whose drains are held open by the test."""

    def __init__(self) -> None:
        self.pids = {0: 100, 1: 200}
        self.draining: set[int] = set()
        self.most = 0
        self.release = asyncio.Event()

    def instance_status(self, gpu: int) -> InstanceStatus:
        return InstanceStatus(gpu, f"comfyui_gpu{gpu}", 8188 + gpu, InstanceState.READY, "", 0.0, "RUNNING",
                              self.pids[gpu], None, None, 0, (), 0, 0, time.time(), None, None)

    def request_restart(self, gpu: int, reason: str) -> InstanceStatus:
        self.pids[gpu] += 1
        return self.instance_status(gpu)

    async def drain(self, gpu: int, timeout: float, *, interrupt: bool = True) -> DrainResult:
        self.draining.add(gpu)
        self.most = max(self.most, len(self.draining))
        await self.release.wait()
        self.draining.discard(gpu)
        return DrainResult(gpu, f"comfyui_gpu{gpu}", True, 0, 0.0)


def test_recycles_due_at_once_take_out_one_instance_at_a_time(tmp_path: Path) -> None:
    async def main() -> None:
        settings = load_settings({"ROOT": str(tmp_path), "MOCK_GPU": "1", "NUM_GPUS": "2",
                                  "INSTANCE_MEMORY_MAX": "off", "RECYCLE_AFTER_JOBS": "3"})
        plan = build_plan(settings, MockBackend(2, GIB).list_gpus())
        target = TwoGpus()
        watch = MemoryWatch(target, settings, plan, dict, lambda gpu: None,  # type: ignore[arg-type]
                            clock=time.monotonic, wall=time.time)
        samples = {g: InstanceMemory(g, 100 * (g + 1), 500 * MIB, 400 * MIB, None, 3, 1.0) for g in (0, 1)}
        watch.sampler.latest = lambda: samples  # type: ignore[method-assign]
        watch.check_once()
        await wait_async(lambda: bool(target.draining))
        await asyncio.sleep(0.2)
        assert len(target.draining) == 1  # ROLLING_MAX_UNAVAILABLE=1: the other waits its turn
        target.release.set()
        await asyncio.wait_for(asyncio.gather(*watch._tasks.values()), 30)
        assert target.most == 1
        assert watch.recycles == {(0, "jobs"): 1, (1, "jobs"): 1}

    asyncio.run(main())
