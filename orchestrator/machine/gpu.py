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
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol

from orchestrator.core.errors import ConfigError, GpuError
from orchestrator.core.gpus import Gpu, GpuSample
from orchestrator.core.settings import Settings

log = logging.getLogger(__name__)


class GpuBackend(Protocol):
    def list_gpus(self) -> list[Gpu]: ...

    def sample(self, gpus: Sequence[Gpu]) -> list[GpuSample]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- mock
class MockBackend:
    """k CPU "GPUs" with stable fake UUIDs (``MOCK_GPU=1``)."""

    def __init__(self, count: int, memory_total: int) -> None:
        self.count = count
        self.memory_total = memory_total

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

    def _lib(self) -> Any:
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
        nvml = self._lib()
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

    def sample(self, gpus: Sequence[Gpu]) -> list[GpuSample]:
        nvml = self._lib()
        return [self._sample_one(nvml, g) for g in gpus]

    def _sample_one(self, nvml: Any, gpu: Gpu) -> GpuSample:
        lost = {getattr(nvml, "NVML_ERROR_GPU_IS_LOST", 15), getattr(nvml, "NVML_ERROR_UNKNOWN", 999)}
        try:
            handle = self._handles.get(gpu.uuid) or nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
            self._handles[gpu.uuid] = handle
        except nvml.NVMLError as exc:
            return GpuSample(index=gpu.index, uuid=gpu.uuid, failed=True, error=str(exc))
        values: dict[str, float | int] = {}

        def read(field: str, fn: Any) -> None:
            try:
                values[field] = fn()
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) in lost:
                    raise
                # NotSupported and friends: this field alone is "not available".

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
        except nvml.NVMLError as exc:
            self._handles.pop(gpu.uuid, None)
            return GpuSample(index=gpu.index, uuid=gpu.uuid, failed=True, error=str(exc))
        return GpuSample(index=gpu.index, uuid=gpu.uuid, **values)  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            if self._initialised and self._nvml is not None:
                with contextlib.suppress(self._nvml.NVMLError):
                    self._nvml.nvmlShutdown()
                self._initialised = False


# ---------------------------------------------------------------- choosing and selecting
def open_backend(settings: Settings, nvml: ModuleType | None = None) -> GpuBackend:
    """The one place that picks the backend.

    ``MOCK_GPU=1`` → mock; ``MOCK_GPU=0`` → NVML, failing loudly without a driver;
    ``MOCK_GPU=auto`` → NVML, or one mock GPU (with a warning) when there is no driver.
    """
    if settings.mock_gpu == "1":
        return MockBackend(settings.num_gpus or 1, settings.mock_gpu_memory_mb * 1024 * 1024)
    backend = NvmlBackend(nvml)
    if settings.mock_gpu == "auto":
        try:
            backend.list_gpus()
        except GpuError as exc:
            log.warning("%s; MOCK_GPU=auto: running %d CPU instance(s)", exc, settings.num_gpus or 1)
            return MockBackend(settings.num_gpus or 1, settings.mock_gpu_memory_mb * 1024 * 1024)
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
