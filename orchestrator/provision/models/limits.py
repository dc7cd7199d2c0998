"""What one download may take: a byte cap, a free-space floor, and when it must stop retrying.

* **Cap**: the manifest's ``size`` when given, else ``MODELS_MAX_BYTES``. A Content-Length above
  it, or a body that goes past it, fails the file at once (the part is thrown away).
* **Floor**: ``MIN_FREE_DISK`` (the smallest of its sizes and percentages of the filesystem). It
  is checked before a download starts (:func:`check_space`: the bytes still to come, the floor and
  what concurrent downloads on the same disk still need, :class:`Reservations`) and before every
  chunk is written, through the
  ``DownloadOptions.disk_free`` seam (statvfs); a write that would go below it, or a full disk
  (ENOSPC), fails the file with one line, and its part is removed.
* **Retries**: :class:`RetryBudget` — at most ``attempts`` failures in a row without progress,
  ``retries`` retries in all and none after ``retry_seconds``, whatever the progress. Progress
  means new bytes past the furthest the part has ever reached (a server that ignores Range and
  dies at the same point makes none).
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from orchestrator.core.errors import ModelError
from orchestrator.provision.models.partfile import Partial
from orchestrator.provision.models.tasks import DownloadOptions, DownloadTask, human

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class Stop(ModelError):
    """The download must stop now and its part be removed (cap or floor)."""


def cap_of(task: DownloadTask, opts: DownloadOptions) -> int:
    return task.size if task.size is not None else opts.max_bytes


def _over_cap(task: DownloadTask, opts: DownloadOptions, what: str) -> Stop:
    if task.size is not None:
        return Stop(
            f"{task.name}: size mismatch: {task.source} {what}, the manifest says {task.size} bytes; "
            "the file was not installed (check size in models.yaml)"
        )
    return Stop(
        f"{task.name}: {task.source} {what}, over the cap of {human(opts.max_bytes)} "
        f"(MODELS_MAX_BYTES={opts.max_bytes}); the file was not installed: raise MODELS_MAX_BYTES "
        "or give this model a size: in models.yaml"
    )


def check_length(task: DownloadTask, opts: DownloadOptions, total: int | None) -> None:
    """A server that announces more than the cap is refused before a byte is written."""
    if total is not None and total > cap_of(task, opts):
        raise _over_cap(task, opts, f"announces {total} bytes")


def floor_of(dest: Path, opts: DownloadOptions) -> int:
    """Bytes that must stay free on ``dest``'s filesystem."""
    if not opts.min_free.sizes and not opts.min_free.percents:
        return 0
    size = opts.disk_size(dest) if opts.min_free.percents else 0
    return opts.min_free.bytes_for(size)


def floor_error(task: DownloadTask, opts: DownloadOptions, free: int, floor: int, *, removed: bool) -> ModelError:
    what = "the partial file was removed" if removed else "nothing was written"
    kind = Stop if removed else ModelError  # (a Stop makes the engine remove the part)
    return kind(
        f"{task.name}: stopped: {human(free)} free in {task.dest_dir}, the floor is {human(floor)} "
        f"(MIN_FREE_DISK={opts.min_free}); {what}; free space or lower MIN_FREE_DISK"
    )


def disk_full_error(task: DownloadTask, opts: DownloadOptions) -> ModelError:
    try:
        free = human(opts.disk_free(task.dest_dir))
    except OSError:
        free = "unknown"
    return Stop(
        f"{task.name}: the disk is full in {task.dest_dir} ({free} free, no space left while writing); "
        f"the partial file was removed; free space or raise MIN_FREE_DISK (now {opts.min_free}) "
        "so downloads stop earlier"
    )


class Guard:
    """Called before each chunk is written: stops a body past the cap or a write past the floor."""

    def __init__(self, task: DownloadTask, opts: DownloadOptions) -> None:
        self.task = task
        self.opts = opts
        self.cap = cap_of(task, opts)
        self.floor = floor_of(task.dest_dir, opts)

    def __call__(self, offset: int, n: int) -> None:
        if offset + n > self.cap:
            raise _over_cap(self.task, self.opts, f"sent more than {self.cap} bytes")
        if self.floor:
            free = self.opts.disk_free(self.task.dest_dir)
            if free - n < self.floor:
                raise floor_error(self.task, self.opts, free, self.floor, removed=True)


class RetryBudget:
    """Counts failed attempts of one file; says when to give up and why."""

    def __init__(self, opts: DownloadOptions) -> None:
        self.opts = opts
        self.started = opts.clock()
        self.failed = 0  # failed attempts in all
        self.in_a_row = 0  # failed attempts in a row without progress
        self.furthest = 0  # the furthest offset the part has reached

    def failure(self, offset: int, received_more: bool) -> None:
        progressed = received_more and offset > self.furthest
        self.furthest = max(self.furthest, offset)
        self.failed += 1
        self.in_a_row = 1 if progressed else self.in_a_row + 1

    def exhausted(self) -> str | None:
        """Why no retry may follow (None: retry)."""
        opts = self.opts
        if self.in_a_row >= opts.attempts:
            return f"after {self.in_a_row} attempts without progress"
        if self.failed > opts.retries:
            return f"after {self.failed} attempts (DOWNLOAD_RETRIES={opts.retries})"
        elapsed = opts.clock() - self.started
        if elapsed >= opts.retry_seconds:
            return f"after {elapsed:.0f} s of attempts (DOWNLOAD_RETRY_SECONDS={opts.retry_seconds:g})"
        return None


class Reservations:
    """Bytes that running downloads still need, per device, for the free-space check."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left: dict[str, tuple[int, int]] = {}  # key → (st_dev, bytes still to come)

    def others(self, key: str, dev: int) -> int:
        with self._lock:
            return sum(left for k, (d, left) in self._left.items() if k != key and d == dev)

    def set(self, key: str, dev: int, left: int) -> None:
        with self._lock:
            self._left[key] = (dev, max(left, 0))

    def drop(self, key: str) -> None:
        with self._lock:
            self._left.pop(key, None)


def check_space(task: DownloadTask, state: Partial, opts: DownloadOptions, reservations: Reservations) -> None:
    """Free space for the bytes still to come + the floor (or margin) + what other downloads still need."""
    floor = floor_of(task.dest_dir, opts)
    free = opts.disk_free(task.dest_dir)
    remaining = (state.total - state.offset) if state.total is not None else None
    if remaining is None:
        if floor and free <= floor:  # (the length is unknown: the stream checks each chunk)
            raise floor_error(task, opts, free, floor, removed=False)
        return
    state.dev = dev = os.stat(task.dest_dir).st_dev
    reservations.set(task.key, dev, remaining)
    others = reservations.others(task.key, dev)
    keep = max(opts.free_space_margin, floor)
    if free < remaining + keep + others:
        extra = f" and {human(others)} for other downloads" if others else ""
        raise ModelError(
            f"{task.name}: not enough disk space in {task.dest_dir}: needs {human(remaining)} "
            f"(+ {human(keep)} kept free, MIN_FREE_DISK={opts.min_free}{extra}), {human(free)} free; "
            "free some space, put ROOT on a larger disk or lower MIN_FREE_DISK"
        )
