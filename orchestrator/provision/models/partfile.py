"""The ``.part`` file of one download: resumable state, streaming with a parallel hash, install.

A download streams into ``<dest>/.<key>.part`` (its sidecar ``.part.json`` keeps the server's
validator, file name and length for a resume by a later run); the part becomes the final file
only by one rename, after its size and SHA-256 were checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import requests

from orchestrator.core.errors import ModelError
from orchestrator.machine.fs import read_json, write_json
from orchestrator.provision.models.responses import READ_ERRORS, TransientError, body_reader, describe
from orchestrator.provision.models.tasks import DownloadTask

# Reads are 1 MiB (few Python round trips); writes go out in 64 KiB slices: on ext4 (Linux 6.x)
# 1 MiB writes into the page cache cost about twice the system time and wall time of 64 KiB
# ones (bench/bench_downloads.py on a 2-CPU VM), while tmpfs does not care.
WRITE_SLICE = 64 * 1024


@dataclasses.dataclass
class Partial:
    """What one download knows between attempts (the part file's prefix hash, the server's name)."""

    offset: int = 0  # bytes in the part file covered by ``hasher``
    hasher: hashlib._Hash | None = None
    total: int | None = None
    filename: str | None = None
    validator: str | None = None  # ETag or Last-Modified, for If-Range
    received: int = 0  # bytes received over the network in this run
    dev: int = 0  # st_dev of the destination, for the free-space reservations
    ranged: bool | None = None  # False: the server ignored a range request (one stream from then on)


def read_meta(task: DownloadTask) -> dict[str, Any]:
    """The part's sidecar (empty when missing or unreadable)."""
    meta = read_json(task.part_meta, {})
    return meta if isinstance(meta, dict) else {}


def load_meta(task: DownloadTask, state: Partial) -> None:
    """Take the validator, file name and length an earlier run saved next to its part."""
    meta = read_meta(task)
    state.validator = meta.get("validator") or None
    state.filename = state.filename or meta.get("filename") or None
    total = meta.get("total")
    state.total = state.total or (total if type(total) is int and total > 0 else None)


def save_meta(task: DownloadTask, state: Partial, *, done: list[tuple[int, int]] | None = None) -> None:
    """Save the resume hints; ``done``: the written ranges of a ranged part (:mod:`.ranged`)."""
    # A hint for the next run's resume: atomic against a kill, not worth an fsync.
    meta: dict[str, Any] = {"validator": state.validator, "filename": state.filename, "total": state.total,
                            "source": task.source}
    if done is not None:
        meta["done"] = [list(span) for span in done]
    write_json(task.part_meta, meta, mode=0o600, durable=False)


def reset_part(task: DownloadTask, state: Partial) -> None:
    """Throw the part away: the next attempt starts from byte 0."""
    for p in (task.part, task.part_meta):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    state.offset, state.hasher, state.validator, state.total = 0, None, None, None


class ParallelHasher:
    """Hashes buffers in a second thread (hashlib releases the GIL) while the caller writes them.

    A small pool of buffers is recycled: the reader fills one, the writer writes it, the hasher
    hashes it and hands it back; an empty pool makes the reader wait (back-pressure).
    """

    def __init__(self, h: hashlib._Hash, chunk_size: int, buffers: int = 8) -> None:
        self.h = h
        self._todo: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(buffers):
            self._free.put(bytearray(chunk_size))
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            buf, n = item
            self.h.update(memoryview(buf)[:n])
            self._free.put(buf)

    def buffer(self) -> bytearray:
        return self._free.get()

    def give_back(self, buf: bytearray) -> None:
        self._free.put(buf)

    def feed(self, buf: bytearray, n: int) -> None:
        self._todo.put((buf, n))

    def close(self) -> None:
        """Wait until every fed buffer is hashed."""
        self._todo.put(None)
        self._thread.join()


def write_all(fh: BinaryIO, view: memoryview) -> None:
    while view:
        written = fh.write(view[:WRITE_SLICE])
        view = view[written:]


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write ``view`` at ``offset``, whole (with 8 writer threads, fewer GIL round trips won)."""
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def stream(
    task: DownloadTask,
    state: Partial,
    resp: requests.Response,
    *,
    chunk_size: int,
    fsync: bool,
    advanced: Callable[[int], None],
    guard: Callable[[int, int], None] = lambda offset, n: None,
) -> None:
    """Append the body of ``resp`` to the part (from ``state.offset``), hashing as it goes.

    ``guard(offset, n)`` runs before each chunk of ``n`` bytes is written and may raise to stop.

    Raises:
        TransientError: the connection dropped or closed early (the part keeps what came).
        OSError: the disk is full (ENOSPC, EDQUOT); the caller removes the part.
        ModelError: the part cannot be written, or from ``guard``.
    """
    if state.hasher is None:
        raise RuntimeError("stream() needs the hash of the part's prefix")
    hasher = ParallelHasher(state.hasher, chunk_size)
    read = body_reader(resp, chunk_size)
    try:
        with task.part.open("ab" if state.offset else "wb", buffering=0) as fh:
            while True:
                buf = hasher.buffer()
                try:
                    n = read(buf)
                except READ_ERRORS as exc:
                    hasher.give_back(buf)
                    raise TransientError(describe(exc)) from None
                if not n:
                    hasher.give_back(buf)
                    break
                try:
                    guard(state.offset, n)
                except BaseException:
                    hasher.give_back(buf)
                    raise
                write_all(fh, memoryview(buf)[:n])
                hasher.feed(buf, n)  # written first: the hash never covers bytes the part lacks
                state.offset += n
                state.received += n
                advanced(n)
            if state.total is not None and state.offset < state.total:
                raise TransientError("the connection closed before the end of the file")
            if fsync:
                os.fdatasync(fh.fileno())
    except OSError as exc:
        state.hasher = None  # the part may hold bytes the hash has not seen
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ModelError(
            f"{task.name}: cannot write {task.part}: {exc.strerror or exc}; free space or check permissions"
        ) from None
    finally:
        hasher.close()


def install(task: DownloadTask, state: Partial, *, fsync: bool) -> tuple[Path, str]:
    """Check the complete part's size and SHA-256, then rename it to its final name.

    Raises:
        ModelError: a check failed (the part is thrown away: the next sync starts again).
    """
    if state.hasher is None or not state.filename:
        raise RuntimeError("install() needs a streamed part and its file name")
    digest = state.hasher.hexdigest()
    size = state.offset
    if task.size is not None and size != task.size:
        reset_part(task, state)
        raise ModelError(
            f"{task.name}: size mismatch: got {size} bytes, the manifest says {task.size}; "
            "the file was not installed (check size in models.yaml)"
        )
    if state.total is not None and size != state.total:
        reset_part(task, state)
        raise ModelError(f"{task.name}: got {size} of {state.total} bytes; the file was not installed")
    if task.sha256 and digest != task.sha256:
        reset_part(task, state)
        raise ModelError(
            f"{task.name}: sha256 mismatch: expected {task.sha256}, got {digest}; the file was not "
            "installed (check sha256 in models.yaml or the source)"
        )
    final = task.dest_dir / state.filename
    os.replace(task.part, final)
    with contextlib.suppress(FileNotFoundError):
        task.part_meta.unlink()
    if fsync:
        _fsync_dir(task.dest_dir)
    return final, digest


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
