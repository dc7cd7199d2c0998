"""The monitor's Prometheus collectors: instances, GPUs (dcgm-exporter names) and provisioning.

Every collector builds fresh metric families on each scrape from cached state (the monitor's
latest probe results, the GPU sampler's latest sample, small status files), so a scrape never
waits on NVML or on a hung instance, and an instance that disappears takes its series with it.

Instance metrics carry ``gpu``, ``instance`` (``comfyui_gpu{N}``) and ``port``.
``comfyui_instance_state`` is one series per instance whose value is the state's code
(STOPPED 0, STARTING 1, READY 2, UNHEALTHY 3, RESTARTING 4, BACKOFF 5, FATAL 6, SUSPECT 7) and whose
``state`` label names it, so both ``comfyui_instance_state == 2`` and
``count by (state) (comfyui_instance_state)`` work.

GPU gauges use dcgm-exporter's names, units (MiB, %, °C, W, MHz) and labels (``gpu``, ``UUID``,
``pci_bus_id``, ``device``, the model name label, and the host label named by
``GPU_METRICS_HOST_LABEL``), so NVIDIA's Grafana dashboards work unchanged. dcgm-exporter calls
the model label ``modelName``, which ``promtool check metrics`` rejects as camelCase; the label
is ``GPU_METRICS_MODEL_LABEL`` (default ``model_name``; set ``modelName`` for exact parity).
A field the GPU does not support is omitted, never exported as 0.
"""

from __future__ import annotations

import os
import platform
import re
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator import __version__
from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.readiness import GpuStatus, InstanceStatus
from orchestrator.core.scaling import MachineLoad
from orchestrator.core.states import InstanceState
from orchestrator.machine.fs import read_json
from orchestrator.monitor.recycle import MemoryReport
from orchestrator.provision.repos.state import code_report

INSTANCE_LABELS = ("gpu", "instance", "port")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MIB = 1024 * 1024


class StatusSource(Protocol):
    """What the collectors read (the :class:`~orchestrator.monitor.loop.Monitor`; faked in tests)."""

    def instance_statuses(self) -> list[InstanceStatus]: ...

    def gpu_statuses(self) -> list[GpuStatus]: ...

    @property
    def supervisord_ok(self) -> bool: ...


def _labels(s: InstanceStatus) -> list[str]:
    return [str(s.gpu), s.name, str(s.port)]


class InstanceCollector(Collector):
    """``comfyui_instance_*`` from the monitor's latest view of each instance."""

    def __init__(self, source: StatusSource) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self.source.instance_statuses())
        sup = GaugeMetricFamily("orchestrator_supervisord_up", "1 when supervisord answered the last poll")
        sup.add_metric([], 1.0 if self.source.supervisord_ok else 0.0)
        yield sup

    @staticmethod
    def _families(statuses: Sequence[InstanceStatus]) -> Iterator[Metric]:
        labels = INSTANCE_LABELS
        up = GaugeMetricFamily(
            "comfyui_instance_up", "1 when supervisord reports the instance's process RUNNING", labels=labels
        )
        ready = GaugeMetricFamily(
            "comfyui_instance_ready", "1 when the instance is READY (answers /system_stats on its device)",
            labels=labels,
        )
        state = GaugeMetricFamily(
            "comfyui_instance_state",
            "Instance state code (STOPPED 0, STARTING 1, READY 2, UNHEALTHY 3, RESTARTING 4, BACKOFF 5, "
            "FATAL 6, SUSPECT 7); the state label names it",
            labels=(*labels, "state"),
        )
        stopped = GaugeMetricFamily(
            "comfyui_instance_operator_stopped",
            "1 when an operator stopped the instance (orchestrator stop): not READY on purpose, not a failure",
            labels=labels,
        )
        restarts = CounterMetricFamily(
            "comfyui_instance_restarts", "New processes after the first one (crashes and restarts)",
            labels=INSTANCE_LABELS,
        )
        probe = GaugeMetricFamily(
            "comfyui_instance_probe_duration_seconds", "Duration of the last health probe", labels=labels
        )
        pending = GaugeMetricFamily(
            "comfyui_instance_queue_pending", "Prompts waiting in the instance's queue (last probe)",
            labels=INSTANCE_LABELS,
        )
        running = GaugeMetricFamily(
            "comfyui_instance_queue_running", "Prompts executing on the instance (last probe)", labels=labels
        )
        start = GaugeMetricFamily(
            "comfyui_instance_start_time_seconds", "Start time of the instance's process since the epoch",
            labels=INSTANCE_LABELS,
        )
        failed = GaugeMetricFamily(
            "comfyui_instance_failed_custom_nodes",
            "1 per custom node whose import failed in the instance's latest start",
            labels=(*INSTANCE_LABELS, "node"),
        )
        version = GaugeMetricFamily(
            "comfyui_instance_version_info",
            "The ComfyUI version the instance's process reports in /system_stats (value 1)",
            labels=(*INSTANCE_LABELS, "comfyui_version"),
        )
        generation = GaugeMetricFamily(
            "comfyui_instance_generation_info",
            "The generation the instance's process started with; value 1 when it is the one the last "
            "`up` applied, 0 while it runs an older one",
            labels=(*INSTANCE_LABELS, "generation"),
        )
        draining = GaugeMetricFamily(
            "comfyui_instance_draining", "1 while the instance gets no new jobs (drained for a restart)",
            labels=INSTANCE_LABELS,
        )
        for s in statuses:
            values = _labels(s)
            if s.generation:
                generation.add_metric([*values, s.generation], 1.0 if s.current else 0.0)
            draining.add_metric(values, 1.0 if s.draining else 0.0)
            up.add_metric(values, 1.0 if s.up else 0.0)
            ready.add_metric(values, 1.0 if s.state is InstanceState.READY else 0.0)
            state.add_metric([*values, s.state.value], float(s.state.code))
            on_purpose = s.state is InstanceState.STOPPED and s.process_state == "STOPPED"
            stopped.add_metric(values, 1.0 if on_purpose else 0.0)
            restarts.add_metric(values, float(s.restarts))
            if s.probe_duration is not None:
                probe.add_metric(values, s.probe_duration)
            if s.queue_pending is not None:
                pending.add_metric(values, float(s.queue_pending))
            if s.queue_running is not None:
                running.add_metric(values, float(s.queue_running))
            if s.start_time is not None:
                start.add_metric(values, s.start_time)
            for node in s.failed_custom_nodes:
                failed.add_metric([*values, node], 1.0)
            if s.comfyui_version:
                version.add_metric([*values, s.comfyui_version], 1.0)
        yield from (up, ready, state, stopped, restarts, probe, pending, running, start, failed, version)
        yield from (generation, draining)


# (name, help, MachineLoad field): the autoscaling signals, the numbers GET /scaling answers
MACHINE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("comfyui_machine_jobs_waiting", "Jobs accepted or queued on this machine, not executing yet", "jobs_waiting"),
    ("comfyui_machine_jobs_running", "Jobs executing on this machine (at most one per instance)", "jobs_running"),
    ("comfyui_machine_free_slots", "Jobs this machine would accept now (MAX_QUEUE_DEPTH per READY instance, "
     "less its load; 0 while draining)", "free_slots"),
    ("comfyui_machine_ready_instances", "Instances READY on this machine", "ready_instances"),
    ("comfyui_machine_draining", "1 while the machine drains for shutdown (refuses new jobs)", "draining"),
)


class MachineCollector(Collector):
    """``comfyui_machine_*``: the machine's autoscaling signals (``core.scaling``), read on scrape."""

    def __init__(self, load: Callable[[], MachineLoad]) -> None:
        self.load = load

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(name, text) for name, text, _ in MACHINE_GAUGES]

    def collect(self) -> Iterator[Metric]:
        load = self.load()
        for name, text, field in MACHINE_GAUGES:
            yield GaugeMetricFamily(name, text, value=float(getattr(load, field)))


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
            values = _labels(s)
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


def _redact_url(url: str) -> str:
    """A repository URL without credentials."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return ""
    if parts.username or parts.password:
        host = parts.hostname or ""
        parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
    return urllib.parse.urlunsplit(parts)


class ProvisioningCollector(Collector):
    """``orchestrator_stage_duration_seconds``, ``orchestrator_nodes``, the fallback flag, build info.

    Reads ``status.json`` (written by ``orchestrator up``) again only when its mtime changes.
    """

    def __init__(self, layout: Layout, redact: Callable[[str], str] = lambda s: s) -> None:
        self.path = layout.status_file
        self.comfy_dir = layout.comfy_dir
        self.redact = redact
        self._stamp: tuple[int, int] | None = None
        self._status: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._status = None, {}
            return self._status
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            data = read_json(self.path, {})
            self._status = data if isinstance(data, dict) else {}
            self._stamp = stamp
        return self._status

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        status = self._read()
        if self.comfy_dir.is_dir():
            # What is checked out now, read from the tree: a failed branch switch never shows
            # the branch that was asked for while the old code runs.
            status = {**status, "comfy": code_report(self.comfy_dir, status.get("comfy"))}
        yield from self._families(status)

    def _families(self, status: dict[str, Any]) -> Iterator[Metric]:
        stages = GaugeMetricFamily(
            "orchestrator_stage_duration_seconds", "Duration of each stage of the last `orchestrator up`",
            labels=("stage",),
        )
        for stage, value in sorted((status.get("stages") or {}).items()):
            seconds = value.get("seconds", value.get("duration")) if isinstance(value, dict) else value
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
                stages.add_metric([str(stage)], float(seconds))
        nodes = GaugeMetricFamily(
            "orchestrator_nodes", "Custom nodes by outcome of the last sync", labels=("state",)
        )
        counts = (status.get("nodes") or {}).get("counts") or {}
        for state, count in sorted(counts.items()):
            if isinstance(count, (int, float)) and not isinstance(count, bool):
                nodes.add_metric([str(state)], float(count))
        imports = GaugeMetricFamily(
            "orchestrator_node_import_failed",
            "1 per custom node that failed the import check before the instances started",
            labels=("node", "error"),
        )
        for node, why in sorted(((status.get("nodes") or {}).get("import_failed") or {}).items()):
            imports.add_metric([str(node), self.redact(str(why))[:200]], 1.0)
        comfy = status.get("comfy") or {}
        fallback = GaugeMetricFamily(
            "orchestrator_comfy_fallback",
            "1 when the ComfyUI tree is not what was configured (fallback repository, or another branch)",
        )
        fallback.add_metric([], 1.0 if comfy.get("fallback") else 0.0)
        info = GaugeMetricFamily(
            "orchestrator_build_info", "Orchestrator version and the ComfyUI code it runs (value 1)",
            labels=("version", "python_version", "comfy_repo", "comfy_ref", "comfy_commit", "comfy_fallback",
                    "lock_hash"),
        )
        info.add_metric(
            [
                __version__,
                platform.python_version(),
                self.redact(_redact_url(str(comfy.get("url") or ""))),
                self.redact(str(comfy.get("ref") or "")),
                str(comfy.get("commit") or ""),
                "true" if comfy.get("fallback") else "false",
                str((status.get("lock") or {}).get("hash") or ""),  # the running generation's lock
            ],
            1.0,
        )
        yield from (stages, nodes, imports, fallback, info)
