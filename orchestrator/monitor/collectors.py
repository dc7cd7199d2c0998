"""The monitor's Prometheus collectors: instances, the machine's load and provisioning (GPUs and
memory: ``monitor.gpu_collectors``).

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
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator import __version__
from orchestrator.core.layout import Layout
from orchestrator.core.readiness import GpuStatus, InstanceStatus
from orchestrator.core.scaling import MachineLoad
from orchestrator.core.states import InstanceState
from orchestrator.machine.fs import read_json
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


def instance_labels(s: InstanceStatus) -> list[str]:
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
            values = instance_labels(s)
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
