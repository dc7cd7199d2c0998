"""The monitor's probe loop: probes every instance, turns the results into restarts.

One asyncio loop ticks every ``min(PROBE_INTERVAL, PROBE_STARTING_INTERVAL, 0.25 s)``: it reads
supervisord's process table (:class:`SupervisordPoller`, in a thread, with a timeout) and starts a
check task for each instance that is due. READY instances are probed every ``PROBE_INTERVAL``;
STARTING and SUSPECT ones every ``PROBE_STARTING_INTERVAL`` (0.25 s), and any instance whose
process changed at once, so a crash is noticed within a tick and a (re)started instance is READY
within that interval of ComfyUI answering. After a failed probe the next one starts a tick later,
and a process stopped by a signal (state T, e.g. SIGSTOP) fails its probes at once without waiting
for PROBE_TIMEOUT, so a hung instance is restarted within seconds. Each instance has at most one
task in flight, so a hung instance never delays the others, nor a scrape. Decisions come from the
pure :func:`health.decide`; actions go through supervisord (:class:`SupervisorActions`) or the
instance's API (:class:`Prober`). GPU telemetry is sampled by :class:`GpuSampler` in its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping

from orchestrator.core import health
from orchestrator.core.errors import OrchestratorError
from orchestrator.core.gpufaults import Verdict
from orchestrator.core.health import Action, Decision, HealthConfig, ProbeResult, Record
from orchestrator.core.instances import InstanceView
from orchestrator.core.layout import Layout
from orchestrator.core.plan import Instance, MachinePlan
from orchestrator.core.readiness import GpuStatus, InstanceStatus, Liveness, Readiness, readiness
from orchestrator.core.settings import Settings
from orchestrator.core.states import InstanceState, ProcessInfo
from orchestrator.machine.generation import CurrentGeneration
from orchestrator.machine.gpu import GpuBackend, open_backend
from orchestrator.machine.supervisor import Supervisor
from orchestrator.machine.watchdog import Heartbeat, heartbeat_path
from orchestrator.monitor.drain import Drainer, DrainResult
from orchestrator.monitor.gpuhealth import GpuFaultWatch, stop_fenced
from orchestrator.monitor.prober import Prober
from orchestrator.monitor.probes import LogScanner
from orchestrator.monitor.recycle import MemoryReport, MemoryWatch, running_pids
from orchestrator.monitor.sampler import GpuSampler
from orchestrator.monitor.slots import Slot
from orchestrator.monitor.supervision import (
    SupervisorActions,
    SupervisordPoller,
    SupervisorFactory,
    unknown_process,
)

log = logging.getLogger(__name__)

_FAST_STATES = frozenset(
    {InstanceState.STARTING, InstanceState.RESTARTING, InstanceState.BACKOFF, InstanceState.FATAL,
     InstanceState.SUSPECT}
)
_LOUD_STATES = frozenset({InstanceState.UNHEALTHY, InstanceState.FATAL, InstanceState.BACKOFF})
MAX_TICK = 0.25  # seconds between supervisord polls (and probes of starting instances)


def _log_decision(name: str, decision: Decision) -> None:
    """Every transition (loud ones as warnings) and every event of one decision."""
    for t in decision.transitions:
        level = logging.WARNING if t.new in _LOUD_STATES else logging.INFO
        log.log(level, "%s: %s -> %s: %s", name, t.old.value, t.new.value, t.reason)
    for event in decision.events:
        log.warning("%s: %s", name, event)


def _log_failure(task: asyncio.Task[None]) -> None:
    # An unexpected error in one check is logged; the instance is probed again next tick.
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed: %r", task.get_name(), task.exception())


def health_config(settings: Settings) -> HealthConfig:
    """The state machine's knobs from the settings (the rest keep their defaults)."""
    return HealthConfig(startup_timeout=settings.startup_timeout, unhealthy_threshold=settings.unhealthy_threshold)


class ProbeLoop:
    """The ticks: poll supervisord, start each due instance's check, decide, act.

    Args:
        slots: the instances' bookkeeping, by GPU index (shared with the :class:`Monitor`).
        cfg: the state machine's knobs.
        tick: seconds between polls; interval: PROBE_INTERVAL; fast: PROBE_STARTING_INTERVAL (the
            cadence of STARTING and SUSPECT instances and after a failed probe; default ``tick``).
    """

    def __init__(
        self, slots: Mapping[int, Slot], cfg: HealthConfig, pieces: tuple[SupervisordPoller, SupervisorActions, Prober],
        *, tick: float, interval: float, clock: Callable[[], float], wall: Callable[[], float],
        fast: float | None = None,
    ) -> None:
        self.slots = slots
        self.cfg = cfg
        self.poller, self.actions, self.prober = pieces
        self.tick = tick
        self.interval = interval
        self.fast = tick if fast is None else fast
        self._clock = clock
        self._wall = wall
        self.heartbeat: Callable[[], None] = lambda: None  # the Monitor's heartbeat file (machine.watchdog)
        self.fenced: Callable[[int], str] = lambda _gpu: ""  # why a GPU takes no checks/actions (a failed GPU)

    async def run(self, wake: asyncio.Event) -> None:
        """Tick until cancelled; ``wake`` starts the next tick early (a hung report, a restart request)."""
        while True:
            self.heartbeat()  # every tick: a stuck loop is one whose heartbeat goes stale
            started = self._clock()
            try:
                await self.tick_once()
            except (OrchestratorError, OSError, RuntimeError, ValueError):
                log.exception("monitor tick failed")
            wait = max(0.0, self.tick - (self._clock() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), wait)
            wake.clear()

    async def tick_once(self) -> None:
        """Poll supervisord and start the checks that are due (tests drive this directly)."""
        procs = await self.poller.poll()
        # A table requested before our last restart finished may still show the old process.
        polled_at = self.poller.polled_at if procs is not None else self._clock()
        for slot in self.slots.values():
            proc = None
            if procs is not None:
                proc = procs.get(slot.instance.name) or unknown_process(slot.instance.name, self._wall())
                slot.proc = proc
            if slot.busy() or not slot.due(proc, self._clock(), known=procs is not None):
                continue
            if self.fenced(slot.instance.index):
                continue  # its GPU failed: no probes, no restarts (the instance is stopped)
            slot.task = asyncio.create_task(self._check(slot, proc, polled_at), name=f"probe-{slot.instance.name}")
            slot.task.add_done_callback(_log_failure)

    async def _check(self, slot: Slot, proc: ProcessInfo | None, polled_at: float) -> None:
        """Probe one instance, decide, act. Runs as the instance's only task in flight."""
        if proc is not None and polled_at < slot.action_done_at:
            return  # this process table predates our last action: wait for a fresh one
        started = self._clock()
        probe = await self._probe(slot, proc)
        hung, requested = slot.take_requests()
        decision = health.decide(
            slot.record, proc, probe, self._clock(), self.cfg, hung=hung, restart_requested=requested
        )
        self._apply(slot, decision)
        if proc is not None:
            slot.seen_identity = (proc.pid, proc.start, proc.state)
        for action in decision.actions:
            error = await self._act(slot.instance, action)
            self._apply(slot, health.after_action(slot.record, action, error, self._clock()))
            slot.action_done_at = self._clock()
        # Probes start every PROBE_INTERVAL, however long a (timed-out) probe took.
        # After a failed probe the next comes at once (a tick later): a hung instance is restarted
        # after UNHEALTHY_THRESHOLD probe timeouts, not that many PROBE_INTERVALs.
        fast = slot.record.state in _FAST_STATES or bool(decision.actions) or slot.record.failures > 0
        fast = fast or slot.drain is not None  # a drain waits for a fresh queue count
        slot.next_due = started + (self.fast if fast else self.interval)

    async def _probe(self, slot: Slot, proc: ProcessInfo | None) -> ProbeResult:
        return await self.prober.probe(slot.instance, slot.scanner, proc)

    async def _act(self, inst: Instance, action: Action) -> str:
        """Carry out one action; returns "" on success, else a one-line error."""
        if action is Action.FREE:
            return await self.prober.free(inst)
        return await self.actions.run(inst.name, action)

    @staticmethod
    def _apply(slot: Slot, decision: Decision) -> None:
        _log_decision(slot.instance.name, decision)
        slot.record = decision.record


class Monitor:
    """Watches every planned instance. Implements :class:`orchestrator.core.instances.InstanceDirectory`.

    The monitor starts and stops its cooperating pieces (the :class:`ProbeLoop` ``loop``, the
    supervisord ``poller`` and ``actions``, the ``prober``, the GPU ``sampler``), takes commands
    from other threads and answers the views; none of its methods blocks.

    Longer than 200 lines because it is the one owner of the instances' state that every view,
    command and piece (probe loop, drain, GPU faults, memory watch) goes through; the pieces
    themselves live in their own modules and only their wiring is here.

    Args:
        settings: the effective settings.
        plan: the applied machine plan.
        supervisor_factory: builds a supervisord client with the given RPC timeout (seconds).
        backend_factory: opens the GPU telemetry backend (default: :func:`gpu.open_backend`).
        clock: monotonic seconds (decisions); wall: epoch seconds (what the API shows).
    """

    def __init__(
        self,
        settings: Settings,
        plan: MachinePlan,
        *,
        supervisor_factory: SupervisorFactory | None = None,
        backend_factory: Callable[[], GpuBackend] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.plan = plan
        layout = Layout(settings.root)
        factory = supervisor_factory or (lambda timeout: Supervisor(layout, timeout=timeout))
        self._clock = clock
        self._wall = wall
        now = clock()
        self._slots = {i.index: Slot(i, Record.initial(now), LogScanner(i.log_file)) for i in plan.instances}
        self.sampler = GpuSampler(
            backend_factory or (lambda: open_backend(settings)), [inst.gpu for inst in plan.instances],
            settings.gpu_sample_interval, wall,
        )
        self.poller = SupervisordPoller(factory, settings.probe_timeout, clock)
        self.prober = Prober(len(self._slots), settings.probe_timeout, mock=plan.mock, clock=clock)
        self.loop = ProbeLoop(
            self._slots, health_config(settings),
            (self.poller, SupervisorActions(factory, settings.stop_timeout, len(self._slots)), self.prober),
            tick=min(settings.probe_interval, settings.probe_starting_interval, MAX_TICK),
            interval=settings.probe_interval, clock=clock, wall=wall,
            fast=min(settings.probe_interval, settings.probe_starting_interval),
        )
        self.loop.heartbeat = Heartbeat(heartbeat_path(layout)).beat
        self._factory = factory
        self.gpu_faults = GpuFaultWatch(
            [inst.gpu for inst in plan.instances], backend_factory or (lambda: open_backend(settings))
        )
        self.loop.fenced = self.gpu_faults.failed
        self.memory = MemoryWatch(
            self, settings, plan, lambda: running_pids(self._slots), self.sampler.processes, clock=clock, wall=wall
        )
        self._loop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._inflight: Callable[[], Mapping[int, int]] | None = None
        self.on_loop_failure: Callable[[], None] | None = None  # serve: exit, supervisord restarts us
        self.generation = CurrentGeneration(layout)
        self.drainer = Drainer(
            lambda: self._inflight() if self._inflight is not None else {}, self.prober.session, clock,
            hold=settings.startup_timeout + settings.stop_timeout + 60, wake=self._wake_up,
        )

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start probing and sampling (call from the event loop that serves the API)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.loop.heartbeat()  # before the first round: a fresh monitor is not taken for a stuck one
        self.prober.start()
        self.sampler.start()
        await asyncio.to_thread(self.gpu_faults.start, self.gpu_verdict)
        await self.memory.start()
        # One round before serving (uvicorn listens after startup): /healthz and /readyz are
        # right from the first request, e.g. after supervisord restarted the monitor.
        await self.loop.tick_once()
        first = [s.task for s in self._slots.values() if s.task is not None]
        if first:
            await asyncio.wait(first, timeout=self.settings.probe_timeout + 1.0)
        self._loop_task = asyncio.create_task(self.loop.run(self._wake), name="monitor")
        self._loop_task.add_done_callback(self._loop_done)
        log.info(
            "monitoring %d instance(s) every %gs (probe timeout %gs, %d failures → restart)",
            len(self._slots), self.settings.probe_interval, self.settings.probe_timeout,
            self.settings.unhealthy_threshold,
        )

    def _loop_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        log.critical("the probe loop stopped: %r", task.exception())
        if self.on_loop_failure is not None:
            self.on_loop_failure()

    async def close(self) -> None:
        """Stop the loop, every check in flight, the pools and the sampler (also before :meth:`start`)."""
        if self._loop_task is not None:
            self._loop_task.remove_done_callback(self._loop_done)
        tasks = [t for t in (self._loop_task, *(s.task for s in self._slots.values())) if t is not None]
        for task in tasks:
            task.cancel()
        # Failures were logged by the done callbacks; closing must not raise them again.
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.prober.close()
        self.poller.close()
        self.loop.actions.close()
        await asyncio.to_thread(self.sampler.stop)
        await asyncio.to_thread(self.gpu_faults.stop)
        await self.memory.close()

    def set_inflight(self, inflight: Callable[[], Mapping[int, int]]) -> None:
        """Jobs in flight per GPU index (from the job manager), for ``READYZ_SATURATION``."""
        self._inflight = inflight

    # ------------------------------------------------------------ commands from outside
    def _slot(self, gpu: int) -> Slot:
        try:
            return self._slots[gpu]
        except KeyError:
            known = ", ".join(str(i) for i in self._slots) or "none"
            raise KeyError(f"no instance on GPU {gpu} (this machine runs GPUs {known})") from None

    def _wake_up(self) -> None:
        if self._loop is not None and self._wake is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def report_hung(self, index: int, reason: str) -> None:
        """A job found the instance stuck: it becomes UNHEALTHY and is restarted (thread-safe)."""
        slot = self._slot(index)
        log.warning("%s reported hung: %s", slot.instance.name, reason)
        with slot.requests_lock:
            slot.hung = reason or "reported hung"
        self._wake_up()

    def request_restart(self, gpu: int, reason: str) -> InstanceStatus:
        """Restart the instance on ``gpu`` at the next tick. Raises KeyError for an unknown GPU."""
        slot = self._slot(gpu)
        log.info("%s: restart requested (%s)", slot.instance.name, reason)
        with slot.requests_lock:
            slot.restart_requested = reason
        self._wake_up()
        return self._status(slot)

    def gpu_verdict(self, gpu: int, verdict: Verdict, reason: str) -> None:
        """A GPU fault's verdict (thread-safe): restart its instance, or fence the GPU and stop it."""
        if verdict is Verdict.RESTART_INSTANCE and gpu in self._slots:
            self.request_restart(gpu, f"GPU {gpu}: {reason}")
        elif verdict is Verdict.MARK_FAILED and gpu in self._slots and self._loop and not self._loop.is_closed():
            stop = stop_fenced(self._slots[gpu], self._factory, self.settings.stop_timeout, reason)
            asyncio.run_coroutine_threadsafe(stop, self._loop)

    async def drain(self, gpu: int, timeout: float, *, interrupt: bool = True) -> DrainResult:
        """Stop routing to the instance on ``gpu`` and wait until it is empty (see :mod:`monitor.drain`).

        Raises KeyError for an unknown GPU."""
        return await self.drainer.drain(self._slot(gpu), timeout, interrupt=interrupt)

    def undrain(self, gpu: int) -> InstanceStatus:
        """Route jobs to the instance on ``gpu`` again. Raises KeyError for an unknown GPU."""
        slot = self._slot(gpu)
        self.drainer.undrain(slot)
        return self._status(slot)

    # ------------------------------------------------------------ views (never block)
    def _status(self, slot: Slot) -> InstanceStatus:
        status = slot.status(self._clock(), self._wall(), self.settings.redact, self.generation.get())
        failed = self.gpu_faults.failed(slot.instance.index)
        return dataclasses.replace(status, state=InstanceState.UNHEALTHY, reason=failed) if failed else status

    def instance_statuses(self) -> list[InstanceStatus]:
        return [self._status(s) for s in self._slots.values()]

    def instance_status(self, gpu: int) -> InstanceStatus:
        return self._status(self._slot(gpu))

    def gpu_statuses(self) -> list[GpuStatus]:
        health = self.gpu_faults.health()
        return [dataclasses.replace(s, health=health.get(s.gpu.index)) for s in self.sampler.statuses()]

    def snapshot(self) -> list[InstanceView]:
        now = self._clock()
        return [dataclasses.replace(v, fenced=self.gpu_faults.failed(v.index))
                for v in (s.view(now) for s in self._slots.values())]

    # ------------------------------------------------------------ memory (monitor.recycle)
    def jobs_in_flight(self, gpu: int) -> int:
        return int(self._inflight().get(gpu, 0)) if self._inflight is not None else 0

    def memory_report(self) -> MemoryReport:
        return self.memory.report()

    def readiness(self) -> Readiness:
        inflight: Mapping[int, int] = {}
        if self._inflight is not None and self.settings.readyz_saturation:
            inflight = self._inflight()
        live = self.liveness()  # 503 whenever supervisord does not answer (killed, stopped, hung)
        r = readiness(
            self.instance_statuses(), self.settings.min_ready_instances, saturation=self.settings.readyz_saturation,
            max_queue_depth=self.settings.max_queue_depth, inflight=inflight,
            supervisord_down="" if live.supervisord else live.reason,
        )
        failed = [why for why in map(self.gpu_faults.failed, self._slots) if why and why not in r.reason]
        return dataclasses.replace(r, reason="; ".join([r.reason, *failed])) if failed else r

    def liveness(self) -> Liveness:
        running = self._loop_task is not None and not self._loop_task.done()
        # One slow answer on a busy machine is not "supervisord is gone"; this long a silence is.
        stale = max(5.0, 3 * self.settings.probe_timeout) + self.loop.tick
        return self.poller.liveness(running, stale)

    @property
    def supervisord_ok(self) -> bool:
        return self.poller.ok
