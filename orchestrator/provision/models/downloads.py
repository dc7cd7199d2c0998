"""The download engine: parallel, resumable, verified, never a partial file under its final name.

    DownloadTask ──Engine.run──▶ DownloadResult (downloaded | skipped | verified | failed)

One file:

1. Skip without network when the verified-files record (``$ROOT/.orchestrator/models_verified.json``:
   path, size, mtime, sha256) matches the file on disk; a file already at its final name without a
   record is adopted after one local check (sha256 when the manifest has one, else the size).
2. Stream into ``<dest>/.<key>.part``; an existing part is resumed with ``Range`` (and ``If-Range``
   when the server gave a validator); its prefix is hashed once first. A server that answers 200 to
   a Range request is restarted from byte 0. SHA-256 is computed while streaming, in a second
   thread, so the file is never read twice.
3. Before streaming, free space is checked: the bytes still to come + a margin + what concurrent
   downloads on the same disk still need.
4. Size and SHA-256 are checked, the part is atomically renamed, then recorded.

Durability: a killed process never leaves a partial file under the final name (the rename comes
last). Nothing is fsynced by default (``DownloadOptions.fsync``): for a 16 GB file that would
block for the whole disk write while the page cache already holds it, and on ext4 every fsync,
even of a small record, waits for the writeback of the files being downloaded. After a power loss
a filesystem that delays allocation (ext4, XFS) can leave a *shorter* file under the final name;
it does not match its record (size, mtime) and is downloaded again; a lost record only means one
local re-check (sha256 or size) on the next sync.

Transient failures (connection errors, timeouts, 5xx, 429, a dropped stream) are retried with
exponential backoff (tenacity); an attempt that moved bytes does not count against the limit.
401/403 name the token variable. URLs are logged without query strings; tokens never appear.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import requests
import tenacity
import urllib3

from orchestrator.core.errors import ModelError
from orchestrator.machine.fs import read_json, write_json
from orchestrator.provision.models.manifest import check_filename, safe_url

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
VERIFIED_FILE = "models_verified.json"
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
_NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)
# What reading a body can raise: socket errors and timeouts, http.client's, urllib3's, requests'.
_READ_ERRORS = (*_NETWORK_ERRORS, http.client.HTTPException, OSError)


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


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
    backoff_initial: float = 1.0  # seconds
    backoff_max: float = 60.0  # seconds
    chunk_size: int = MiB  # bytes per read
    free_space_margin: int = 256 * MiB  # bytes kept free on top of the file
    fsync: bool = False  # fdatasync each file before its rename (see the module docstring)
    disk_free: Callable[[Path], int] = _disk_free  # bytes available at a path
    sleep: Callable[[float], None] = time.sleep
    session_factory: Callable[[], requests.Session] = new_session


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


class TransientError(Exception):
    """Worth retrying (and resuming): network trouble, 5xx, 429."""


# ---------------------------------------------------------------- small pure helpers
def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"  # pragma: no cover


def filename_from_disposition(value: str | None) -> str | None:
    """The file name a Content-Disposition header suggests (RFC 6266 / 5987), unchecked."""
    if not value:
        return None
    match = re.search(r"filename\*\s*=\s*([^;]+)", value, re.I)
    if match:
        raw = match.group(1).strip().strip('"')
        charset, sep, rest = raw.partition("''")
        if sep:
            try:
                return unquote(rest, encoding=charset or "utf-8", errors="replace").strip()
            except LookupError:
                return unquote(rest).strip()
        return unquote(raw).strip()
    match = re.search(r'filename\s*=\s*"((?:[^"\\]|\\.)*)"', value, re.I)
    if match:
        return re.sub(r"\\(.)", r"\1", match.group(1)).strip()
    match = re.search(r"filename\s*=\s*([^;]+)", value, re.I)
    return match.group(1).strip().strip("'") if match else None


def parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` → (100, 1000); ``bytes */1000`` → (None, 1000)."""
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "", re.I)
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def describe(exc: BaseException) -> str:
    """A short reason for a network error that never quotes the URL (it may hold a token)."""
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
        return "timed out"
    dropped = (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError,
               http.client.HTTPException, ConnectionError)
    if isinstance(exc, dropped):
        return "connection dropped during the transfer"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__


# ---------------------------------------------------------------- the verified-files record
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
        with self._lock, _flock(self.path.with_name(self.path.name + ".lock")):
            data = read_json(self.path, {})
            merged = data if isinstance(data, dict) else {}
            merged.update(self._records)
            merged[key] = record
            if self.durable:
                write_json(self.path, merged, mode=0o600)
            else:
                replace_json(self.path, merged, mode=0o600)
            self._records = merged


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock (also when the process is killed)


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


class _Hasher:
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


def body_reader(resp: requests.Response, chunk_size: int) -> Callable[[bytearray], int]:
    """A ``readinto`` for the response body.

    An unencoded body is read straight from the stdlib response under urllib3
    (``resp.raw._fp``): urllib3's own read path copies every chunk again, and skipping it costs
    about 40 % less CPU per byte (measured with bench/bench_downloads.py). Anything else goes
    through ``iter_content``.
    """
    fp = getattr(resp.raw, "_fp", None)
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if isinstance(fp, http.client.HTTPResponse) and encoding in ("", "identity"):
        return fp.readinto
    chunks = resp.iter_content(chunk_size)
    pending = memoryview(b"")

    def readinto(buf: bytearray) -> int:
        nonlocal pending
        while not pending:
            chunk = next(chunks, None)
            if chunk is None:
                return 0
            pending = memoryview(chunk)
        n = min(len(buf), len(pending))
        buf[:n] = pending[:n]
        pending = pending[n:]
        return n

    return readinto


# Reads are 1 MiB (few Python round trips); writes go out in 64 KiB slices: on ext4 (Linux 6.x)
# 1 MiB writes into the page cache cost about twice the system time and wall time of 64 KiB
# ones (bench/bench_downloads.py on a 2-CPU VM), while tmpfs does not care.
WRITE_SLICE = 64 * 1024


def _write_all(fh: Any, view: memoryview) -> None:
    while view:
        written = fh.write(view[:WRITE_SLICE])
        view = view[written:]


@dataclasses.dataclass
class _Partial:
    """What one download knows between attempts (the part file's prefix hash, the server's name)."""

    offset: int = 0  # bytes in the part file covered by ``hasher``
    hasher: hashlib._Hash | None = None
    total: int | None = None
    filename: str | None = None
    validator: str | None = None  # ETag or Last-Modified, for If-Range
    received: int = 0  # bytes received over the network in this run
    failures: int = 0  # consecutive attempts without progress
    dev: int = 0  # st_dev of the destination, for the free-space reservations


class _Reservations:
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


# ---------------------------------------------------------------- the engine
class Engine:
    """Downloads tasks in parallel; thread-safe; one per sync run."""

    def __init__(
        self,
        state_dir: Path,
        *,
        options: DownloadOptions | None = None,
        progress: ProgressSink | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.options = options or DownloadOptions()
        self.progress: ProgressSink = progress or NullProgress()
        self.store = VerifiedStore(state_dir / VERIFIED_FILE, durable=self.options.fsync)
        self._local = threading.local()
        self._reservations = _Reservations()
        _strip_queries_from_urllib3_logs()

    # -- public
    def run(self, tasks: Sequence[DownloadTask], concurrency: int = 4) -> list[DownloadResult]:
        """Download every task (``concurrency`` at a time); failures come back as results."""
        if not tasks:
            return []
        with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="download") as pool:
            return list(pool.map(self.download, tasks))

    def download(self, task: DownloadTask) -> DownloadResult:
        """One task; never raises for an expected failure (the result says ``failed``)."""
        start = time.monotonic()
        try:
            result = self._download(task, start)
        except ModelError as exc:
            result = DownloadResult(task, "failed", seconds=time.monotonic() - start, error=str(exc))
        except _NETWORK_ERRORS as exc:  # (requests' errors are OSErrors whose text holds the URL)
            result = DownloadResult(
                task, "failed", seconds=time.monotonic() - start, error=f"{task.name}: {describe(exc)}"
            )
        except OSError as exc:
            result = DownloadResult(
                task, "failed", seconds=time.monotonic() - start,
                error=f"{task.name}: {exc.strerror or exc} ({exc.filename or task.dest_dir})",
            )
        finally:
            self._reservations.drop(task.key)
        if result.state == "failed":
            log.error("model %s: %s", task.name, result.error)
        self.progress.finished(result)
        return result

    def get_json(self, url: str, *, headers: Mapping[str, str], name: str, token_var: str | None) -> Any:
        """GET a small JSON document (e.g. a repo listing) with the same retries and auth errors."""
        task = DownloadTask(name=name, url=url, dest_dir=self.state_dir, token_var=token_var, headers=headers)
        state = _Partial()

        def attempt() -> Any:
            try:
                timeout = (self.options.connect_timeout, self.options.read_timeout)
                resp = self._session().get(url, headers=dict(headers), timeout=timeout)
            except _NETWORK_ERRORS as exc:
                raise TransientError(describe(exc)) from None
            self._check_status(task, resp)
            try:
                return resp.json()
            except ValueError:
                raise ModelError(f"{name}: {task.source} did not answer JSON") from None

        return self._retrying(task, state, attempt)

    # -- internals
    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self.options.session_factory()
            self._local.session = session
        return session

    def _download(self, task: DownloadTask, start: float) -> DownloadResult:
        task.dest_dir.mkdir(parents=True, exist_ok=True)
        with _flock(self.state_dir / "downloads" / f"{task.key}.lock"):
            # Another process may have finished it while we waited for the lock.
            self.store.refresh()
            record = self.store.get(task.key)
            path = recorded_path(task, record)
            if path is not None and record is not None:
                return DownloadResult(task, "skipped", path, seconds=time.monotonic() - start,
                                      sha256=record.get("sha256"))
            adopted = self._adopt(task)
            if adopted is not None:
                return dataclasses.replace(adopted, seconds=time.monotonic() - start)
            state = _Partial()
            self._retrying(task, state, lambda: self._attempt(task, state))
            path, digest = self._install(task, state)
            return DownloadResult(task, "downloaded", path, state.received, time.monotonic() - start, digest)

    def _adopt(self, task: DownloadTask) -> DownloadResult | None:
        """A file already at its final name without a record: check it once locally."""
        if not task.filename:
            return None
        final = task.dest_dir / task.filename
        try:
            st = final.stat()
        except OSError:
            return None
        if not final.is_file():
            return None
        record = self.store.get(task.key)
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
        self._record(task, final, digest)
        log.info("model %s: found %s, recorded as verified", task.name, final)
        return DownloadResult(task, "verified", final, sha256=digest)

    def _retrying(self, task: DownloadTask, state: _Partial, fn: Callable[[], Any]) -> Any:
        opts = self.options
        last: list[str] = [""]

        def stop(_: tenacity.RetryCallState) -> bool:
            return state.failures >= opts.attempts

        def wait(_: tenacity.RetryCallState) -> float:
            return float(min(opts.backoff_max, opts.backoff_initial * 2 ** max(state.failures - 1, 0)))

        def before_sleep(rs: tenacity.RetryCallState) -> None:
            exc = rs.outcome.exception() if rs.outcome else None
            last[0] = str(exc)
            log.warning("model %s: %s; retrying (%s)", task.name, exc, task.source)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=stop, wait=wait, sleep=opts.sleep, before_sleep=before_sleep, reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    before = state.received
                    try:
                        return fn()
                    except TransientError:
                        # An attempt that moved bytes resets the count: long files on flaky links finish.
                        state.failures = 1 if state.received > before else state.failures + 1
                        raise
        except TransientError as exc:
            raise ModelError(
                f"{task.name}: download failed after {state.failures} attempts without progress: {exc}; "
                "the partial file is kept and the next `orchestrator models sync` resumes it"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_status(self, task: DownloadTask, resp: requests.Response) -> None:
        code = resp.status_code
        if code < 400 or code == 416:
            return
        host = urlsplit(resp.url or task.url).hostname or "the server"
        if code in (401, 403):
            if task.token_var and any(k.lower() == "authorization" for k in task.headers):
                raise ModelError(
                    f"{task.name}: {host} refused the token in {task.token_var} (HTTP {code}); "
                    f"check that it is valid and has access to {task.source}"
                )
            if task.token_var:
                raise ModelError(
                    f"{task.name}: {host} needs a token (HTTP {code}); set {task.token_var}"
                )
            raise ModelError(f"{task.name}: {host} refused access (HTTP {code}) to {task.source}")
        if code == 404:
            raise ModelError(
                f"{task.name}: not found (HTTP 404) at {task.source}; check the source in the manifest"
            )
        if code in _TRANSIENT_STATUS or code >= 500:
            raise TransientError(f"HTTP {code} from {host}")
        raise ModelError(f"{task.name}: HTTP {code} from {host} for {task.source}")

    def _load_meta(self, task: DownloadTask, state: _Partial) -> None:
        meta = read_json(task.part_meta, {})
        if isinstance(meta, dict):
            state.validator = meta.get("validator") or None
            state.filename = state.filename or meta.get("filename") or None
            state.total = state.total or meta.get("total") or None

    def _save_meta(self, task: DownloadTask, state: _Partial) -> None:
        replace_json(task.part_meta, {"validator": state.validator, "filename": state.filename,
                                    "total": state.total, "source": task.source}, mode=0o600)

    def _reset_part(self, task: DownloadTask, state: _Partial) -> None:
        for p in (task.part, task.part_meta):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        state.offset, state.hasher, state.validator, state.total = 0, None, None, None

    def _attempt(self, task: DownloadTask, state: _Partial) -> None:
        opts = self.options
        try:
            on_disk = task.part.stat().st_size
        except FileNotFoundError:
            on_disk = 0
        if state.hasher is None or on_disk != state.offset:
            # Resuming a part left by an earlier run: hash its prefix once.
            if on_disk:
                self._load_meta(task, state)
                log.info("model %s: resuming at %s", task.name, human(on_disk))
            state.hasher = hash_file(task.part) if on_disk else hashlib.sha256()
            state.offset = on_disk
        headers = {"Accept-Encoding": "identity", **task.headers}
        if state.offset:
            headers["Range"] = f"bytes={state.offset}-"
            if state.validator:
                headers["If-Range"] = state.validator
        try:
            resp = self._session().get(
                task.url, headers=headers, stream=True, timeout=(opts.connect_timeout, opts.read_timeout)
            )
        except _NETWORK_ERRORS as exc:
            raise TransientError(describe(exc)) from None
        with resp:
            self._check_status(task, resp)
            if resp.status_code == 416:
                _, total = parse_content_range(resp.headers.get("Content-Range"))
                if state.offset and total == state.offset and (task.filename or state.filename):
                    state.total = total  # the part is already complete
                    state.filename = task.filename or state.filename
                    return
                self._reset_part(task, state)
                raise TransientError("the server refused the resume range; starting again")
            # We ask for identity; a server that encodes anyway gets no resume and no length check
            # (lengths and ranges would count encoded bytes).
            encoded = resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
            if resp.status_code == 206:
                start, total = parse_content_range(resp.headers.get("Content-Range"))
                if start != state.offset or encoded:
                    self._reset_part(task, state)
                    raise TransientError("the server resumed at the wrong offset; starting again")
            else:
                if state.offset:
                    log.info("model %s: the server ignored the resume range; starting from 0", task.name)
                state.offset, state.hasher = 0, hashlib.sha256()
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() and not encoded else None
            state.total = total or task.size
            if resp.status_code == 200 or state.validator is None:
                etag = resp.headers.get("ETag", "")
                state.validator = (etag if etag and not etag.startswith("W/") else None) or resp.headers.get(
                    "Last-Modified"
                )
            if not state.filename:
                state.filename = self._pick_filename(task, resp)
            self._check_space(task, state)
            self._save_meta(task, state)
            self.progress.started(task, state.total, state.offset)
            self._stream(task, state, resp)

    def _pick_filename(self, task: DownloadTask, resp: requests.Response) -> str:
        if task.filename:
            return task.filename
        suggested = filename_from_disposition(resp.headers.get("Content-Disposition"))
        where = "Content-Disposition"
        if not suggested:
            suggested = unquote(urlsplit(resp.url or task.url).path.rsplit("/", 1)[-1])
            where = "URL"
        why = check_filename(suggested) if suggested else "no file name"
        if why:
            raise ModelError(
                f"{task.name}: the server's file name {suggested!r} ({where}) is unsafe ({why}); "
                "nothing was written: set filename: for this model in models.yaml"
            )
        return suggested

    def _check_space(self, task: DownloadTask, state: _Partial) -> None:
        remaining = (state.total - state.offset) if state.total is not None else None
        if remaining is None:
            return
        state.dev = dev = os.stat(task.dest_dir).st_dev
        self._reservations.set(task.key, dev, remaining)
        others = self._reservations.others(task.key, dev)
        need = remaining + self.options.free_space_margin + others
        free = self.options.disk_free(task.dest_dir)
        if free < need:
            extra = f" and {human(others)} for other downloads" if others else ""
            raise ModelError(
                f"{task.name}: not enough disk space in {task.dest_dir}: needs {human(remaining)} "
                f"(+ {human(self.options.free_space_margin)} margin{extra}), {human(free)} free; "
                "free some space or put ROOT on a larger disk"
            )

    def _stream(self, task: DownloadTask, state: _Partial, resp: requests.Response) -> None:
        assert state.hasher is not None
        hasher = _Hasher(state.hasher, self.options.chunk_size)
        read = body_reader(resp, self.options.chunk_size)
        try:
            with task.part.open("ab" if state.offset else "wb", buffering=0) as fh:
                while True:
                    buf = hasher.buffer()
                    try:
                        n = read(buf)
                    except _READ_ERRORS as exc:
                        hasher.give_back(buf)
                        raise TransientError(describe(exc)) from None
                    if not n:
                        hasher.give_back(buf)
                        break
                    _write_all(fh, memoryview(buf)[:n])
                    hasher.feed(buf, n)  # written first: the hash never covers bytes the part lacks
                    state.offset += n
                    state.received += n
                    self.progress.advanced(task, n)
                    if state.total is not None:
                        self._reservations.set(task.key, state.dev, state.total - state.offset)
                if state.total is not None and state.offset < state.total:
                    raise TransientError("the connection closed before the end of the file")
                if self.options.fsync:
                    os.fdatasync(fh.fileno())
        except OSError as exc:
            state.hasher = None  # the part may hold bytes the hash has not seen
            raise ModelError(
                f"{task.name}: cannot write {task.part}: {exc.strerror or exc}; "
                "free space or check permissions"
            ) from None
        finally:
            hasher.close()

    def _install(self, task: DownloadTask, state: _Partial) -> tuple[Path, str]:
        assert state.hasher is not None
        assert state.filename
        digest = state.hasher.hexdigest()
        size = state.offset
        if task.size is not None and size != task.size:
            self._reset_part(task, state)
            raise ModelError(
                f"{task.name}: size mismatch: got {size} bytes, the manifest says {task.size}; "
                "the file was not installed (check size in models.yaml)"
            )
        if state.total is not None and size != state.total:
            self._reset_part(task, state)
            raise ModelError(f"{task.name}: got {size} of {state.total} bytes; the file was not installed")
        if task.sha256 and digest != task.sha256:
            self._reset_part(task, state)
            raise ModelError(
                f"{task.name}: sha256 mismatch: expected {task.sha256}, got {digest}; the file was not "
                "installed (check sha256 in models.yaml or the source)"
            )
        final = task.dest_dir / state.filename
        os.replace(task.part, final)
        with contextlib.suppress(FileNotFoundError):
            task.part_meta.unlink()
        if self.options.fsync:
            _fsync_dir(task.dest_dir)
        self._record(task, final, digest)
        log.info("model %s: installed %s (%s)", task.name, final, human(size))
        return final, digest

    def _record(self, task: DownloadTask, final: Path, digest: str | None) -> None:
        st = final.stat()
        self.store.put(task.key, {
            "path": str(final), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
            "expected_sha256": task.sha256, "source": task.source, "verified_at": time.time(),
        })


class _QueryStripper(logging.Filter):
    """urllib3 logs request paths at debug level; a query string may hold a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                a.split("?", 1)[0] + "?…" if isinstance(a, str) and "?" in a else a for a in record.args
            )
        return True


def _strip_queries_from_urllib3_logs() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _QueryStripper) for f in logger.filters):
        logger.addFilter(_QueryStripper())


def replace_json(path: Path, obj: Any, *, mode: int = 0o644) -> None:
    """Write JSON atomically (temp file + rename) without fsync: for progress and hints.

    fsutil.write_json fsyncs, and on ext4 each fsync waits for the writeback of whatever large
    file is being downloaded at the time; these files are rewritten every second or are hints.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
