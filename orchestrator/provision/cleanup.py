"""Output cleanup: delete old files from every instance's output and temp folders.

Every ``CLEANUP_INTERVAL`` (default 15 min) files older than ``OUTPUT_MAX_AGE`` (default 60 min,
by modification time) are deleted, then folders left empty are removed (a folder is only removed
when it too is older than the cutoff, so a folder ComfyUI just created for a save is left alone).
The folders themselves (``output/``, ``temp/``) stay. ``OUTPUT_MAX_AGE=0`` turns cleanup off.

It runs as ``orchestrator cleanup`` (a supervisord program: ``orchestrator.cli.models``) or inside
the monitor with :func:`run_loop`; totals go to ``Layout.cleanup_status_file`` and :class:`CleanupCollector`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine.fs import read_json, write_json
from orchestrator.machine.state import applied_plan

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CleanupResult:
    """One pass."""

    dirs: tuple[Path, ...]  # the output/temp folders scanned
    files_deleted: int
    bytes_freed: int  # bytes of the deleted files
    dirs_removed: int
    errors: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dirs": [str(d) for d in self.dirs],
            "files_deleted": self.files_deleted,
            "bytes_freed": self.bytes_freed,
            "dirs_removed": self.dirs_removed,
            "errors": list(self.errors),
            "seconds": round(self.seconds, 3),
        }


def cleanup_dirs(layout: Layout) -> tuple[Path, ...]:
    """Each instance's output and temp folders: from the applied plan, else by globbing $ROOT."""
    plan = applied_plan(layout)
    if plan is not None:
        return tuple(d for inst in plan.instances for d in (inst.output_dir, inst.temp_dir))
    if layout.plan_file.exists():
        log.warning("cannot read %s; cleaning $ROOT/comfyui_gpu*/ instead", layout.plan_file)
    dirs: list[Path] = []
    for inst in sorted(layout.root.glob("comfyui_gpu*")):
        dirs.extend(d for d in (inst / "output", inst / "temp") if d.is_dir())
    return tuple(dirs)


def clean_dir(top: Path, cutoff: float) -> tuple[int, int, int, list[str]]:
    """Delete files under ``top`` last modified before ``cutoff`` (epoch seconds).

    Symlinks are removed as links and never followed. Returns (files, bytes, folders, errors).
    """
    files = freed = removed = 0
    errors: list[str] = []
    dir_mtimes: dict[str, float] = {}
    old_files: list[tuple[str, int]] = []

    def onerror(exc: OSError) -> None:
        errors.append(f"{exc.filename}: {exc.strerror}")

    # Pass 1: look only; folder times are read before anything inside them changes.
    for dirpath, dirnames, filenames in os.walk(top, onerror=onerror):
        try:
            dir_mtimes[dirpath] = os.lstat(dirpath).st_mtime
        except OSError as exc:
            onerror(exc)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError as exc:
                onerror(exc)
                continue
            if st.st_mtime < cutoff:
                old_files.append((path, st.st_size if stat.S_ISREG(st.st_mode) else 0))
    for path, size in old_files:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            onerror(exc)
            continue
        files += 1
        freed += size
    # Pass 2: deepest folders first, never ``top`` itself.
    for dirpath in sorted(dir_mtimes, key=lambda d: d.count(os.sep), reverse=True):
        if dirpath == str(top) or dir_mtimes[dirpath] >= cutoff:
            continue
        try:
            os.rmdir(dirpath)
            removed += 1
        except OSError:
            pass  # not empty (a new file, or a young subfolder): keep it
    return files, freed, removed, errors


def cleanup_once(settings: Settings, layout: Layout, *, now: float | None = None) -> CleanupResult:
    """One pass over every instance's output and temp folders; adds to the status file's totals."""
    start = time.monotonic()
    now = time.time() if now is None else now
    dirs = cleanup_dirs(layout)
    cutoff = now - settings.output_max_age
    files = freed = removed = 0
    errors: list[str] = []
    for top in dirs:
        if not top.is_dir():
            continue
        f, b, r, e = clean_dir(top, cutoff)
        files, freed, removed = files + f, freed + b, removed + r
        errors.extend(e)
    for err in errors[:10]:
        log.warning("cleanup: %s", err)
    result = CleanupResult(dirs, files, freed, removed, tuple(errors), time.monotonic() - start)
    _add_to_status(layout, result, now)
    if files or removed:
        log.info("cleanup: deleted %d files (%d bytes) and %d empty folders", files, freed, removed)
    return result


def _add_to_status(layout: Layout, result: CleanupResult, now: float) -> None:
    status = read_status(layout)
    write_json(layout.cleanup_status_file, {
        "runs_total": status["runs_total"] + 1,
        "files_deleted_total": status["files_deleted_total"] + result.files_deleted,
        "bytes_freed_total": status["bytes_freed_total"] + result.bytes_freed,
        "last_run": {"time": now, **result.to_dict()},
    })


def read_status(layout: Layout) -> dict[str, Any]:
    data = read_json(layout.cleanup_status_file, {})
    data = data if isinstance(data, dict) else {}
    out: dict[str, Any] = {}
    for key in ("runs_total", "files_deleted_total", "bytes_freed_total"):
        value = data.get(key, 0)
        out[key] = value if isinstance(value, int) and value >= 0 else 0
    out["last_run"] = data.get("last_run")
    return out


def run_loop(
    settings: Settings,
    layout: Layout,
    stop: threading.Event,
    *,
    on_result: Callable[[CleanupResult], None] | None = None,
) -> None:
    """A pass now, then one every ``CLEANUP_INTERVAL`` until ``stop`` is set (for the monitor too)."""
    while not stop.is_set():
        try:
            result = cleanup_once(settings, layout)
        except OSError as exc:
            log.warning("cleanup pass failed: %s", exc)
        else:
            if on_result is not None:
                on_result(result)
        stop.wait(settings.cleanup_interval)


class CleanupCollector:
    """Counters from the cleanup status file, read on each scrape."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily("orchestrator_cleanup_bytes_freed", "Bytes of old outputs deleted"),
            CounterMetricFamily("orchestrator_cleanup_files_deleted", "Old output files deleted"),
            CounterMetricFamily("orchestrator_cleanup_runs", "Cleanup passes run"),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        status = read_status(self.layout)
        freed, deleted, runs = self._families()
        freed.add_metric([], float(status["bytes_freed_total"]))
        deleted.add_metric([], float(status["files_deleted_total"]))
        runs.add_metric([], float(status["runs_total"]))
        yield from (freed, deleted, runs)
