"""The monitor's GPU and memory collectors: dcgm-exporter's GPU gauges (names, units and labels
as dcgm-exporter exports them, so NVIDIA's Grafana dashboards work unchanged; a field the GPU does
not support is omitted, never 0) and each instance's memory and recycles.

Like every collector of the monitor they build fresh families on each scrape from cached state
(the GPU sampler's latest sample, the memory watch's report): a scrape never waits on NVML.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.core.errors import ConfigError
from orchestrator.core.readiness import GpuStatus, InstanceStatus
from orchestrator.monitor.collectors import INSTANCE_LABELS, StatusSource, instance_labels
from orchestrator.monitor.recycle import MemoryReport

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MIB = 1024 * 1024
# (metric name, help, GpuSample field, scale)
DCGM_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "utilization", 1.0),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "memory_used", 1.0 / MIB),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "memory_free", 1.0 / MIB),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "temperature", 1.0),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "power", 1.0),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "sm_clock", 1.0),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", "memory_clock", 1.0),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Total energy consumption since boot (in mJ).", "total_energy", 1.0),
    ("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", "memory_temperature", 1.0),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "Total number of PCIe retries.", "pcie_replay", 1.0),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors.", "ecc_sbe_volatile", 1.0),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors.", "ecc_dbe_volatile", 1.0),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "Total number of single-bit persistent ECC errors.", "ecc_sbe_aggregate", 1.0),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "Total number of double-bit persistent ECC errors.", "ecc_dbe_aggregate", 1.0),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for correctable errors.",
     "remapped_rows_correctable", 1.0),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for uncorrectable errors.",
     "remapped_rows_uncorrectable", 1.0),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed.", "row_remap_failure", 1.0),
    ("DCGM_FI_DEV_POWER_VIOLATION", "Throttling duration due to power constraints (in us).", "power_violation", 1.0),
    ("DCGM_FI_DEV_THERMAL_VIOLATION", "Throttling duration due to thermal constraints (in us).",
     "thermal_violation", 1.0),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "Current clock throttle reasons (bitmask of NVML's reasons).",
     "throttle_reasons", 1.0),
)

DRIVER_LABEL = "DCGM_FI_DRIVER_VERSION"  # dcgm-exporter's driver version label


def gpu_label_names(host_label: str, model_label: str) -> tuple[str, ...]:
    """The dcgm-exporter label set. Raises ConfigError for an unusable label name."""
    names = ("gpu", "UUID", "pci_bus_id", "device", DRIVER_LABEL)
    for env, value in (("GPU_METRICS_HOST_LABEL", host_label), ("GPU_METRICS_MODEL_LABEL", model_label)):
        if not _LABEL_NAME.match(value) or value.startswith("__"):
            raise ConfigError(f"invalid {env}={value!r}: expected a Prometheus label name such as Hostname")
        if value in names:
            raise ConfigError(f"invalid {env}={value!r}: that label already exists on the GPU gauges")
    if host_label == model_label:
        raise ConfigError("GPU_METRICS_HOST_LABEL and GPU_METRICS_MODEL_LABEL must differ")
    return (*names[:4], model_label, host_label, DRIVER_LABEL)


class GpuCollector(Collector):
    """dcgm-exporter style gauges from the GPU sampler's latest sample."""

    def __init__(
        self, source: StatusSource, host_label: str, hostname: str, model_label: str = "model_name"
    ) -> None:
        self.source = source
        self.hostname = hostname
        self.label_names = gpu_label_names(host_label, model_label)

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self.source.gpu_statuses())

    def _families(self, statuses: Sequence[GpuStatus]) -> Iterator[Metric]:
        names = self.label_names
        families = [GaugeMetricFamily(name, text, labels=names) for name, text, _, _ in DCGM_GAUGES]
        failed = GaugeMetricFamily(
            "orchestrator_gpu_failed",
            "1 when the GPU failed: reason xid_<N> (a critical Xid: no jobs are routed to it, its instance is "
            "stopped) or lost (telemetry found it lost or failing)",
            labels=(*self.label_names, "reason"),
        )
        xid = GaugeMetricFamily(
            "DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", labels=self.label_names
        )
        for st in statuses:
            g = st.gpu
            labels = [str(g.index), g.uuid, g.pci_bus_id, f"nvidia{g.index}", g.name, self.hostname,
                      g.driver_version]
            health = st.health
            if health is not None and health.listening:  # without the listener the field is unknown: omit
                xid.add_metric(labels, float(health.last_xid or 0))
            sample = st.sample
            fenced = health is not None and health.failed
            if sample is None and not fenced:
                continue
            reason = health.failed_reason_label if health is not None and fenced else ""
            lost = sample is not None and sample.failed
            failed.add_metric([*labels, reason or ("lost" if lost else "")], 1.0 if fenced or lost else 0.0)
            if sample is None or sample.failed:
                continue
            for family, (_, _, field, scale) in zip(families, DCGM_GAUGES, strict=True):
                value = getattr(sample, field)
                if value is not None:  # not supported on this GPU: omit, never 0
                    scaled = round(float(value) * scale, 3) if scale != 1.0 else float(value)
                    family.add_metric(labels, scaled)
        yield from families
        yield failed
        yield xid


@runtime_checkable
class MemorySource(Protocol):
    """The monitor's instance memory (``monitor.recycle``)."""

    def instance_statuses(self) -> list[InstanceStatus]: ...

    def memory_report(self) -> MemoryReport: ...


class MemoryCollector(Collector):
    """``comfyui_instance_memory_*``, ``comfyui_instance_gpu_memory_used_bytes`` and the recycles."""

    def __init__(self, source: MemorySource) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return list(self._families([], MemoryReport({}, None, {})))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self.source.instance_statuses(), self.source.memory_report())

    @staticmethod
    def _families(statuses: Sequence[InstanceStatus], report: MemoryReport) -> Iterator[Metric]:
        rss = GaugeMetricFamily(
            "comfyui_instance_memory_rss_bytes", "Resident memory of the instance's process tree (last sample)",
            labels=INSTANCE_LABELS,
        )
        vram = GaugeMetricFamily(
            "comfyui_instance_gpu_memory_used_bytes",
            "GPU memory NVML attributes to the instance's processes (omitted where NVML cannot list them)",
            labels=INSTANCE_LABELS,
        )
        budget = GaugeMetricFamily(
            "comfyui_instance_memory_budget_bytes", "The instance's host-RAM budget (INSTANCE_MEMORY_MAX)",
            labels=INSTANCE_LABELS,
        )
        recycles = CounterMetricFamily(
            "comfyui_instance_recycles",
            "Instances drained and restarted: memory (past the budget's high-water mark), growth "
            "(INSTANCE_MEMORY_GROWTH_MAX), jobs (RECYCLE_AFTER_JOBS)",
            labels=(*INSTANCE_LABELS, "reason"),
        )
        for s in statuses:
            values = instance_labels(s)
            mem = report.samples.get(s.gpu)
            if mem is not None:
                rss.add_metric(values, float(mem.rss))
                if mem.vram is not None:
                    vram.add_metric(values, float(mem.vram))
            if report.budget:
                budget.add_metric(values, float(report.budget))
            for reason in ("memory", "growth", "jobs"):
                recycles.add_metric([*values, reason], float(report.recycles.get((s.gpu, reason), 0)))
        yield from (rss, vram, budget, recycles)


