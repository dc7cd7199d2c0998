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
    # dcgm-exporter's health fields (None: this GPU or driver does not report it)
    total_energy: int | None = None  # millijoules since the driver loaded
    memory_temperature: float | None = None  # degrees Celsius (HBM)
    pcie_replay: int | None = None  # PCIe replay counter
    ecc_sbe_volatile: int | None = None  # corrected ECC errors since the driver loaded
    ecc_dbe_volatile: int | None = None  # uncorrected ECC errors since the driver loaded
    ecc_sbe_aggregate: int | None = None  # corrected ECC errors over the GPU's life
    ecc_dbe_aggregate: int | None = None  # uncorrected ECC errors over the GPU's life
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_failure: int | None = None  # 1 when a row remapping failed
    power_violation: float | None = None  # microseconds clocks were held down by the power cap
    thermal_violation: float | None = None  # microseconds clocks were held down by temperature
    throttle_reasons: int | None = None  # NVML's clocks event (throttle) reasons bitmask
    processes: tuple[tuple[int, int], ...] | None = None  # (pid, GPU memory bytes) of compute processes

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
