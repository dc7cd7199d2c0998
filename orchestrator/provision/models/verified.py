"""The verified-files record: which installed model files were checked, so a sync skips them.

``$ROOT/.orchestrator/models_verified.json`` maps a task's key to the file's path, size, mtime
and sha256. A file whose size and mtime still match its record is skipped without network or
hashing; a file at its final name without a record is adopted after one local check.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from orchestrator.machine.fs import read_json, write_json
from orchestrator.provision.models.tasks import DownloadResult, DownloadTask, MiB

log = logging.getLogger(__name__)

VERIFIED_FILE = "models_verified.json"


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) between processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock (also when the process is killed)


class VerifiedStore:
    """``{key: {path, size, mtime_ns, sha256, expected_sha256, source}}``, shared between processes.

    ``durable``: fsync each update. Off by default: on ext4 every fsync waits for the writeback of
    the model files being downloaded (data=ordered), and a lost record only costs a re-check.
    """

    def __init__(self, path: Path, *, durable: bool = False) -> None:
        self.path = path
        self.durable = durable
        self._lock = threading.Lock()
        data = read_json(path, {})
        self._records: dict[str, dict[str, Any]] = data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        record = self._records.get(key)
        return record if isinstance(record, dict) else None

    def refresh(self) -> None:
        """Pick up records other processes wrote since this store was loaded."""
        with self._lock:
            data = read_json(self.path, {})
            if isinstance(data, dict):
                self._records.update(data)

    def put(self, key: str, record: dict[str, Any]) -> None:
        with self._lock, flock(self.path.with_name(self.path.name + ".lock")):
            data = read_json(self.path, {})
            merged = data if isinstance(data, dict) else {}
            merged.update(self._records)
            merged[key] = record
            write_json(self.path, merged, mode=0o600, durable=self.durable)
            self._records = merged

    def record(self, task: DownloadTask, final: Path, digest: str | None) -> None:
        """Record ``final`` (just installed or checked) as the verified file of ``task``."""
        st = final.stat()
        self.put(task.key, {
            "path": str(final), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
            "expected_sha256": task.sha256, "source": task.source, "verified_at": time.time(),
        })


def recorded_path(task: DownloadTask, record: Mapping[str, Any] | None) -> Path | None:
    """The installed file when ``record`` still describes it (no network, no hashing)."""
    if not record:
        return None
    path = Path(str(record.get("path", "")))
    if path.parent != task.dest_dir or (task.filename and path.name != task.filename):
        return None
    if task.sha256 and record.get("sha256") != task.sha256:
        return None
    if task.size is not None and record.get("size") != task.size:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_size != record.get("size") or st.st_mtime_ns != record.get("mtime_ns"):
        return None
    return path


def hash_file(path: Path, chunk: int = 4 * MiB, limit: int | None = None) -> hashlib._Hash:
    """SHA-256 of ``path`` (of its first ``limit`` bytes when given)."""
    h = hashlib.sha256()
    left = limit
    with path.open("rb") as fh:
        while left is None or left > 0:
            block = fh.read(chunk if left is None else min(chunk, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h


def adopt(task: DownloadTask, store: VerifiedStore) -> DownloadResult | None:
    """A file already at its final name without a record: check it once locally, then record it."""
    if not task.filename:
        return None
    final = task.dest_dir / task.filename
    try:
        st = final.stat()
    except OSError:
        return None
    if not final.is_file():
        return None
    record = store.get(task.key)
    if record and record.get("path") == str(final) and record.get("size") != st.st_size:
        # Recorded with another size: a torn copy (e.g. after a power loss), not a user's file.
        log.warning("model %s: %s is not the recorded size: downloading again", task.name, final)
        return None
    if task.size is not None and st.st_size != task.size:
        log.warning("model %s: %s has %d bytes, expected %d: downloading again", task.name, final,
                    st.st_size, task.size)
        return None
    digest = None
    if task.sha256:
        digest = hash_file(final).hexdigest()
        if digest != task.sha256:
            log.warning("model %s: %s does not match its sha256: downloading again", task.name, final)
            return None
    store.record(task, final, digest)
    log.info("model %s: found %s, recorded as verified", task.name, final)
    return DownloadResult(task, "verified", final, sha256=digest)
