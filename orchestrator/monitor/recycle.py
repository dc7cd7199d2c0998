"""Memory budgets in the monitor: sample, enforce with cgroups where possible, recycle.

:class:`MemoryWatch` owns the pieces: the :class:`~orchestrator.monitor.sampler.MemorySampler`
(RSS of each instance's process tree, its GPU memory from NVML, its prompt count), the cgroup v2
limits (``machine.cgroups``: ``memory.max`` = the budget, where this process may create child
cgroups) and the recycling loop. Each round asks the pure :func:`core.memory.recycle_reason`
whether an instance passed its budget's high-water mark, grew too much since it started or ran
its share of prompts; if so :func:`drain_and_restart` recycles it through the monitor's drain
(``monitor.drain``, as rolling restarts): no new jobs are routed to it, it finishes what it holds
(never cut mid-job: a drain that times out is given up and retried later), it is restarted
through supervisord, and jobs go to it again once its new process is READY.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import psutil

from orchestrator.core.memory import MemoryPolicy, describe, instance_budget, recycle_reason
from orchestrator.core.plan import MachinePlan
from orchestrator.core.readiness import InstanceStatus
from orchestrator.core.settings import Settings
from orchestrator.core.states import ProcessState
from orchestrator.machine.cgroups import CgroupError, MemoryCgroups, detect
from orchestrator.monitor.drain import DrainResult
from orchestrator.monitor.sampler import InstanceMemory, MemorySampler
from orchestrator.monitor.slots import Slot

log = logging.getLogger(__name__)


def running_pids(slots: Mapping[int, Slot]) -> dict[int, int]:
    """The running process of each instance (from the monitor's last supervisord poll; any thread)."""
    return {i: s.proc.pid for i, s in slots.items()
            if s.proc is not None and s.proc.state is ProcessState.RUNNING and s.proc.pid > 0}


class RecycleTarget(Protocol):
    """What a recycle needs from the monitor."""

    def instance_status(self, gpu: int) -> InstanceStatus: ...

    def request_restart(self, gpu: int, reason: str) -> InstanceStatus: ...

    async def drain(self, gpu: int, timeout: float, *, interrupt: bool = True) -> DrainResult: ...


async def drain_and_restart(
    target: RecycleTarget, gpu: int, why: str, *, timeout: float, clock: Callable[[], float],
    poll: float = 0.1, ready_timeout: float = 600.0,
) -> bool:
    """Recycle the instance on ``gpu``: drain it (``monitor.drain``, never cutting a job), restart
    it; the drain mark ends once its new process is READY, and jobs go to it again.

    Returns False (instance untouched, routed to again) when its queue did not empty within ``timeout``.
    """
    old = target.instance_status(gpu).pid
    drained = await target.drain(gpu, timeout, interrupt=False)
    if not drained.drained:
        log.warning("%s: not recycled: its queue did not empty within %gs", drained.name, timeout)
        return False
    log.warning("%s: recycling (%s)", drained.name, why)
    target.request_restart(gpu, f"recycle: {why}")
    ready_by = clock() + ready_timeout
    while clock() <= ready_by:  # the restart itself
        st = target.instance_status(gpu)
        if st.ready and st.pid is not None and st.pid != old:
            break
        await asyncio.sleep(poll)
    return True


def policy_for(settings: Settings, instances: int, host_total: int | None = None) -> MemoryPolicy:
    """The recycling policy of every instance from the settings and the host's RAM."""
    total = host_total if host_total is not None else int(psutil.virtual_memory().total)
    budget = instance_budget(settings.instance_memory_max, total, instances, settings.instance_memory_reserve)
    return MemoryPolicy(
        budget=budget, high_water=settings.instance_memory_high_water,
        growth_max=settings.instance_memory_growth_max, jobs_max=settings.recycle_after_jobs,
    )


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """What the metrics show: the latest samples, the budget and the recycles by (GPU, reason)."""

    samples: Mapping[int, InstanceMemory]
    budget: int | None
    recycles: Mapping[tuple[int, str], int]


class MemoryWatch:
    """Samples instance memory, limits it with cgroups where possible and recycles instances.

    Args:
        target: the monitor. pids: the running instance processes by GPU index.
        gpu_processes: NVML's (pid, bytes) list of a GPU (None when unknown).
    """

    def __init__(
        self, target: RecycleTarget, settings: Settings, plan: MachinePlan,
        pids: Callable[[], Mapping[int, int]],
        gpu_processes: Callable[[int], tuple[tuple[int, int], ...] | None],
        *, clock: Callable[[], float], wall: Callable[[], float],
    ) -> None:
        self.target = target
        self.settings = settings
        self.names = {i.index: i.name for i in plan.instances}
        self.policy = policy_for(settings, len(plan.instances))
        self.sampler = MemorySampler(
            pids, {i.index: i.log_file for i in plan.instances}, gpu_processes,
            settings.memory_sample_interval, wall, on_process=self._place,
        )
        self._clock, self._wall = clock, wall
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._rolling = asyncio.Semaphore(settings.rolling_max_unavailable)
        self._done_pid: dict[int, int] = {}  # the process last recycled (its old samples linger a round)
        self._retry_at: dict[int, float] = {}
        self.recycles: dict[tuple[int, str], int] = {}
        self.cgroups: MemoryCgroups | None = None
        self.cgroup_state = "cgroup: not checked"
        self._loop_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ cgroups
    def _setup_cgroups(self) -> None:
        support = detect()
        self.cgroup_state = support.describe()
        if not support.available or not self.policy.budget:
            log.info("instance memory budget %s; %s",
                     f"{self.policy.budget // 2**20} MiB" if self.policy.budget else "off", self.cgroup_state)
            return
        try:
            cgroups = MemoryCgroups(support)
            for name in self.names.values():
                cgroups.limit(name, self.policy.budget)
        except CgroupError as exc:
            self.cgroup_state = f"cgroup: unavailable ({exc})"
            log.warning("instance memory limits not enforced: %s", exc)
            return
        self.cgroups = cgroups
        log.info("instance memory budget %d MiB; %s", self.policy.budget // 2**20, self.cgroup_state)

    def _place(self, gpu: int, pid: int) -> None:
        if self.cgroups is not None:
            try:
                self.cgroups.join(self.names[gpu], pid)
            except CgroupError as exc:
                log.warning("%s", exc)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await asyncio.to_thread(self._setup_cgroups)
        self.sampler.start()
        if self.policy.active:
            self._loop_task = asyncio.create_task(self._run(), name="recycle")

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self.sampler.stop)

    async def _run(self) -> None:
        while True:
            self.check_once()
            await asyncio.sleep(self.settings.memory_sample_interval)

    # ------------------------------------------------------------ decisions
    def check_once(self) -> None:
        """Start a recycle for each instance the policy says is due (one at a time per instance)."""
        now = self._clock()
        for gpu, mem in self.sampler.latest().items():
            busy = gpu in self._tasks and not self._tasks[gpu].done()
            if busy or self._done_pid.get(gpu) == mem.pid or self._retry_at.get(gpu, 0.0) > now:
                continue
            reason = recycle_reason(self.policy, mem.rss, mem.rss_at_start, mem.jobs)
            if reason is None:
                continue
            why = describe(reason, self.policy, mem.rss, mem.rss_at_start, mem.jobs)
            self._tasks[gpu] = asyncio.create_task(self._recycle(gpu, mem.pid, reason.value, why))

    async def _recycle(self, gpu: int, pid: int, reason: str, why: str) -> None:
        async with self._rolling:  # several due at once: ROLLING_MAX_UNAVAILABLE at a time, as a roll
            done = await drain_and_restart(
                self.target, gpu, why, timeout=self.settings.recycle_drain_timeout, clock=self._clock,
                ready_timeout=self.settings.startup_timeout,
            )
        if done:
            self._done_pid[gpu] = pid
            self.recycles[(gpu, reason)] = self.recycles.get((gpu, reason), 0) + 1
        else:
            self._retry_at[gpu] = self._clock() + max(30.0, self.settings.memory_sample_interval)

    def report(self) -> MemoryReport:
        return MemoryReport(self.sampler.latest(), self.policy.budget, dict(self.recycles))

