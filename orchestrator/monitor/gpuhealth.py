"""GPU fault events in the monitor: listen, keep each GPU's health, hand verdicts to the monitor.

:class:`GpuFaultWatch` opens the backend's event listener (``machine.nvml_events``), folds each
event into that GPU's :class:`~orchestrator.core.gpufaults.GpuHealth` (pure, in ``core``) and
calls ``on_verdict`` for the events that need an action: restart the GPU's instance (an
application Xid) or fence the GPU (any other critical Xid). The monitor does the acting
(:meth:`~orchestrator.monitor.loop.Monitor.gpu_verdict`). Events arrive on the listener's
thread; the health map is replaced whole under a lock, so readers never wait on NVML.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence

from orchestrator.core.errors import GpuError, SupervisorError
from orchestrator.core.gpufaults import GpuEvent, GpuHealth, Verdict, describe_xid
from orchestrator.core.gpus import Gpu
from orchestrator.machine.gpu import GpuBackend
from orchestrator.machine.nvml_events import EventListener, open_listener
from orchestrator.monitor.slots import Slot
from orchestrator.monitor.supervision import SupervisorFactory

log = logging.getLogger(__name__)

OnVerdict = Callable[[int, Verdict, str], None]  # GPU index, verdict, reason


class GpuFaultWatch:
    """Listens for GPU fault events and keeps each GPU's health.

    Args:
        gpus: the GPUs this machine runs instances on.
        backend_factory: opens a GPU backend (the listener keeps it open until :meth:`stop`).
    """

    def __init__(self, gpus: Sequence[Gpu], backend_factory: Callable[[], GpuBackend]) -> None:
        self._gpus = list(gpus)
        self._factory = backend_factory
        self._lock = threading.Lock()
        self._health: dict[int, GpuHealth] = {g.index: GpuHealth() for g in self._gpus}
        self._listener: EventListener | None = None
        self._backend: GpuBackend | None = None
        self._on_verdict: OnVerdict = lambda _i, _v, _r: None

    def start(self, on_verdict: OnVerdict) -> None:
        """Register for events (blocks on NVML briefly: call it from a thread)."""
        self._on_verdict = on_verdict
        why = ""
        listening: Mapping[int, str] = {}
        try:
            self._backend = self._factory()
            listener = open_listener(self._backend, self._gpus)
            if listener is None:
                why = "this GPU backend has no fault events"
            else:
                listening = listener.start(self._event)
                self._listener = listener
        except GpuError as exc:
            why = str(exc)
        with self._lock:
            for g in self._gpus:
                error = listening.get(g.index, why or "not registered")
                old = self._health[g.index]
                self._health[g.index] = dataclasses.replace(old, listening=not error, listen_error=error)
                if error:
                    log.warning("GPU %d: no fault events (%s)", g.index, error)

    def stop(self, timeout: float = 5.0) -> None:
        if self._listener is not None:
            self._listener.stop(timeout)
            self._listener = None
        if self._backend is not None:
            with contextlib.suppress(GpuError, OSError):
                self._backend.close()
            self._backend = None

    def _event(self, event: GpuEvent) -> None:
        """One event from the listener's thread: update the health, then hand over the verdict."""
        targets = [event.index] if event.index is not None else [g.index for g in self._gpus]
        verdicts: list[tuple[int, Verdict, str]] = []
        with self._lock:
            health = dict(self._health)
            for index in targets:
                if index not in health:
                    continue  # a GPU this machine does not run instances on
                health[index], verdict = health[index].apply(event)
                what = describe_xid(event.xid) if event.xid else event.kind.value
                log.warning("GPU %d: %s -> %s", index, what, verdict.value)
                if verdict is not Verdict.COUNT:
                    verdicts.append((index, verdict, health[index].reason or f"application error {what}"))
            self._health = health
        for index, verdict, reason in verdicts:
            self._on_verdict(index, verdict, reason)

    def health(self) -> dict[int, GpuHealth]:
        """Each GPU's health by index (a snapshot)."""
        return self._health

    def failed(self, index: int) -> str:
        """Why GPU ``index`` is failed, "" when it is not."""
        h = self._health.get(index)
        return f"GPU {index} failed: {h.reason}" if h is not None and h.failed else ""


async def stop_fenced(slot: Slot, factory: SupervisorFactory, stop_timeout: float, reason: str) -> None:
    """Stop the instance of a failed GPU through supervisord (the probe loop no longer acts on it).

    A check already in flight finishes first, so a restart it started cannot undo the stop.
    """
    log.error("GPU %d failed (%s): no more jobs to it; stopping %s", slot.instance.index, reason, slot.instance.name)
    if slot.task is not None and not slot.task.done():
        await asyncio.wait([slot.task])
    name = slot.instance.name

    def stop() -> None:
        sup = factory(stop_timeout + 30)
        with contextlib.suppress(SupervisorError):
            sup.signal(name, "CONT")  # a SIGSTOPped process would hold SIGTERM until stopwaitsecs
        sup.stop(name, wait=True)

    try:
        await asyncio.to_thread(stop)
    except SupervisorError as exc:
        log.error("%s: stopping the instance of a failed GPU failed: %s", name, exc)  # noqa: TRY400
