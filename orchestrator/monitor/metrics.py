"""The monitor's metrics registry and its fast text exposition.

:func:`build_registry` puts every collector the monitor exports (:mod:`.collectors`, and the
downloads and cleanup collectors of ``provision``) on a fresh :class:`MonitorRegistry`; the job
manager adds its own metrics to it. :class:`TextRenderer` writes the Prometheus text format
without ``generate_latest``'s per-sample validation; :class:`ExpositionCache` shares one
rendering between the scrapes of a short window (``METRICS_CACHE``).
"""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.utils import floatToGoString

from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.monitor.collectors import InstanceCollector, ProvisioningCollector, StatusSource
from orchestrator.monitor.gpu_collectors import GpuCollector, MemoryCollector, MemorySource
from orchestrator.provision.cleanup import CleanupCollector
from orchestrator.provision.models.status import DownloadsCollector

_go_float = cast("Callable[[float], str]", floatToGoString)  # untyped upstream


class MonitorRegistry(CollectorRegistry):
    """A registry whose exposition has no ``*_created`` companion series (noise on dashboards).

    ``prometheus_client`` adds a ``_created`` sample to every Counter, Histogram and Summary
    unless a process-wide flag turns that off; the monitor drops them here instead, so what it
    exports does not depend on the rest of the process.
    """

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            created = metric.name + "_created"
            if not any(s.name == created for s in metric.samples):
                yield metric
                continue
            trimmed = copy.copy(metric)  # a copy: a collector may yield families it keeps
            trimmed.samples = [s for s in metric.samples if s.name != created]
            yield trimmed


def build_registry(
    source: StatusSource, settings: Settings, layout: Layout, *, hostname: str | None = None
) -> MonitorRegistry:
    """A fresh registry with every collector the monitor exports.

    Raises:
        ConfigError: GPU_METRICS_HOST_LABEL or GPU_METRICS_MODEL_LABEL is not a usable label name.
    """
    registry = MonitorRegistry(auto_describe=False)
    registry.register(InstanceCollector(source))
    if isinstance(source, MemorySource):
        registry.register(MemoryCollector(source))
    if settings.gpu_metrics == "dcgm":
        registry.register(
            GpuCollector(
                source, settings.gpu_metrics_host_label, hostname or socket.gethostname(),
                settings.gpu_metrics_model_label,
            )
        )
    registry.register(ProvisioningCollector(layout, settings.redact))
    registry.register(DownloadsCollector(layout))
    registry.register(CleanupCollector(layout))
    return registry


# ---------------------------------------------------------------- text exposition
_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")


class TextRenderer:
    """The Prometheus text format, byte-identical to ``prometheus_client.generate_latest``.

    ``generate_latest`` validates and escapes every label name of every sample on every
    scrape; here each metric and label name is checked once and remembered, and a label value
    is escaped only when it holds a character that needs it. That keeps a scrape of eight
    instances and eight GPUs around a millisecond.
    """

    MAX_CACHED = 20_000  # label sets remembered (instances, GPUs, nodes, stages: a few hundred)

    def __init__(self) -> None:
        self._names: dict[str, str] = {}
        self._labels: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._label_sets: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}

    def _name(self, name: str) -> str:
        escaped = self._names.get(name)
        if escaped is None:
            escaped = self._names[name] = openmetrics.escape_metric_name(name, openmetrics.UNDERSCORES)
        return escaped

    def _label_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        escaped = self._labels.get(names)
        if escaped is None:
            escaped = self._labels[names] = tuple(
                openmetrics.escape_label_name(k, openmetrics.UNDERSCORES) for k in names
            )
        return escaped

    @staticmethod
    def _value(v: str) -> str:
        if "\\" in v or '"' in v or "\n" in v:
            return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
        return v

    def _label_set(self, labels: dict[str, str]) -> str:
        """``{a="1",b="2"}`` for a sample's labels (sorted by name), remembered per label set."""
        key = (tuple(labels), tuple(labels.values()))
        text = self._label_sets.get(key)
        if text is None:
            keys = tuple(sorted(labels))
            names = self._label_names(keys)
            text = "{" + ",".join(f'{k}="{self._value(labels[raw])}"' for k, raw in zip(names, keys, strict=True))
            text += "}"
            if len(self._label_sets) >= self.MAX_CACHED:
                self._label_sets.clear()
            self._label_sets[key] = text
        return text

    def _line(self, sample: Any) -> str:
        labels = sample.labels
        name = self._name(sample.name)
        value = _go_float(sample.value)
        ts = "" if sample.timestamp is None else f" {int(float(sample.timestamp) * 1000):d}"
        if not labels:
            return f"{name} {value}{ts}\n"
        return f"{name}{self._label_set(labels)} {value}{ts}\n"

    def render(self, registry: CollectorRegistry) -> bytes:
        out: list[str] = []
        for metric in registry.collect():
            mname, mtype = metric.name, metric.type
            if mtype == "counter":
                mname += "_total"
            elif mtype == "info":
                mname += "_info"
            mtype = _TYPES.get(mtype, mtype)
            doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            shown = self._name(mname)
            out.append(f"# HELP {shown} {doc}\n# TYPE {shown} {mtype}\n")
            extra: dict[str, list[str]] = {}
            for sample in metric.samples:
                for suffix in _OM_SUFFIXES:
                    if sample.name == metric.name + suffix:
                        extra.setdefault(suffix, []).append(self._line(sample))
                        break
                else:
                    out.append(self._line(sample))
            for suffix, lines in sorted(extra.items()):
                shown = self._name(metric.name + suffix)
                out.append(f"# HELP {shown} {doc}\n# TYPE {shown} gauge\n")
                out.extend(lines)
        return "".join(out).encode("utf-8")


class ExpositionCache:
    """One rendering of the exposition, served to every scrape for ``max_age`` seconds.

    Under many concurrent scrapers (several Prometheus servers, dashboards, a load balancer
    polling ``/metrics`` by mistake) each scrape would otherwise collect and render everything
    again on the event loop, and the loop would spend its time rendering the same text. Here the
    first scrape after the window renders; the others get its bytes. The render is synchronous
    on the event loop, so scrapes that arrive while it runs wait behind it and then find the
    fresh text: one render per window however many scrapers (single-flight without a lock).
    ``max_age`` 0 renders on every scrape. A render that raises caches nothing.

    Args:
        render: the exposition (e.g. ``lambda: TextRenderer().render(registry)``).
        max_age: seconds one rendering is served, counted from when it started.
        clock: monotonic seconds.
    """

    def __init__(
        self, render: Callable[[], bytes], max_age: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._render = render
        self.max_age = max_age
        self._clock = clock
        self._body: bytes | None = None
        self._at = 0.0
        self.renders = 0  # how many times the exposition was rendered (tests, debugging)

    def get(self) -> bytes:
        now = self._clock()
        if self._body is None or now - self._at >= self.max_age:
            self._body = self._render()
            self._at = now
            self.renders += 1
        return self._body
