"""One large file over several ranged connections at once, resumable range by range.

A file of at least ``DownloadOptions.ranged_min_bytes`` whose server answered the first GET with
a length and ``Accept-Ranges: bytes`` is cut into chunks (a few per connection, 8–64 MiB); up to
``DownloadOptions.connections`` workers (one ``requests.Session`` each, so one TCP connection
each) take chunks in order, ask for ``Range: bytes=a-b`` (with ``If-Range``) and write each
piece at its offset into the sparse ``.part`` (``os.pwrite``). The first GET's own body serves
the first chunk. Connections ramp up 1 → 2 → 4 → … while each doubling brings 1.5× the bytes
per second (:func:`ramp`): a server that caps each connection gets them all within a second, a
fast one that does not keeps one or two (cheaper in CPU).

Which bytes are written lives in the part's sidecar (``done`` in ``.part.json``, atomic JSON),
saved by a thread of its own every 1/128 of the file (2–32 MiB); writers wait when the record
lags two steps, so a killed run loses at most about that much, and the next run fetches only the
missing ranges. SHA-256 is computed in order by a thread that reads back the part (from the page
cache) as the written prefix grows, so most of the hash is done when the last chunk lands
(``hash_in_order=False``: one pass after the last chunk; bench_downloads.py measures both). The
engine then checks size and hash and renames, as for one stream. With ``fsync`` the part is
fdatasynced before each record is saved (the record never claims bytes a power loss could lose).

Failures: a connection that fails (dropped, timed out, 5xx, 429) gives its chunk back and
retires; the others go on. When the last one fails, the attempt fails and the engine's retry
budget decides (the next attempt starts all connections again, from the recorded ranges). A
``200`` to a range request means the server ignores ranges after all: :class:`Refused`, and the
engine falls back to one stream from the written prefix. A ``206`` for another offset or length,
a ``416``, or a ``200`` with another validator means the file changed: the part is thrown away.
401/403/404, a redirect loop, the cap, the floor and a full disk stop every connection at once.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import threading
import time
from collections.abc import Callable

import requests

from orchestrator.provision.models import partfile
from orchestrator.provision.models.limits import Guard
from orchestrator.provision.models.partfile import Partial
from orchestrator.provision.models.ranges import Chunk, InOrderHasher, Ranges
from orchestrator.provision.models.responses import (
    NETWORK_ERRORS,
    READ_ERRORS,
    TransientError,
    body_reader,
    check_status,
    describe,
    is_encoded,
    parse_content_range,
    redirect_error,
)
from orchestrator.provision.models.tasks import DownloadOptions, DownloadTask, MiB, ProgressSink, human
from orchestrator.provision.models.verified import hash_file

log = logging.getLogger(__name__)

CHUNK_MIN = 8 * MiB
CHUNK_MAX = 64 * MiB
RAMP_WINDOW = 0.3  # seconds each step of the connection ramp is measured (0: every connection at once)


class Refused(Exception):
    """The server answered a range request with the whole file: go on with one stream."""


class Changed(Exception):
    """The file on the server is not the one the part holds."""


def splittable(state: Partial, resp: requests.Response, opts: DownloadOptions) -> bool:
    """Whether the first answer (a 200 from byte 0) allows ranged connections for this file."""
    return (
        opts.connections > 1
        and state.ranged is not False
        and resp.status_code == 200
        and state.offset == 0
        and state.total is not None
        and state.total >= max(opts.ranged_min_bytes, 1)
        and resp.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
        and not is_encoded(resp)
    )


def chunk_size(total: int, connections: int) -> int:
    """Four chunks per connection, 8–64 MiB each."""
    return max(CHUNK_MIN, min(CHUNK_MAX, -(-total // (connections * 4))))


def ramp(spawn: Callable[[], None], written: Callable[[], int], most: int, done: threading.Event) -> None:
    """Add connections 1 → 2 → 4 → … → ``most`` while each doubling pays (:func:`doubled`).

    A server that caps each connection (a CDN) gets them all within a few ``RAMP_WINDOW``s; a fast
    one that does not (or a full link, or busy CPUs) keeps one or two, which cost less CPU per byte.
    """
    if RAMP_WINDOW <= 0:
        for _ in range(most - 1):
            spawn()
        return
    n, before = 1, rate(written, done)
    while n < most and not done.is_set():
        for _ in range(min(n, most - n)):
            spawn()
        n = min(2 * n, most)
        now = rate(written, done)
        if not doubled(before, now):
            log.debug("ranged: %d connections: %.0f B/s, %.0f B/s with half as many; no more", n, now, before)
            return
        before = now


def rate(written: Callable[[], int], done: threading.Event) -> float:
    """Bytes per second written during the next RAMP_WINDOW (shorter when ``done`` is set)."""
    start, t0 = written(), time.monotonic()
    done.wait(RAMP_WINDOW)
    return (written() - start) / max(time.monotonic() - t0, 1e-6)


def doubled(before: float, now: float) -> bool:
    """Twice the connections brought at least 1.5× the bytes per second: the server caps each one."""
    return now >= 1.5 * before


class RangedDownload:
    """One attempt: workers over the missing chunks until done, refused, or all failed."""

    def __init__(self, task: DownloadTask, state: Partial, opts: DownloadOptions, done: list[tuple[int, int]],
                 progress: ProgressSink, reserve: Callable[[int], None]) -> None:
        """``done``: the written ranges; ``reserve(n)``: ``n`` bytes are still to come (free-space reservations)."""
        if state.total is None:
            raise RuntimeError("a ranged download needs the file's length")
        self.task, self.state, self.opts, self.progress, self.reserve = task, state, opts, progress, reserve
        self.total = total = state.total
        self.ranges = Ranges(total, done, chunk_size(total, opts.connections))
        self.stop = threading.Event()
        self.guard = Guard(task, opts)
        self.save_every = max(2 * MiB, min(32 * MiB, total // 128))  # (each save costs about 0.3 ms of CPU)
        self.max_unsaved = 2 * self.save_every  # writers wait beyond this: a kill loses at most that much
        self._unsaved = self._saved = 0  # bytes since the last save is due; written when the last record was taken
        self._save_lock = threading.Lock()
        self._save_due, self._saving = threading.Event(), True
        self._finished = threading.Event()  # the first connection has nothing left to take
        self.fatal: BaseException | None = None  # stops every worker
        self.failure: str | None = None  # the last transient failure
        self.refused = False
        self.changed: str | None = None

    # -- the attempt
    def run(self, first: requests.Response | None, session: requests.Session) -> None:
        """Fetch every missing chunk; on return the part is complete and ``state.hasher`` holds its hash.

        Raises:
            Refused: the server ignores ranges (the written ranges are saved).
            Changed: the file changed on the server.
            TransientError: every connection failed (the written ranges are saved).
            ModelError, OSError: as for one stream (auth, cap, floor, disk full).
        """
        task, state = self.task, self.state
        flags = os.O_RDWR | os.O_CREAT | (0 if first is None else os.O_TRUNC)
        fd = os.open(task.part, flags, 0o600)
        hasher: InOrderHasher | None = None
        try:
            os.ftruncate(fd, self.total)  # sparse: blocks are allocated as ranges are written
            self.save(fd)
            self.progress.started(task, self.total, self.ranges.written)
            hasher = InOrderHasher(task.part, self.ranges, self.stop) if self.opts.hash_in_order else None
            workers = min(self.opts.connections, len(self.ranges.todo))
            log.info("model %s: up to %d connections, %s still to fetch", task.name, workers,
                     human(self.total - self.ranges.written))
            own = self.ranges.take()  # (taken first: the first answer's body is this chunk's)
            if first is not None and (own is None or own.start != 0):
                first.close()
                first = None
            threads: list[threading.Thread] = []

            def spawn() -> None:
                threads.append(threading.Thread(target=self._worker, name=f"range-{len(threads) + 1}", daemon=True,
                                                args=(fd, None, None, self.opts.session_factory(), True)))
                threads[-1].start()

            ramper = threading.Thread(target=ramp, args=(spawn, lambda: self.ranges.written, workers, self._finished),
                                      name="range-ramp", daemon=True)
            saver = threading.Thread(target=self._saver, args=(fd,), name="range-state", daemon=True)
            for t in (ramper, saver):
                t.start()
            self._worker(fd, own, first, session, False)
            self._finished.set()
            ramper.join()  # (then no thread is added)
            for t in threads:
                t.join()
            self._saving = False
            self._save_due.set()  # (the saver stops)
            saver.join()
            self.save(fd)
            complete = self.ranges.written == self.total and not self.ranges.todo
            if not complete or self.fatal is not None or self.changed:
                self._raise()
            state.hasher = hasher.finish() if hasher is not None else hash_file(task.part)
            hasher = None
            state.offset = self.total
        finally:
            if hasher is not None:
                hasher.abandon()
            os.close(fd)

    def _raise(self) -> None:
        if self.fatal is not None:
            raise self.fatal
        if self.changed:
            raise Changed(self.changed)
        if self.refused:
            raise Refused("the server ignored a range request")
        raise TransientError(self.failure or "every connection failed")

    def save(self, fd: int) -> None:
        """Record the written ranges (after an fdatasync when ``fsync`` is on)."""
        with self._save_lock:
            if self.opts.fsync:
                os.fdatasync(fd)
            upto = self.ranges.written  # (only grows: the snapshot covers at least this much)
            done = self.ranges.snapshot()
            self.state.offset = sum(b - a for a, b in done)
            partfile.save_meta(self.task, self.state, done=done)
            self.reserve(self.total - self.state.offset)
            with self.ranges.lock:
                self._saved = max(self._saved, upto)
                self.ranges.grew.notify_all()

    def _saver(self, fd: int) -> None:
        """Saves the written ranges when asked, off the workers' path (a rename can take ms)."""
        while True:
            self._save_due.wait()
            self._save_due.clear()
            if not self._saving:
                return
            try:
                self.save(fd)
            except Exception as exc:  # noqa: BLE001 (e.g. a full disk: run() raises it)
                self.fatal = self.fatal or exc
                self.stop.set()
                return

    # -- one connection
    def _worker(self, fd: int, chunk: Chunk | None, first: requests.Response | None,
                session: requests.Session, own: bool) -> None:
        """Fetch chunks until none is left, this connection fails, or every worker must stop."""
        buf = bytearray(self.opts.chunk_size)  # (each read costs locks and a statvfs: 1 MiB)
        try:
            while not self.stop.is_set():
                chunk = chunk or self.ranges.take()
                if chunk is None:
                    return
                try:
                    resp = first if first is not None else request_range(
                        session, self.task, self.opts, self.state.validator, self.total, chunk)
                    first = None
                    with resp:
                        self._fill(fd, resp, chunk, buf)
                        keep_alive(resp)
                except TransientError as exc:  # this connection retires; the others go on
                    if not self.stop.is_set():
                        self.failure = str(exc)
                        log.info("model %s: a connection failed (%s)", self.task.name, exc)
                    return
                except Refused:
                    self.refused = True
                    return
                except Changed as exc:
                    self.changed = str(exc)
                    self.stop.set()
                    return
                except Exception as exc:  # noqa: BLE001 (auth, cap, floor, disk: run() raises it)
                    self.fatal = self.fatal or exc
                    self.stop.set()
                    return
                finally:
                    self.ranges.close(chunk)
                chunk = None
        finally:
            if first is not None:
                first.close()
            if own:
                session.close()

    def _fill(self, fd: int, resp: requests.Response, chunk: Chunk, buf: bytearray) -> None:
        read = body_reader(resp, len(buf))
        view = memoryview(buf)
        while chunk.pos < chunk.end:
            if self.stop.is_set():
                raise TransientError("stopped")
            try:
                n = read(view[: min(len(buf), chunk.end - chunk.pos)])
            except READ_ERRORS as exc:
                raise TransientError(describe(exc)) from None
            if not n:
                raise TransientError("the connection closed before the end of its range")
            self.guard(chunk.pos, n)
            partfile.pwrite_all(fd, view[:n], chunk.pos)
            with self.ranges.lock:
                chunk.pos += n
                self.ranges.written += n
                self.state.received += n
                self._unsaved += n
                due = self._unsaved >= self.save_every
                if due:
                    self._unsaved = 0
                while self.ranges.written - self._saved > self.max_unsaved and not self.stop.is_set():
                    self._save_due.set()
                    self.ranges.grew.wait(0.1)  # the record lags (slow renames): wait for it
            self.progress.advanced(self.task, n)
            if due:
                self._save_due.set()


def request_range(session: requests.Session, task: DownloadTask, opts: DownloadOptions, validator: str | None,
                  total: int, chunk: Chunk) -> requests.Response:
    """GET the rest of ``chunk`` (with If-Range); the answer is checked (:func:`check_answer`)."""
    headers = {"Accept-Encoding": "identity", **task.headers, "Range": f"bytes={chunk.pos}-{chunk.end - 1}"}
    if validator:
        headers["If-Range"] = validator
    try:
        resp = session.get(task.url, headers=headers, stream=True, timeout=(opts.connect_timeout, opts.read_timeout))
    except requests.TooManyRedirects as exc:
        raise redirect_error(task.name, task.source, exc) from None
    except NETWORK_ERRORS as exc:
        raise TransientError(describe(exc)) from None
    try:
        check_answer(resp, task, validator, total, chunk.pos)
    except BaseException:
        resp.close()
        raise
    return resp


def check_answer(resp: requests.Response, task: DownloadTask, validator: str | None, total: int, pos: int) -> None:
    """A range request's answer must be the range from ``pos`` of the same file.

    Raises:
        Refused: a 200 (the whole file) with the same or no validator.
        Changed: a 200 with another validator, a 416, another offset or length, an encoding.
        ModelError, TransientError: :func:`.responses.check_status`.
    """
    check_status(task, resp)
    if resp.status_code == 416:
        raise Changed("the server refused a range inside the file; starting again")
    if resp.status_code == 200:
        etag = resp.headers.get("ETag", "")
        now = (etag if etag and not etag.startswith("W/") else None) or resp.headers.get("Last-Modified")
        if validator and now and now != validator:
            raise Changed("the file changed on the server; starting again")
        raise Refused()
    start, length = parse_content_range(resp.headers.get("Content-Range"))
    if resp.status_code != 206 or start != pos or length != total or is_encoded(resp):
        raise Changed("the server answered another range or length; starting again")


def keep_alive(resp: requests.Response) -> None:
    """Give a fully read connection back to its pool (reading past urllib3 would close it)."""
    fp = getattr(resp.raw, "_fp", None)
    if isinstance(fp, http.client.HTTPResponse) and fp.isclosed():
        with contextlib.suppress(AttributeError):
            resp.raw.release_conn()
