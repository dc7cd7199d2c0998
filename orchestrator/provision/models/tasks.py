"""What the download engine is given and what it gives back: tasks, options, results, progress.

    DownloadTask ──Engine.run──▶ DownloadResult (downloaded | skipped | verified | failed)

Pure values (plus the default seams in :class:`DownloadOptions`); no I/O happens here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import requests

from orchestrator.core.disk import DiskFloor, to_disk_floor
from orchestrator.provision.models.manifest import safe_url

MiB = 1 << 20
GiB = 1 << 30


def _disk_free(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem (statvfs)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _disk_size(path: Path) -> int:
    """The size of ``path``'s filesystem in bytes (statvfs)."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def new_session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = "comfy-orchestrator"
    return session


@dataclasses.dataclass(frozen=True)
class DownloadOptions:
    """Knobs and seams. Timeouts are per connect / per read, never for the whole file."""

    connect_timeout: float = 30.0  # seconds
    read_timeout: float = 120.0  # seconds without a byte before the attempt is retried
    attempts: int = 8  # consecutive attempts without progress before giving up
    retries: int = 10  # retries per file and run, with or without progress (DOWNLOAD_RETRIES)
    retry_seconds: float = 1800.0  # no retry once a file has been going this long (DOWNLOAD_RETRY_SECONDS)
    max_bytes: int = 200 * GiB  # cap of a file without a manifest size (MODELS_MAX_BYTES)
    min_free: DiskFloor = dataclasses.field(default_factory=lambda: to_disk_floor("5G,5%"))  # MIN_FREE_DISK
    backoff_initial: float = 1.0  # seconds
    backoff_max: float = 60.0  # seconds
    chunk_size: int = MiB  # bytes per read
    free_space_margin: int = 256 * MiB  # bytes kept free on top of the file
    fsync: bool = False  # fdatasync each file before its rename (see downloads' docstring)
    disk_free: Callable[[Path], int] = _disk_free  # bytes available at a path (checked on every chunk)
    disk_size: Callable[[Path], int] = _disk_size  # size of the filesystem at a path (for MIN_FREE_DISK=5%)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    session_factory: Callable[[], requests.Session] = new_session
    connections: int = 8  # ranged connections per large file (MODELS_CONNECTIONS; 1: one stream)
    ranged_min_bytes: int = 64 * MiB  # files at least this large use them (MODELS_RANGED_MIN_BYTES)
    hash_in_order: bool = True  # ranged: hash while downloading (False: one pass after the last chunk)


def task_key(url: str, dest_dir: Path, filename: str | None) -> str:
    """A stable id for a download: names its .part file and its verified record (no token leaks)."""
    raw = "\0".join((url, str(dest_dir), filename or ""))
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class DownloadTask:
    """One file to fetch. ``url`` and ``headers`` may carry credentials and are never shown."""

    name: str  # shown in logs, errors and status
    url: str = dataclasses.field(repr=False)
    dest_dir: Path
    filename: str | None = None  # None: from Content-Disposition, else the URL path
    sha256: str | None = None
    size: int | None = None  # bytes
    optional: bool = False
    token_var: str | None = None  # the variable a 401/403 asks for (HF_TOKEN, CIVITAI_TOKEN)
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        return task_key(self.url, self.dest_dir, self.filename)

    @property
    def source(self) -> str:
        return safe_url(self.url)

    @property
    def part(self) -> Path:
        return self.dest_dir / f".{self.key}.part"

    @property
    def part_meta(self) -> Path:
        return self.dest_dir / f".{self.key}.part.json"


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    task: DownloadTask
    state: str  # downloaded | skipped | verified | failed
    path: Path | None = None
    bytes_transferred: int = 0  # bytes received over the network by this run
    seconds: float = 0.0
    sha256: str | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.state != "failed"


class ProgressSink(Protocol):
    """Receives progress from worker threads (must be thread-safe)."""

    def started(self, task: DownloadTask, total: int | None, offset: int) -> None: ...

    def advanced(self, task: DownloadTask, nbytes: int) -> None: ...

    def finished(self, result: DownloadResult) -> None: ...


class NullProgress:
    def started(self, task: DownloadTask, total: int | None, offset: int) -> None:
        return None

    def advanced(self, task: DownloadTask, nbytes: int) -> None:
        return None

    def finished(self, result: DownloadResult) -> None:
        return None


def human(nbytes: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"  # pragma: no cover
