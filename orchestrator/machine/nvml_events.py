"""GPU fault events: an NVML event listener, and the mock backend's queue that tests push into.

:class:`NvmlEventListener` registers every GPU for critical Xid errors (and single/double-bit
ECC errors where the GPU supports them) on one NVML event set, then waits on it in a thread of
its own with a short timeout, so :meth:`stop` ends it within that timeout. Each event becomes a
:class:`~orchestrator.core.gpufaults.GpuEvent`; what to do about it is decided in ``core``.
:class:`QueueEventListener` is the same for :class:`~orchestrator.machine.gpu.MockBackend`:
its events come from :meth:`MockBackend.push_event`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from orchestrator.core.errors import GpuError
from orchestrator.core.gpufaults import EventKind, GpuEvent
from orchestrator.core.gpus import Gpu
from orchestrator.machine.gpu import GpuBackend, MockBackend, NvmlBackend

log = logging.getLogger(__name__)

OnEvent = Callable[[GpuEvent], None]
# NVML's event type bits (nvml.h): the same values pynvml names nvmlEventType*.
XID_CRITICAL = 0x8
SINGLE_BIT_ECC = 0x1
DOUBLE_BIT_ECC = 0x2


class EventListener(Protocol):
    def start(self, on_event: OnEvent) -> dict[int, str]:
        """Register and start listening; per GPU index, "" when registered or why not."""
        ...

    def stop(self, timeout: float = 5.0) -> None: ...


class _Thread:
    """The listening thread's start/stop (``_wait_one`` is the subclass's)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_event: OnEvent = lambda _e: None

    def _launch(self, on_event: OnEvent) -> None:
        self._on_event = on_event
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                event = self._wait_one()
                if event is not None:
                    try:
                        self._on_event(event)
                    except Exception:  # one bad handler call must not end listening
                        log.exception("GPU event handler failed for %s", event)
        finally:
            self._release()

    def _wait_one(self) -> GpuEvent | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _release(self) -> None:
        return None

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


class QueueEventListener(_Thread):
    """The mock backend's events: its queue, and the JSON lines appended to its events file."""

    def __init__(
        self, events: queue.Queue[GpuEvent], gpus: Sequence[Gpu], wait: float = 0.2, file: Path | None = None
    ) -> None:
        super().__init__("gpu-events")
        self._events = events
        self._gpus = list(gpus)
        self._wait = wait
        self._file = file
        self._pos = 0

    def start(self, on_event: OnEvent) -> dict[int, str]:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._pos = self._file.stat().st_size  # lines written before we listened are old news
        self._launch(on_event)
        return {g.index: "" for g in self._gpus}

    def _wait_one(self) -> GpuEvent | None:
        try:
            return self._events.get(timeout=self._wait)
        except queue.Empty:
            self._read_file()
            return None

    def _read_file(self) -> None:
        """Queue the complete lines appended to the events file since the last read."""
        if self._file is None:
            return
        try:
            with self._file.open("rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
        except OSError:
            return
        lines = data[: data.rfind(b"\n") + 1]
        self._pos += len(lines)
        for line in lines.splitlines():
            try:
                item = json.loads(line)
                kind = EventKind(item.get("kind", "xid"))
                gpu = item.get("gpu")
                self._events.put(GpuEvent(kind, None if gpu is None else int(gpu), int(item.get("xid", 0))))
            except (ValueError, TypeError, AttributeError):
                log.warning("%s: ignoring %r (expected {\"gpu\": 1, \"xid\": 79})", self._file, line[:200])


class NvmlEventListener(_Thread):
    """Critical Xid and ECC events of ``gpus`` through one NVML event set.

    Args:
        nvml: the initialised pynvml module (the backend keeps NVML initialised meanwhile).
        gpus: the GPUs to register.
        handle: a GPU's NVML handle by UUID.
        wait_ms: how long one ``nvmlEventSetWait`` blocks (bounds how long :meth:`stop` takes).
    """

    def __init__(
        self, nvml: Any, gpus: Sequence[Gpu], handle: Callable[[str], Any], wait_ms: int = 500,
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__("nvml-events")
        self._nvml = nvml
        self._gpus = list(gpus)
        self._handle = handle
        self._wait_ms = wait_ms
        self._wall = wall
        self._set: Any = None
        self._by_uuid = {g.uuid: g.index for g in self._gpus}

    def start(self, on_event: OnEvent) -> dict[int, str]:
        """Register each GPU; listening starts when at least one registered.

        Raises:
            GpuError: NVML cannot create an event set.
        """
        nvml = self._nvml
        try:
            self._set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            raise GpuError(f"NVML cannot create an event set: {exc}") from None
        result = {g.index: self._register(g) for g in self._gpus}
        if any(not why for why in result.values()):
            self._launch(on_event)
        else:
            self._release()
        return result

    def _register(self, gpu: Gpu) -> str:
        nvml = self._nvml
        try:
            handle = self._handle(gpu.uuid)
            try:
                supported = int(nvml.nvmlDeviceGetSupportedEventTypes(handle))
            except nvml.NVMLError:
                supported = XID_CRITICAL
            mask = supported & (XID_CRITICAL | SINGLE_BIT_ECC | DOUBLE_BIT_ECC)
            if not mask & XID_CRITICAL:
                return "this GPU does not report Xid events"
            nvml.nvmlDeviceRegisterEvents(handle, mask, self._set)
        except nvml.NVMLError as exc:
            return f"NVML cannot register events: {exc}"
        return ""

    def _wait_one(self) -> GpuEvent | None:
        nvml = self._nvml
        try:
            data = nvml.nvmlEventSetWait_v2(self._set, self._wait_ms)
        except nvml.NVMLError as exc:
            if getattr(exc, "value", None) != getattr(nvml, "NVML_ERROR_TIMEOUT", 10):
                log.warning("waiting for NVML events failed: %s", exc)
                self._stop.wait(self._wait_ms / 1000)
            return None
        return self._event(data)

    def _event(self, data: Any) -> GpuEvent | None:
        nvml = self._nvml
        index: int | None
        try:
            uuid = nvml.nvmlDeviceGetUUID(data.device)
            index = self._by_uuid.get(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
        except nvml.NVMLError:
            index = None  # NVML could not say which GPU: applies to every one
        etype = int(data.eventType)
        if etype & XID_CRITICAL:
            return GpuEvent(EventKind.XID, index, int(data.eventData), self._wall())
        if etype & DOUBLE_BIT_ECC:
            return GpuEvent(EventKind.ECC_DOUBLE, index, 0, self._wall())
        if etype & SINGLE_BIT_ECC:
            return GpuEvent(EventKind.ECC_SINGLE, index, 0, self._wall())
        return None

    def _release(self) -> None:
        if self._set is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlEventSetFree(self._set)
            self._set = None


def open_listener(backend: GpuBackend, gpus: Sequence[Gpu]) -> EventListener | None:
    """The event listener of ``backend`` (None for a backend that has no events)."""
    if isinstance(backend, MockBackend):
        return QueueEventListener(backend.events, gpus, file=backend.events_file)
    if isinstance(backend, NvmlBackend):
        return NvmlEventListener(backend.lib(), gpus, backend.handle)
    return None
