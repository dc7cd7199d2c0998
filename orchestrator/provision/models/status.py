"""The models status file: progress of the running (or last) sync, and its Prometheus gauges.

Progress goes to ``Layout.models_status_file`` (rewritten at most about once a second, never
holding a token) through :class:`StatusWriter`, the engine's progress sink; ``models status``
reads it with :func:`read_status` and :class:`DownloadsCollector` turns it into gauges.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

from orchestrator.core.layout import Layout
from orchestrator.machine.fs import read_json, write_json
from orchestrator.machine.state import pid_alive
from orchestrator.provision.models.tasks import DownloadResult, DownloadTask

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0  # seconds between status-file rewrites during downloads
STALE_AFTER = 15.0  # seconds: a status not rewritten for this long has no live throughput


class FailedEntry(Protocol):
    """A manifest entry that failed before it became a download (e.g. its repo listing)."""

    @property
    def name(self) -> str: ...

    @property
    def dest(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def error(self) -> str: ...


class ByteBar(Protocol):
    """A progress bar over the bytes of the whole sync (the CLI draws one on a terminal)."""

    def reset(self, total: int, done: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def close(self) -> None: ...


class StatusWriter:
    """A :class:`~.tasks.ProgressSink` that keeps the status file (and an optional bar) current."""

    def __init__(
        self,
        path: Path,
        *,
        tier: str,
        bar: ByteBar | None = None,
        clock: Callable[[], float] = time.time,
        interval: float = STATUS_INTERVAL,
    ) -> None:
        self.path = path
        self.tier = tier
        self.clock = clock
        self.interval = interval
        self._lock = threading.Lock()
        self._files: dict[str, dict[str, Any]] = {}
        self._received = 0
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._last_write = 0.0
        self._started = clock()
        self._running = True
        self._bar = bar
        self._write_failed = False

    def begin(self, tasks: Sequence[DownloadTask], failed: Iterable[FailedEntry] = ()) -> None:
        with self._lock:
            for task in tasks:
                self._files[task.key] = {
                    "name": task.name, "dest": str(task.dest_dir), "source": task.source,
                    "state": "queued", "bytes_done": 0, "bytes_total": task.size, "error": "",
                }
            for item in failed:
                self._files[f"failed:{item.name}"] = {
                    "name": item.name, "dest": item.dest, "source": item.source, "state": "failed",
                    "bytes_done": 0, "bytes_total": None, "error": item.error,
                }
            self._write(force=True)

    # ProgressSink
    def started(self, task: DownloadTask, total: int | None, offset: int) -> None:
        with self._lock:
            entry = self._entry(task)
            entry.update(state="downloading", bytes_done=offset, bytes_total=total)
            if self._bar is not None:
                self._bar.reset(self._sum("bytes_total"), self._sum("bytes_done"))
            self._write()

    def advanced(self, task: DownloadTask, nbytes: int) -> None:
        with self._lock:
            self._entry(task)["bytes_done"] += nbytes
            self._received += nbytes
            if self._bar is not None:
                self._bar.advance(nbytes)
            self._write()

    def finished(self, result: DownloadResult) -> None:
        with self._lock:
            entry = self._entry(result.task)
            entry["state"] = result.state
            entry["error"] = result.error
            if result.path is not None:
                entry["name"] = result.task.name if result.task.filename else result.path.name
                try:
                    size = result.path.stat().st_size
                except OSError:
                    size = entry["bytes_done"]
                entry["bytes_done"] = entry["bytes_total"] = size
            self._write(force=result.state == "failed")

    def close(self) -> None:
        with self._lock:
            self._running = False
            self._write(force=True)
            if self._bar is not None:
                self._bar.close()

    # internals (called with the lock held)
    def _entry(self, task: DownloadTask) -> dict[str, Any]:
        return self._files.setdefault(task.key, {
            "name": task.name, "dest": str(task.dest_dir), "source": task.source, "state": "queued",
            "bytes_done": 0, "bytes_total": task.size, "error": "",
        })

    def _sum(self, field: str) -> int:
        return sum(int(f[field] or 0) for f in self._files.values())

    def _throughput(self, now: float) -> float:
        self._samples.append((now, self._received))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        return (self._received - b0) / (now - t0) if now > t0 else 0.0

    def snapshot(self, now: float) -> dict[str, Any]:
        files = list(self._files.values())
        states = [f["state"] for f in files]
        return {
            "updated": now,
            "started": self._started,
            "running": self._running,
            "pid": os.getpid(),
            "tier": self.tier,
            "files_total": len(files),
            "files_done": sum(s in ("downloaded", "skipped", "verified") for s in states),
            "files_failed": states.count("failed"),
            "bytes_total": self._sum("bytes_total"),
            "bytes_done": self._sum("bytes_done"),
            "throughput_bytes_per_second": round(self._throughput(now), 1) if self._running else 0.0,
            "files": files,
        }

    def _write(self, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_write < self.interval:
            return
        self._last_write = now
        # Rewritten every second while files stream: atomic against a kill, not worth an fsync.
        # A hint only: a full disk must not fail the download that is filling it.
        try:
            write_json(self.path, self.snapshot(now), durable=False)
        except OSError as exc:
            if not self._write_failed:
                log.warning("cannot write the models status file %s: %s; retrying on the next update",
                            self.path, exc.strerror or exc)
            self._write_failed = True
        else:
            self._write_failed = False


def read_status(layout: Layout) -> dict[str, Any] | None:
    """The last sync's status; a run whose process is gone is marked ``interrupted``."""
    data = read_json(layout.models_status_file)
    if not isinstance(data, dict):
        return None
    if data.get("running") and not pid_alive(data.get("pid")):
        data["running"] = False
        data["interrupted"] = True
        data["throughput_bytes_per_second"] = 0.0
    return data




class DownloadsCollector:
    """Prometheus gauges from the status file, read on each scrape (cheap; no network)."""

    def __init__(self, layout: Layout, clock: Callable[[], float] = time.time) -> None:
        self.layout = layout
        self.clock = clock

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("orchestrator_download_bytes", "Model download bytes, total and done",
                              labels=["kind"]),
            GaugeMetricFamily("orchestrator_download_files", "Model files by state (total, done, failed)",
                              labels=["state"]),
            GaugeMetricFamily("orchestrator_download_throughput_bytes_per_second",
                              "Current model download throughput"),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        status: Mapping[str, Any] = read_status(self.layout) or {}
        size, files, rate = self._families()
        size.add_metric(["total"], float(status.get("bytes_total") or 0))
        size.add_metric(["done"], float(status.get("bytes_done") or 0))
        files.add_metric(["total"], float(status.get("files_total") or 0))
        files.add_metric(["done"], float(status.get("files_done") or 0))
        files.add_metric(["failed"], float(status.get("files_failed") or 0))
        fresh = status.get("running") and self.clock() - float(status.get("updated") or 0) < STALE_AFTER
        rate.add_metric([], float(status.get("throughput_bytes_per_second") or 0) if fresh else 0.0)
        yield from (size, files, rate)
