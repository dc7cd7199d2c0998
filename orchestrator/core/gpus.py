"""GPU values: what detection found (:class:`Gpu`) and one telemetry reading (:class:`GpuSample`).

Pure values shared by the plan, the health decisions and the metrics; reading them from NVML
is :mod:`orchestrator.machine.gpu`'s job.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU as NVML (or the mock) reports it."""

    index: int
    uuid: str
    pci_bus_id: str
    name: str
    memory_total: int  # bytes
    driver_version: str
    mock: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GpuSample:
    """One telemetry reading; a field is None when the GPU does not support it."""

    index: int
    uuid: str
    failed: bool = False
    error: str = ""
    utilization: float | None = None  # percent
    memory_used: int | None = None  # bytes
    memory_free: int | None = None  # bytes
    temperature: float | None = None  # degrees Celsius
    power: float | None = None  # watts
    sm_clock: float | None = None  # MHz
    memory_clock: float | None = None  # MHz

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
