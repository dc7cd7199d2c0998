"""The monitor (``orchestrator serve``): probes every instance, restarts hung ones, serves the API.

One asyncio loop ticks every ``min(PROBE_INTERVAL, 0.25 s)``: it reads supervisord's process table
(in a thread, with a timeout) and starts a probe task for each instance that is due. READY
instances are probed every ``PROBE_INTERVAL``; starting ones and any instance whose process
changed are probed at once, so a crash is noticed within a tick and a restarted instance is
READY as soon as it answers. After a failed probe the next one starts a tick later, and a
process stopped by a signal (state T, e.g. SIGSTOP) fails its probes at once without waiting for
PROBE_TIMEOUT, so a hung instance is restarted within seconds. Each instance has at most one
task in flight, so a hung instance never delays the others, nor a scrape. Decisions come from
the pure :func:`health.decide`; actions go through supervisord
(:class:`~orchestrator.machine.supervisor.Supervisor`) in threads. GPU telemetry is sampled by
:class:`GpuSampler` in its own thread; readers get the latest sample.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from orchestrator.core import health
from orchestrator.core.errors import GpuError, OrchestratorError, SupervisorError
from orchestrator.core.health import (
    Action,
    Decision,
    GpuStatus,
    HealthConfig,
    InstanceStatus,
    Liveness,
    ProbeResult,
    Readiness,
    Record,
)
from orchestrator.core.instances import InstanceView
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.core.states import InstanceState, ProcessState

if TYPE_CHECKING:
    # httpx, supervisor and the probes are imported where they are used, so that
    # `orchestrator health` (a container health check) starts fast.
    import httpx
    from fastapi import APIRouter, FastAPI

    from orchestrator.core.gpus import Gpu, GpuSample
    from orchestrator.core.plan import Instance, MachinePlan
    from orchestrator.core.states import ProcessInfo
    from orchestrator.machine.gpu import GpuBackend
    from orchestrator.monitor.probes import LogScanner

log = logging.getLogger(__name__)

_PROBING = frozenset({ProcessState.STARTING, ProcessState.RUNNING})
_FAST_STATES = frozenset(
    {InstanceState.STARTING, InstanceState.RESTARTING, InstanceState.BACKOFF, InstanceState.FATAL}
)
_LOUD_STATES = frozenset({InstanceState.UNHEALTHY, InstanceState.FATAL, InstanceState.BACKOFF})
MAX_TICK = 0.25  # seconds between supervisord polls (and probes of starting instances)


def process_stopped(pid: int) -> bool:
    """True when ``pid`` is stopped by a signal (SIGSTOP, SIGTSTP: state ``T`` in /proc): it cannot answer.

    Read every tick for running instances (one small read each), so a stopped instance is restarted
    within a second instead of after UNHEALTHY_THRESHOLD probes that each wait PROBE_TIMEOUT.
    """
    if pid <= 0:
        return False
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_STOPPED)
    except psutil.Error:
        return False


class SupervisorLike(Protocol):
    """The part of :class:`~orchestrator.machine.supervisor.Supervisor` the monitor uses (faked in tests)."""

    def processes(self) -> list[ProcessInfo]: ...

    def start(self, name: str, wait: bool = False) -> None: ...

    def stop(self, name: str, wait: bool = True) -> None: ...

    def signal(self, name: str, sig: str) -> None: ...


def _unknown(name: str, now: float) -> ProcessInfo:
    """A planned program supervisord does not know (its configuration predates the plan)."""
    from orchestrator.core.states import ProcessInfo

    why = f"no program {name} in supervisord: run `orchestrator up` to apply the plan"
    return ProcessInfo(name, ProcessState.UNKNOWN, 0, 0.0, now, 0, "", why)


# ---------------------------------------------------------------- GPU sampling
class GpuSampler:
    """Samples GPU telemetry in a thread on its own interval; :meth:`latest` never blocks on NVML."""

    def __init__(
        self,
        backend_factory: Callable[[], GpuBackend],
        gpus: Sequence[Gpu],
        interval: float,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._factory = backend_factory
        self._gpus = list(gpus)
        self._interval = interval
        self._wall = wall
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latest: dict[int, tuple[GpuSample, float]] = {}
        self._backend: GpuBackend | None = None
        self._error = ""

    def start(self) -> None:
        if self._thread is None and self._gpus:
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def sample_once(self) -> None:
        """One sampling round (the thread's body; tests call it directly)."""
        try:
            if self._backend is None:
                self._backend = self._factory()
            samples = self._backend.sample(self._gpus)
        except (GpuError, OSError) as exc:
            if str(exc) != self._error:
                log.warning("GPU telemetry unavailable: %s", exc)
            self._error = str(exc)
            self._backend = None
            return
        self._error = ""
        now = self._wall()
        # One dict assignment: readers see the previous round or this one, never a mix.
        self._latest = {s.index: (s, now) for s in samples}

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.sample_once()
                self._stop.wait(self._interval)
        finally:
            if self._backend is not None:
                with contextlib.suppress(GpuError, OSError):
                    self._backend.close()

    def statuses(self) -> list[GpuStatus]:
        latest = self._latest
        out = []
        for gpu in self._gpus:
            sample, at = latest.get(gpu.index, (None, None))
            out.append(GpuStatus(gpu=gpu, sample=sample, sampled_at=at))
        return out


# ---------------------------------------------------------------- the monitor
@dataclasses.dataclass
class _Slot:
    """Mutable per-instance bookkeeping; only the monitor's event loop touches it, except the
    two request fields (see ``requests_lock``)."""

    instance: Instance
    record: Record
    scanner: LogScanner
    proc: ProcessInfo | None = None
    seen_identity: tuple[int, float, ProcessState] | None = None
    task: asyncio.Task[None] | None = None
    next_due: float = 0.0
    hung: str = ""
    restart_requested: str = ""
    action_done_at: float = 0.0
    # hung and restart_requested are also written from other threads (report_hung from a job
    # thread, request_restart from the API): set and read-and-clear them under this lock only.
    requests_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def take_requests(self) -> tuple[str, str]:
        """(hung, restart_requested), cleared atomically: a report arriving meanwhile is kept."""
        with self.requests_lock:
            hung, self.hung = self.hung, ""
            requested, self.restart_requested = self.restart_requested, ""
        return hung, requested


class Monitor:
    """Watches every planned instance. Implements :class:`orchestrator.core.instances.InstanceDirectory`.

    Args:
        settings: the effective settings.
        plan: the applied machine plan.
        supervisor_factory: builds a supervisord client with the given RPC timeout (seconds).
        backend_factory: opens the GPU telemetry backend (default: :func:`gpu.open_backend`).
        clock: monotonic seconds (decisions); wall: epoch seconds (what the API shows).
        transport: an httpx transport for the probes (tests).
    """

    def __init__(
        self,
        settings: Settings,
        plan: MachinePlan,
        *,
        supervisor_factory: Callable[[float], SupervisorLike] | None = None,
        backend_factory: Callable[[], GpuBackend] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        from orchestrator.machine.gpu import open_backend
        from orchestrator.machine.supervisor import Supervisor
        from orchestrator.monitor.probes import LogScanner

        self.settings = settings
        self.plan = plan
        self.cfg = HealthConfig.from_settings(settings)
        layout = Layout(settings.root)
        self._supervisor_factory: Callable[[float], SupervisorLike] = supervisor_factory or (
            lambda timeout: Supervisor(layout, timeout=timeout)
        )
        self._clock = clock
        self._wall = wall
        self._transport = transport
        self.tick = min(settings.probe_interval, MAX_TICK)
        now = clock()
        self._slots = {
            inst.index: _Slot(inst, Record.initial(now), LogScanner(inst.log_file)) for inst in plan.instances
        }
        self.sampler = GpuSampler(
            backend_factory or (lambda: open_backend(settings)),
            [inst.gpu for inst in plan.instances],
            settings.gpu_sample_interval,
            wall,
        )
        # Own thread pools: a restart's stop (up to STOP_TIMEOUT) must never hold up the poll of
        # supervisord or a log scan, as it would in asyncio's small shared default executor.
        self._poll_pool = ThreadPoolExecutor(1, thread_name_prefix="supervisord-poll")
        self._scan_pool = ThreadPoolExecutor(2, thread_name_prefix="log-scan")
        self._action_pool = ThreadPoolExecutor(max(2, len(self._slots)), thread_name_prefix="supervisord-action")
        self._poller: SupervisorLike | None = None
        self._poll_task: asyncio.Future[list[ProcessInfo]] | None = None
        self._poll_sent = 0.0
        self._polled_at = 0.0
        self._supervisord_ok = False
        self._supervisord_error = "no answer yet"
        self._last_poll: float | None = None
        self._client: httpx.AsyncClient | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._inflight: Callable[[], Mapping[int, int]] | None = None
        self.on_loop_failure: Callable[[], None] | None = None  # serve: exit, supervisord restarts us

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start probing and sampling (call from the event loop that serves the API)."""
        import httpx

        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        limits = httpx.Limits(max_connections=4 * len(self._slots) + 4, max_keepalive_connections=0)
        # Plain HTTP to 127.0.0.1 only: no proxies from the environment, no CA bundle to load.
        self._client = httpx.AsyncClient(
            transport=self._transport, limits=limits, trust_env=False, verify=False  # noqa: S501
        )
        self.sampler.start()
        # One round before serving (uvicorn listens after startup): /healthz and /readyz are
        # right from the first request, e.g. after supervisord restarted the monitor.
        await self.tick_once()
        first = [s.task for s in self._slots.values() if s.task is not None]
        if first:
            await asyncio.wait(first, timeout=self.settings.probe_timeout + 1.0)
        self._loop_task = asyncio.create_task(self._run(), name="monitor")
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

    @staticmethod
    def _check_done(task: asyncio.Task[None]) -> None:
        # An unexpected error in one probe is logged; the instance is probed again next tick.
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %r", task.get_name(), task.exception())

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.remove_done_callback(self._loop_done)
        tasks = [t for t in (self._loop_task, *(s.task for s in self._slots.values())) if t is not None]
        for task in tasks:
            task.cancel()
        # Failures were logged by the done callbacks; closing must not raise them again.
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        for pool in (self._poll_pool, self._scan_pool, self._action_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.sampler.stop)

    def set_inflight(self, inflight: Callable[[], Mapping[int, int]]) -> None:
        """Jobs in flight per GPU index (from the job manager), for ``READYZ_SATURATION``."""
        self._inflight = inflight

    # ------------------------------------------------------------ the loop
    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            started = self._clock()
            try:
                await self.tick_once()
            except (OrchestratorError, OSError, RuntimeError, ValueError):
                log.exception("monitor tick failed")
            wait = max(0.0, self.tick - (self._clock() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def tick_once(self) -> None:
        """Poll supervisord and start the probes that are due (tests drive this directly)."""
        procs = await self._poll_supervisor()
        # A table requested before our last restart finished may still show the old process.
        polled_at = self._polled_at if procs is not None else self._clock()
        for slot in self._slots.values():
            proc = None
            if procs is not None:
                proc = procs.get(slot.instance.name) or _unknown(slot.instance.name, self._wall())
                slot.proc = proc
            if slot.task is not None and not slot.task.done():
                continue
            if not self._due(slot, proc, self._clock(), known=procs is not None):
                continue
            slot.task = asyncio.create_task(
                self._check(slot, proc, polled_at),
                name=f"probe-{slot.instance.name}",
            )
            slot.task.add_done_callback(self._check_done)

    def _due(self, slot: _Slot, proc: ProcessInfo | None, now: float, *, known: bool) -> bool:
        if slot.hung or slot.restart_requested or now >= slot.next_due:
            return True
        if known and proc is not None:
            identity = (proc.pid, proc.start, proc.state)
            if identity != slot.seen_identity:
                return True  # crashed, restarted or stopped since the last look: decide now
            if proc.state is ProcessState.RUNNING and process_stopped(proc.pid):
                return True  # SIGSTOPped: each probe fails at once, no need to wait PROBE_INTERVAL
        return False

    async def _poll_supervisor(self) -> dict[str, ProcessInfo] | None:
        """supervisord's process table, or None when it does not answer within the probe timeout.

        ``self._polled_at`` is when the poll was sent: the table is at least that recent.
        """
        if self._poll_task is None or self._poll_task.done():
            if self._poller is None:
                self._poller = self._supervisor_factory(self.settings.probe_timeout)
            self._poll_sent = self._clock()
            loop = asyncio.get_running_loop()
            self._poll_task = loop.run_in_executor(self._poll_pool, self._poller.processes)
        done, _ = await asyncio.wait({self._poll_task}, timeout=self.settings.probe_timeout)
        if not done:
            # Slow, not gone: no decisions this tick; liveness fails only if it stays silent.
            log.debug("supervisord did not answer within %gs", self.settings.probe_timeout)
            return None
        try:
            procs = self._poll_task.result()
        except SupervisorError as exc:
            self._set_supervisord(False, str(exc))
            return None
        self._set_supervisord(True, "")
        self._last_poll = self._clock()
        self._polled_at = self._poll_sent
        return {p.name: p for p in procs}

    def _set_supervisord(self, ok: bool, why: str) -> None:
        if ok != self._supervisord_ok:
            if ok:
                log.info("supervisord answers")
            else:
                log.warning("supervisord: %s", why)
        self._supervisord_ok = ok
        self._supervisord_error = why

    async def _check(self, slot: _Slot, proc: ProcessInfo | None, polled_at: float) -> None:
        """Probe one instance, decide, act. Runs as the instance's only task in flight."""
        inst = slot.instance
        if proc is not None and polled_at < slot.action_done_at:
            return  # this process table predates our last action: wait for a fresh one
        started = self._clock()
        probe = await self._probe(slot, proc)
        hung, requested = slot.take_requests()
        now = self._clock()
        decision = health.decide(
            slot.record, proc, probe, now, self.cfg, hung=hung, restart_requested=requested
        )
        self._apply(slot, decision)
        if proc is not None:
            slot.seen_identity = (proc.pid, proc.start, proc.state)
        for action in decision.actions:
            error = await self._act(inst, action)
            self._apply(slot, health.after_action(slot.record, action, error, self._clock()))
            slot.action_done_at = self._clock()
        # Probes start every PROBE_INTERVAL, however long a (timed-out) probe took.
        # After a failed probe the next comes at once (a tick later): a hung instance is restarted
        # after UNHEALTHY_THRESHOLD probe timeouts, not that many PROBE_INTERVALs.
        fast = slot.record.state in _FAST_STATES or bool(decision.actions) or slot.record.failures > 0
        slot.next_due = started + (self.tick if fast else self.settings.probe_interval)

    async def _probe(self, slot: _Slot, proc: ProcessInfo | None) -> ProbeResult:
        from orchestrator.monitor.probes import probe_http

        logs = await asyncio.get_running_loop().run_in_executor(self._scan_pool, slot.scanner.scan)
        if proc is not None and proc.state not in _PROBING:
            return ProbeResult(ok=False, error=f"supervisord reports {proc.state.name}", logs=logs)
        if proc is not None and process_stopped(proc.pid):
            return ProbeResult(ok=False, error=f"process {proc.pid} is stopped (SIGSTOP): it cannot answer", logs=logs)
        assert self._client is not None
        result = await probe_http(
            self._client, slot.instance.port, slot.instance.gpu,
            mock=self.plan.mock, timeout=self.settings.probe_timeout, clock=self._clock,
        )
        return dataclasses.replace(result, logs=logs)

    def _apply(self, slot: _Slot, decision: Decision) -> None:
        name = slot.instance.name
        for t in decision.transitions:
            level = logging.WARNING if t.new in _LOUD_STATES else logging.INFO
            log.log(level, "%s: %s -> %s: %s", name, t.old.value, t.new.value, t.reason)
        for event in decision.events:
            log.warning("%s: %s", name, event)
        slot.record = decision.record

    async def _act(self, inst: Instance, action: Action) -> str:
        """Carry out one action; returns "" on success, else a one-line error."""
        if action is Action.FREE:
            from orchestrator.monitor.probes import free_memory

            assert self._client is not None
            return await free_memory(self._client, inst.port, self.settings.probe_timeout)
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._action_pool, self._supervisor_action, inst.name, action)
        except SupervisorError as exc:
            log.error("%s: %s failed: %s", inst.name, action.value, exc)
            return str(exc)
        return ""

    def _supervisor_action(self, name: str, action: Action) -> None:
        # A client of its own: a stop waits up to STOP_TIMEOUT and must not hold up the poller.
        sup = self._supervisor_factory(self.settings.stop_timeout + 30)
        if action is Action.RESTART:
            # A SIGSTOPped process would leave SIGTERM pending until stopwaitsecs ran out.
            with contextlib.suppress(SupervisorError):
                sup.signal(name, "CONT")
            sup.stop(name, wait=True)
        sup.start(name, wait=False)

    # ------------------------------------------------------------ commands from outside
    def _slot(self, gpu: int) -> _Slot:
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

    # ------------------------------------------------------------ views (never block)
    def _status(self, slot: _Slot) -> InstanceStatus:
        rec, proc, inst = slot.record, slot.proc, slot.instance
        now, wall = self._clock(), self._wall()

        def epoch(t: float | None) -> float | None:
            return None if t is None else wall - (now - t)

        running = proc is not None and proc.state in _PROBING and proc.pid > 0
        state, reason = rec.state, rec.reason
        if running and proc is not None and rec.state is InstanceState.READY and proc.pid != rec.pid:
            # supervisord already shows a new process the state machine has not judged yet:
            # never report READY next to a process that is still starting.
            state, reason = InstanceState.STARTING, f"new process {proc.pid} not probed yet"
        return InstanceStatus(
            gpu=inst.index,
            name=inst.name,
            port=inst.port,
            state=state,
            reason=self.settings.redact(reason),
            since=wall - (now - rec.since),
            process_state=proc.state.name if proc is not None else ProcessState.UNKNOWN.name,
            pid=proc.pid if running and proc is not None else None,
            start_time=proc.start if running and proc is not None and proc.start else None,
            uptime=proc.uptime if running and proc is not None else None,
            restarts=rec.restarts,
            failed_custom_nodes=rec.failed_nodes,
            queue_pending=rec.queue_pending,
            queue_running=rec.queue_running,
            last_probe=epoch(rec.last_probe),
            probe_duration=rec.probe_duration,
            device=rec.device,
            comfyui_version=rec.comfyui_version,
        )

    def instance_statuses(self) -> list[InstanceStatus]:
        return [self._status(s) for s in self._slots.values()]

    def instance_status(self, gpu: int) -> InstanceStatus:
        return self._status(self._slot(gpu))

    def gpu_statuses(self) -> list[GpuStatus]:
        return self.sampler.statuses()

    def snapshot(self) -> list[InstanceView]:
        return [
            InstanceView(
                index=s.instance.index, name=s.instance.name, port=s.instance.port, state=s.record.state,
                queue_pending=s.record.queue_pending or 0, queue_running=s.record.queue_running or 0,
            )
            for s in self._slots.values()
        ]

    def readiness(self) -> Readiness:
        inflight: Mapping[int, int] = {}
        if self._inflight is not None and self.settings.readyz_saturation:
            inflight = self._inflight()
        return health.readiness(
            self.instance_statuses(),
            self.settings.min_ready_instances,
            saturation=self.settings.readyz_saturation,
            max_queue_depth=self.settings.max_queue_depth,
            inflight=inflight,
        )

    def liveness(self) -> Liveness:
        now = self._clock()
        age = None if self._last_poll is None else now - self._last_poll
        running = self._loop_task is not None and not self._loop_task.done()
        # One slow answer on a busy machine is not "supervisord is gone"; this long a silence is.
        stale = max(5.0, 3 * self.settings.probe_timeout) + self.tick
        if not running:
            return Liveness(False, self._supervisord_ok, age, "the probe loop is not running")
        if not self._supervisord_ok:
            return Liveness(False, False, age, f"supervisord does not answer: {self._supervisord_error}")
        if age is None or age > stale:
            return Liveness(False, False, age, f"no answer from supervisord for {stale:g}s")
        return Liveness(True, True, age, "ok")

    @property
    def supervisord_ok(self) -> bool:
        return self._supervisord_ok


# ---------------------------------------------------------------- serve
def load_plan(layout: Layout) -> MachinePlan:
    """The plan `orchestrator up` applied. Raises OrchestratorError when there is none."""
    from orchestrator.machine.state import applied_plan

    plan = applied_plan(layout)
    if plan is None:
        raise OrchestratorError(f"no readable plan at {layout.plan_file}: run `orchestrator up` first")
    return plan


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for the HTTP server; a busy port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when
    # the socket says it is TCP. Without it a response written as headers + body waits for a
    # delayed ACK (~40 ms per request on a keep-alive connection).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise OrchestratorError(
            f"the monitor cannot listen on {host}:{port} ({exc.strerror or exc}): "
            "set ORCHESTRATOR_PORT to a free port or ORCHESTRATOR_LISTEN to a local address"
        ) from None
    sock.set_inheritable(True)
    return sock


def _job_manager(settings: Settings, monitor: Monitor, registry: Any) -> tuple[Any, APIRouter] | None:
    """The job API, when orchestrator.jobs.service is installed."""
    try:
        jobs = importlib.import_module("orchestrator.jobs.service")
    except ModuleNotFoundError as exc:
        if exc.name != "orchestrator.jobs.service":
            raise
        log.info("orchestrator.jobs.service is not available: serving without the job API")
        return None
    manager = jobs.JobManager(settings, monitor, registry)
    monitor.set_inflight(manager.inflight)
    router: APIRouter = jobs.jobs_router(manager)
    return manager, router


def build_app(
    settings: Settings, plan: MachinePlan, monitor: Monitor | None = None
) -> tuple[FastAPI, Monitor]:
    """The monitor, its metrics registry, the job manager and the FastAPI app, wired together."""
    from orchestrator.monitor.api import create_app
    from orchestrator.monitor.metrics import build_registry

    layout = Layout(settings.root)
    monitor = monitor or Monitor(settings, plan)
    registry = build_registry(monitor, settings, layout)
    jobs = _job_manager(settings, monitor, registry)
    manager = jobs[0] if jobs else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await monitor.start()
        if manager is not None:
            await manager.start()
        try:
            yield
        finally:
            if manager is not None:
                await manager.close()
            await monitor.close()

    app = create_app(monitor, settings, registry, routers=[jobs[1]] if jobs else [], lifespan=lifespan)
    return app, monitor


async def serve(settings: Settings, plan: MachinePlan, sock: socket.socket) -> None:
    """Run the monitor and its HTTP API on ``sock`` until SIGTERM/SIGINT."""
    import uvicorn

    app, monitor = build_app(settings, plan)
    # A dead probe loop must not leave a monitor that serves stale answers: stop, and let
    # supervisord start a fresh one.
    monitor.on_loop_failure = lambda: os.kill(os.getpid(), signal.SIGTERM)
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
        server_header=False, ws="none",  # no WebSocket routes: do not load a WebSocket stack
    )
    server = uvicorn.Server(config)
    await server.serve(sockets=[sock])


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from orchestrator.monitor.api import check_listen

    check_listen(settings)
    # The monitor process owns its exposition: no `*_created` companion series (noise on dashboards).
    import prometheus_client

    prometheus_client.disable_created_metrics()
    plan = load_plan(Layout(settings.root))
    sock = bind_socket(settings.orchestrator_listen, settings.orchestrator_port)
    log.info("monitor listening on http://%s:%d", settings.orchestrator_listen, settings.orchestrator_port)
    try:
        asyncio.run(serve(settings, plan, sock))
    finally:
        sock.close()
    return 0


# ---------------------------------------------------------------- health (the CLI probe)
def local_host(listen: str) -> str:
    """Where a local client reaches a server listening on ``listen``."""
    if listen in {"0.0.0.0", ""}:
        return "127.0.0.1"
    if listen in {"::", "[::]"}:
        return "[::1]"
    return f"[{listen}]" if ":" in listen and not listen.startswith("[") else listen


def check_health(settings: Settings, *, live: bool, timeout: float = 0.9) -> tuple[bool, str]:
    """GET /readyz (or /healthz) on the local monitor; (ok, one line)."""
    import json

    path = "/healthz" if live else "/readyz"
    url = f"http://{local_host(settings.orchestrator_listen)}:{settings.orchestrator_port}{path}"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=timeout) as resp:  # noqa: S310 - a fixed http:// URL
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"monitor not answering at {url}: {reason}"
    try:
        data = json.loads(body)
        detail = str(data.get("reason", "")) if isinstance(data, dict) else ""
    except ValueError:
        detail = ""
    word = ("alive" if live else "ready") if status == 200 else ("not alive" if live else "not ready")
    return status == 200, settings.redact(f"{word}: {detail}" if detail else f"{word} (HTTP {status})")


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    ok, line = check_health(settings, live=bool(getattr(args, "live", False)))
    print(line)
    return 0 if ok else 1
