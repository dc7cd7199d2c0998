"""The loop's bookkeeping for one instance (:class:`Slot`) and the views it gives out."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable

from orchestrator.core.health import PROBED_STATES, Record
from orchestrator.core.instances import InstanceView
from orchestrator.core.plan import Instance
from orchestrator.core.readiness import InstanceStatus
from orchestrator.core.states import InstanceState, ProcessInfo, ProcessState
from orchestrator.machine.generation import process_generation
from orchestrator.monitor.prober import process_stopped
from orchestrator.monitor.probes import LogScanner

_ANSWERING = frozenset({InstanceState.READY, InstanceState.SUSPECT})


@dataclasses.dataclass(frozen=True)
class DrainMark:
    """An instance taken out of routing (:mod:`orchestrator.monitor.drain`): the process it was
    set on, when, and until when at most (monotonic seconds)."""

    pid: int | None
    since: float
    until: float


@dataclasses.dataclass
class Slot:
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
    drain: DrainMark | None = None  # taken out of routing (monitor.drain)
    _generation: tuple[int, str | None] = (0, None)  # (pid, the generation it started with)

    def generation(self) -> str | None:
        """The generation the running process started with (read once per process, once readable)."""
        pid = self.proc.pid if self.proc is not None and self.proc.pid > 0 else 0
        if pid != self._generation[0] or self._generation[1] is None:  # not readable yet: ask again
            self._generation = (pid, process_generation(pid))
        return self._generation[1]

    def planned_out(self, now: float) -> bool:
        """Drained, or restarting after a drain, until READY on a new process (or the mark expires)."""
        mark, proc = self.drain, self.proc
        if mark is None:
            return False
        if now >= mark.until:
            self.drain = None
            return False
        if proc is not None and proc.pid != mark.pid and self.record.state is InstanceState.READY \
                and self.record.pid == proc.pid:
            self.drain = None  # READY on its new process: back in service
            return False
        return True

    def routing_closed(self, now: float) -> bool:
        """Whether the router must not send new jobs to the current process (it is drained)."""
        mark = self.drain
        return self.planned_out(now) and mark is not None and (self.proc is None or self.proc.pid == mark.pid)

    def take_requests(self) -> tuple[str, str]:
        """(hung, restart_requested), cleared atomically: a report arriving meanwhile is kept."""
        with self.requests_lock:
            hung, self.hung = self.hung, ""
            requested, self.restart_requested = self.restart_requested, ""
        return hung, requested

    def busy(self) -> bool:
        """A check of this instance is in flight (at most one at a time)."""
        return self.task is not None and not self.task.done()

    def due(self, proc: ProcessInfo | None, now: float, *, known: bool) -> bool:
        """Whether to check the instance now; ``known``: supervisord answered this tick."""
        if self.hung or self.restart_requested or now >= self.next_due:
            return True
        if known and proc is not None:
            identity = (proc.pid, proc.start, proc.state)
            if identity != self.seen_identity:
                return True  # crashed, restarted or stopped since the last look: decide now
            if proc.state is ProcessState.RUNNING and process_stopped(proc.pid):
                return True  # SIGSTOPped: each probe fails at once, no need to wait PROBE_INTERVAL
        return False

    def view(self, now: float) -> InstanceView:
        """What the job router needs: state, queue depth, and whether it is drained."""
        rec = self.record
        return InstanceView(
            index=self.instance.index, name=self.instance.name, port=self.instance.port, state=rec.state,
            queue_pending=rec.queue_pending or 0, queue_running=rec.queue_running or 0,
            draining=self.routing_closed(now),
        )

    def status(
        self, now: float, wall: float, redact: Callable[[str], str], current: str | None = None
    ) -> InstanceStatus:
        """The instance as the API and the metrics show it (``now`` monotonic, ``wall`` epoch)."""
        rec, proc, inst = self.record, self.proc, self.instance

        def epoch(t: float | None) -> float | None:
            return None if t is None else wall - (now - t)

        running = proc if proc is not None and proc.state in PROBED_STATES and proc.pid > 0 else None
        state, reason = rec.state, rec.reason
        if running is not None and rec.state in _ANSWERING and running.pid != rec.pid:
            # supervisord already shows a new process the state machine has not judged yet:
            # never report READY next to a process that is still starting.
            state, reason = InstanceState.STARTING, f"new process {running.pid} not probed yet"
        return InstanceStatus(
            gpu=inst.index,
            name=inst.name,
            port=inst.port,
            state=state,
            reason=redact(reason),
            since=wall - (now - rec.since),
            process_state=proc.state.name if proc is not None else ProcessState.UNKNOWN.name,
            pid=running.pid if running is not None else None,
            start_time=running.start if running is not None and running.start else None,
            uptime=running.uptime if running is not None else None,
            restarts=rec.restarts,
            failed_custom_nodes=rec.failed_nodes,
            queue_pending=rec.queue_pending,
            queue_running=rec.queue_running,
            last_probe=epoch(rec.last_probe),
            probe_duration=rec.probe_duration,
            device=rec.device,
            comfyui_version=rec.comfyui_version,
            generation=self.generation() if running is not None else None,
            current_generation=current,
            draining=self.routing_closed(now),
            planned_out=self.planned_out(now),
        )
