"""Output cleanup: delete old files from every instance's output and temp folders.

Every ``CLEANUP_INTERVAL`` (default 15 min) files older than ``OUTPUT_MAX_AGE`` (default 60 min,
by modification time) are deleted, then folders left empty are removed (a folder is only removed
when it too is older than the cutoff, so a folder ComfyUI just created for a save is left alone).
The folders themselves (``output/``, ``temp/``) stay. ``OUTPUT_MAX_AGE=0`` turns cleanup off.

The disk floor: besides age, whenever free space on ROOT's filesystem is below ``MIN_FREE_DISK``
(checked every 30 s, or every CLEANUP_INTERVAL when shorter), the oldest output and temp files are
deleted first until it is not. Files of running jobs are never taken: nothing modified after the
oldest unfinished job in the job journal was accepted (``$ROOT/.orchestrator/jobs``), nor in the
last ``FLOOR_GRACE_SECONDS``. If that is not enough, one line says how far below the floor it stays.

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
    floor_files_deleted: int = 0  # of files_deleted: taken to keep MIN_FREE_DISK free
    floor_bytes_freed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dirs": [str(d) for d in self.dirs],
            "files_deleted": self.files_deleted,
            "bytes_freed": self.bytes_freed,
            "dirs_removed": self.dirs_removed,
            "errors": list(self.errors),
            "seconds": round(self.seconds, 3),
            "floor_files_deleted": self.floor_files_deleted,
            "floor_bytes_freed": self.floor_bytes_freed,
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


FLOOR_GRACE_SECONDS = 60.0  # the disk floor never takes a file younger than this
FLOOR_CHECK_SECONDS = 30.0  # how often the floor is checked between age passes
_FINAL = {"success", "error", "timeout"}
Statvfs = Callable[[Path], "os.statvfs_result"]


def oldest_unfinished_job(layout: Layout) -> float | None:
    """When the oldest job still in flight was accepted (unix time), from the job journal."""
    oldest: float | None = None
    for path in layout.jobs_dir.glob("*.json"):
        record = read_json(path, {})
        response = record.get("response") if isinstance(record, dict) else None
        if not isinstance(response, dict) or response.get("status") in _FINAL:
            continue
        created = response.get("created_at")
        if isinstance(created, int | float):
            oldest = created if oldest is None else min(oldest, created)
    return oldest


def below_floor(settings: Settings, layout: Layout, statvfs: Statvfs = os.statvfs) -> int:
    """Bytes missing to MIN_FREE_DISK on ROOT's filesystem (0: enough is free)."""
    st = statvfs(layout.root)
    floor = settings.min_free_disk.bytes_for(st.f_blocks * st.f_frsize)
    return max(0, floor - st.f_bavail * st.f_frsize)


def free_to_floor(
    settings: Settings, layout: Layout, dirs: tuple[Path, ...], *, now: float, statvfs: Statvfs = os.statvfs
) -> tuple[int, int, list[str]]:
    """Delete the oldest files under ``dirs`` until MIN_FREE_DISK is free; (files, bytes, errors)."""
    missing = below_floor(settings, layout, statvfs)
    if missing <= 0:
        return 0, 0, []
    protect_from = now - FLOOR_GRACE_SECONDS
    running = oldest_unfinished_job(layout)
    if running is not None:
        protect_from = min(protect_from, running)
    candidates: list[tuple[float, str, int]] = []
    for top in dirs:
        for dirpath, _dirnames, filenames in os.walk(top):
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_mtime < protect_from:
                    candidates.append((st.st_mtime, path, st.st_size))
    files = freed = 0
    errors: list[str] = []
    for _mtime, path, size in sorted(candidates):
        if freed >= missing:
            break
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror}")
            continue
        files, freed = files + 1, freed + size
    if freed < missing:
        log.warning("cleanup: %s is %d bytes below MIN_FREE_DISK=%s after deleting %d old outputs; "
                    "free space on it or lower MIN_FREE_DISK", layout.root, missing - freed,
                    settings.min_free_disk, files)
    elif files:
        log.info("cleanup: deleted the %d oldest outputs (%d bytes) to keep MIN_FREE_DISK=%s free",
                 files, freed, settings.min_free_disk)
    return files, freed, errors


def cleanup_once(
    settings: Settings, layout: Layout, *, now: float | None = None, by_age: bool = True,
    statvfs: Statvfs = os.statvfs,
) -> CleanupResult:
    """One pass over every instance's output and temp folders (by age unless ``by_age`` is False,
    then the disk floor); adds to the status file's totals."""
    start = time.monotonic()
    now = time.time() if now is None else now
    dirs = cleanup_dirs(layout)
    cutoff = now - settings.output_max_age
    files = freed = removed = 0
    errors: list[str] = []
    for top in dirs if by_age and settings.output_max_age > 0 else ():
        if not top.is_dir():
            continue
        f, b, r, e = clean_dir(top, cutoff)
        files, freed, removed = files + f, freed + b, removed + r
        errors.extend(e)
    try:
        floor_files, floor_bytes, floor_errors = free_to_floor(
            settings, layout, tuple(d for d in dirs if d.is_dir()), now=now, statvfs=statvfs
        )
    except OSError as exc:
        floor_files, floor_bytes, floor_errors = 0, 0, [f"{layout.root}: {exc.strerror}"]
    errors.extend(floor_errors)
    for err in errors[:10]:
        log.warning("cleanup: %s", err)
    result = CleanupResult(dirs, files + floor_files, freed + floor_bytes, removed, tuple(errors),
                           time.monotonic() - start, floor_files, floor_bytes)
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
        "floor_files_deleted_total": status["floor_files_deleted_total"] + result.floor_files_deleted,
        "floor_bytes_freed_total": status["floor_bytes_freed_total"] + result.floor_bytes_freed,
        "last_run": {"time": now, **result.to_dict()},
    })


def read_status(layout: Layout) -> dict[str, Any]:
    data = read_json(layout.cleanup_status_file, {})
    data = data if isinstance(data, dict) else {}
    out: dict[str, Any] = {}
    for key in ("runs_total", "files_deleted_total", "bytes_freed_total", "floor_files_deleted_total",
                "floor_bytes_freed_total"):
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
    """A pass now, then one by age every ``CLEANUP_INTERVAL`` and a disk-floor check every
    ``FLOOR_CHECK_SECONDS`` (or CLEANUP_INTERVAL when shorter), until ``stop`` is set."""
    next_by_age = time.monotonic()
    while not stop.is_set():
        by_age = time.monotonic() >= next_by_age
        if by_age:
            next_by_age = time.monotonic() + settings.cleanup_interval
        try:
            result = cleanup_once(settings, layout, by_age=by_age)
        except OSError as exc:
            log.warning("cleanup pass failed: %s", exc)
        else:
            if on_result is not None:
                on_result(result)
        stop.wait(min(settings.cleanup_interval, FLOOR_CHECK_SECONDS))


class CleanupCollector:
    """Counters from the cleanup status file, read on each scrape."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def _families(self) -> tuple[CounterMetricFamily, ...]:
        return (
            CounterMetricFamily("orchestrator_cleanup_bytes_freed", "Bytes of old outputs deleted"),
            CounterMetricFamily("orchestrator_cleanup_files_deleted", "Old output files deleted"),
            CounterMetricFamily("orchestrator_cleanup_runs", "Cleanup passes run"),
            CounterMetricFamily("orchestrator_cleanup_floor_bytes_freed",
                                "Of the bytes freed: oldest outputs deleted to keep MIN_FREE_DISK free"),
            CounterMetricFamily("orchestrator_cleanup_floor_files_deleted",
                                "Of the files deleted: oldest outputs deleted to keep MIN_FREE_DISK free"),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        status = read_status(self.layout)
        families = self._families()
        keys = ("bytes_freed_total", "files_deleted_total", "runs_total", "floor_bytes_freed_total",
                "floor_files_deleted_total")
        for family, key in zip(families, keys, strict=True):
            family.add_metric([], float(status[key]))
        yield from families
