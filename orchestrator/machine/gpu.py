"""GPU detection and telemetry behind one small seam.

``GpuBackend`` has two implementations: :class:`NvmlBackend` (nvidia-ml-py, imported as
``pynvml``) and :class:`MockBackend` (``MOCK_GPU=1``). :func:`open_backend` is the one place
that chooses. NVML errors come in two tiers: init failure is fatal with a hint; a field a GPU
does not support is omitted from that GPU's sample, and a lost GPU marks only that GPU failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from orchestrator.core.errors import ConfigError, GpuError
from orchestrator.core.gpufaults import EventKind, GpuEvent
from orchestrator.core.gpus import Gpu, GpuSample
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings

log = logging.getLogger(__name__)

MOCK_EVENTS_FILE = "mock_gpu_events.jsonl"  # in the state dir: faults a MOCK_GPU=1 monitor reports


class GpuBackend(Protocol):
    def list_gpus(self) -> list[Gpu]: ...

    def sample(self, gpus: Sequence[Gpu]) -> list[GpuSample]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- mock
class MockBackend:
    """k CPU "GPUs" with stable fake UUIDs (``MOCK_GPU=1``).

    ``events`` is its fault-event queue: :meth:`push_event` stands in for the driver reporting
    an Xid or ECC error, and the monitor's listener (``machine.nvml_events``) reads it, and the
    JSON lines appended to ``events_file`` (``{"gpu": 1, "xid": 79}``) while it listens.
    """

    def __init__(self, count: int, memory_total: int, events_file: Path | None = None) -> None:
        self.count = count
        self.memory_total = memory_total
        self.events: queue.Queue[GpuEvent] = queue.Queue()
        self.events_file = events_file

    def push_event(self, index: int | None, xid: int = 0, kind: EventKind = EventKind.XID) -> None:
        """Report a fault on GPU ``index`` (None: NVML could not say which) as NVML would."""
        self.events.put(GpuEvent(kind, index, xid))

    @staticmethod
    def mock_uuid(index: int) -> str:
        digest = hashlib.sha256(f"mock-gpu-{index}".encode()).hexdigest()
        return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"

    def list_gpus(self) -> list[Gpu]:
        return [
            Gpu(
                index=i,
                uuid=self.mock_uuid(i),
                pci_bus_id=f"00000000:{i + 1:02X}:00.0",
                name="Mock GPU (CPU)",
                memory_total=self.memory_total,
                driver_version="mock",
                mock=True,
            )
            for i in range(self.count)
        ]

    def sample(self, gpus: Sequence[Gpu]) -> list[GpuSample]:
        return [
            GpuSample(
                index=g.index,
                uuid=g.uuid,
                utilization=0.0,
                memory_used=0,
                memory_free=g.memory_total,
                temperature=30.0,
                power=0.0,
                sm_clock=0.0,
                memory_clock=0.0,
            )
            for g in gpus
        ]

    def close(self) -> None:
        return None


# ---------------------------------------------------------------- NVML
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """NVML through nvidia-ml-py. Init is lazy, idempotent and locked; ``close`` shuts down."""

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._initialised = False
        self._handles: dict[str, Any] = {}

    def lib(self) -> Any:
        """The initialised pynvml module (initialised on first use)."""
        with self._lock:
            if self._nvml is None:
                try:
                    import pynvml
                except ImportError as exc:  # pragma: no cover - dependency of the package
                    raise GpuError(
                        f"no NVIDIA driver found (NVML: {exc}); set MOCK_GPU=1 to run CPU instances"
                    ) from None
                self._nvml = pynvml
            if not self._initialised:
                try:
                    self._nvml.nvmlInit()
                except self._nvml.NVMLError as exc:
                    raise GpuError(
                        f"no NVIDIA driver found (NVML: {exc}); set MOCK_GPU=1 to run CPU instances"
                    ) from None
                self._initialised = True
            return self._nvml

    def list_gpus(self) -> list[Gpu]:
        nvml = self.lib()
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
            count = nvml.nvmlDeviceGetCount()
            gpus = []
            for i in range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                self._handles[uuid] = handle
                gpus.append(
                    Gpu(
                        index=i,
                        uuid=uuid,
                        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        memory_total=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                        driver_version=driver,
                    )
                )
        except nvml.NVMLError as exc:
            raise GpuError(f"NVML failed while listing GPUs: {exc}") from None
        return gpus

    def handle(self, uuid: str) -> Any:
        """The NVML handle of the GPU ``uuid`` (raises NVMLError)."""
        nvml = self.lib()
        handle = self._handles.get(uuid) or nvml.nvmlDeviceGetHandleByUUID(uuid)
        self._handles[uuid] = handle
        return handle

    def sample(self, gpus: Sequence[Gpu]) -> list[GpuSample]:
        nvml = self.lib()
        return [self._sample_one(nvml, g) for g in gpus]

    def _sample_one(self, nvml: Any, gpu: Gpu) -> GpuSample:
        lost = {getattr(nvml, "NVML_ERROR_GPU_IS_LOST", 15), getattr(nvml, "NVML_ERROR_UNKNOWN", 999)}
        try:
            handle = self._handles.get(gpu.uuid) or nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
            self._handles[gpu.uuid] = handle
        except nvml.NVMLError as exc:
            return GpuSample(index=gpu.index, uuid=gpu.uuid, failed=True, error=str(exc))
        values: dict[str, Any] = {}

        def read(field: str, fn: Any) -> None:
            try:
                values[field] = fn()
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) in lost:
                    raise
                # NotSupported and friends: this field alone is "not available".
            except AttributeError:
                pass  # an nvidia-ml-py without this call: not available either

        try:
            read("utilization", lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                values["memory_used"] = int(mem.used)
                values["memory_free"] = int(mem.free)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) in lost:
                    raise
            read(
                "temperature",
                lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            )
            read("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            read("sm_clock", lambda: float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)))
            read("memory_clock", lambda: float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)))
            for field, fn in health_readers(nvml, handle):
                read(field, fn)
            remapped = _optional(nvml, lost, lambda: nvml.nvmlDeviceGetRemappedRows(handle))
            if remapped is not None:
                values["remapped_rows_correctable"] = int(remapped[0])
                values["remapped_rows_uncorrectable"] = int(remapped[1])
                values["row_remap_failure"] = 1 if remapped[3] else 0
            procs = _optional(nvml, lost, lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle))
            if procs is not None:
                values["processes"] = tuple((int(p.pid), int(p.usedGpuMemory or 0)) for p in procs)
        except nvml.NVMLError as exc:
            self._handles.pop(gpu.uuid, None)
            return GpuSample(index=gpu.index, uuid=gpu.uuid, failed=True, error=str(exc))
        return GpuSample(index=gpu.index, uuid=gpu.uuid, **values)

    def close(self) -> None:
        with self._lock:
            if self._initialised and self._nvml is not None:
                with contextlib.suppress(self._nvml.NVMLError):
                    self._nvml.nvmlShutdown()
                self._initialised = False


def _optional(nvml: Any, lost: set[int], fn: Any) -> Any:
    """``fn()``, or None when NVML does not support it on this GPU (a lost GPU still raises)."""
    try:
        return fn()
    except nvml.NVMLError as exc:
        if getattr(exc, "value", None) in lost:
            raise
        return None
    except AttributeError:  # an nvidia-ml-py without this call
        return None


def _memory_temperature(nvml: Any, handle: Any) -> float:
    """HBM temperature: a field value (NVML_FI_DEV_MEMORY_TEMP); raises NVMLError when not reported."""
    value = nvml.nvmlDeviceGetFieldValues(handle, [getattr(nvml, "NVML_FI_DEV_MEMORY_TEMP", 82)])[0]
    if int(value.nvmlReturn) != 0:
        raise nvml.NVMLError(int(value.nvmlReturn))
    return float(value.value.uiVal)


def health_readers(nvml: Any, handle: Any) -> list[tuple[str, Any]]:
    """The dcgm-exporter health fields as (GpuSample field, reader); each reader may raise NVMLError."""
    corrected = getattr(nvml, "NVML_MEMORY_ERROR_TYPE_CORRECTED", 0)
    uncorrected = getattr(nvml, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1)
    volatile = getattr(nvml, "NVML_VOLATILE_ECC", 0)
    aggregate = getattr(nvml, "NVML_AGGREGATE_ECC", 1)

    def ecc(kind: int, counter: int) -> Any:
        return lambda: int(nvml.nvmlDeviceGetTotalEccErrors(handle, kind, counter))

    def violation(policy: int) -> Any:  # NVML counts nanoseconds; dcgm-exporter shows microseconds
        return lambda: nvml.nvmlDeviceGetViolationStatus(handle, policy).violationTime / 1000.0

    def throttle() -> int:  # renamed in nvidia-ml-py 12.535; an older one has only the first name
        fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        return int((fn or nvml.nvmlDeviceGetCurrentClocksThrottleReasons)(handle))

    return [
        ("total_energy", lambda: int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))),
        ("memory_temperature", lambda: _memory_temperature(nvml, handle)),
        ("pcie_replay", lambda: int(nvml.nvmlDeviceGetPcieReplayCounter(handle))),
        ("ecc_sbe_volatile", ecc(corrected, volatile)),
        ("ecc_dbe_volatile", ecc(uncorrected, volatile)),
        ("ecc_sbe_aggregate", ecc(corrected, aggregate)),
        ("ecc_dbe_aggregate", ecc(uncorrected, aggregate)),
        ("power_violation", violation(getattr(nvml, "NVML_PERF_POLICY_POWER", 0))),
        ("thermal_violation", violation(getattr(nvml, "NVML_PERF_POLICY_THERMAL", 1))),
        ("throttle_reasons", throttle),
    ]


# ---------------------------------------------------------------- choosing and selecting
def open_backend(settings: Settings, nvml: ModuleType | None = None) -> GpuBackend:
    """The one place that picks the backend.

    ``MOCK_GPU=1`` → mock; ``MOCK_GPU=0`` → NVML, failing loudly without a driver;
    ``MOCK_GPU=auto`` → NVML, or one mock GPU (with a warning) when there is no driver.
    """
    events = Layout(settings.root).state_dir / MOCK_EVENTS_FILE
    if settings.mock_gpu == "1":
        return MockBackend(settings.num_gpus or 1, settings.mock_gpu_memory_mb * 1024 * 1024, events)
    backend = NvmlBackend(nvml)
    if settings.mock_gpu == "auto":
        try:
            backend.list_gpus()
        except GpuError as exc:
            log.warning("%s; MOCK_GPU=auto: running %d CPU instance(s)", exc, settings.num_gpus or 1)
            return MockBackend(settings.num_gpus or 1, settings.mock_gpu_memory_mb * 1024 * 1024, events)
    return backend


def select_gpus(all_gpus: Sequence[Gpu], settings: Settings) -> list[Gpu]:
    """Apply ``GPUS`` (indices or UUIDs) and the ``NUM_GPUS`` cap.

    Raises:
        ConfigError: a selected index or UUID does not exist.
    """
    chosen: list[Gpu]
    if settings.gpus:
        by_index = {str(g.index): g for g in all_gpus}
        by_uuid = {g.uuid.lower(): g for g in all_gpus}
        chosen = []
        for token in settings.gpus:
            gpu = by_index.get(token) or by_uuid.get(token.lower())
            if gpu is None:
                known = ", ".join(str(g.index) for g in all_gpus) or "none"
                raise ConfigError(f"invalid GPUS: no GPU {token!r} on this machine (indices: {known})")
            if gpu not in chosen:
                chosen.append(gpu)
        chosen.sort(key=lambda g: g.index)
    else:
        chosen = list(all_gpus)
    if settings.num_gpus is not None and not settings.mock:
        chosen = chosen[: settings.num_gpus]
    if not chosen:
        raise GpuError("no GPUs found; set MOCK_GPU=1 to run CPU instances")
    return chosen


def detect(settings: Settings, backend: GpuBackend | None = None) -> list[Gpu]:
    """Detect and select the GPUs this machine runs instances on."""
    backend = backend or open_backend(settings)
    try:
        return select_gpus(backend.list_gpus(), settings)
    finally:
        backend.close()
