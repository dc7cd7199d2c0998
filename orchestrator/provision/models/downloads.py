"""The download engine: parallel, resumable, verified, never a partial file under its final name.

    DownloadTask ──Engine.run──▶ DownloadResult (downloaded | skipped | verified | failed)

The pieces: :mod:`.tasks` (the values), :mod:`.verified` (the verified-files record),
:mod:`.responses` (reading a server's answer), :mod:`.partfile` (the ``.part`` file), and this
module, which ties them into one download with retries and a free-space check. One file:

1. Skip without network when the verified-files record (``$ROOT/.orchestrator/models_verified.json``:
   path, size, mtime, sha256) matches the file on disk; a file already at its final name without a
   record is adopted after one local check (sha256 when the manifest has one, else the size).
2. Stream into ``<dest>/.<key>.part``; an existing part is resumed with ``Range`` (and ``If-Range``
   when the server gave a validator); its prefix is hashed once first. A server that answers 200 to
   a Range request is restarted from byte 0. SHA-256 is computed while streaming, in a second
   thread, so the file is never read twice. A file of at least ``ranged_min_bytes`` whose first
   answer has a length and ``Accept-Ranges: bytes`` goes over ``connections`` ranged connections
   instead (:mod:`.ranged`; its written ranges are in the part's sidecar, so a resume fetches only
   the missing ones); a server that then ignores ranges gets one stream from the written prefix.
3. Before streaming, free space is checked: the bytes still to come + the ``MIN_FREE_DISK`` floor
   (or the margin, if larger) + what concurrent downloads on the same disk still need. While
   streaming, every chunk is checked against the file's byte cap and the floor (:mod:`.limits`).
4. Size and SHA-256 are checked, the part is atomically renamed, then recorded.

Durability: a killed process never leaves a partial file under the final name (the rename comes
last). Nothing is fsynced by default (``DownloadOptions.fsync``): for a 16 GB file that would
block for the whole disk write while the page cache already holds it, and on ext4 every fsync,
even of a small record, waits for the writeback of the files being downloaded. After a power loss
a filesystem that delays allocation (ext4, XFS) can leave a *shorter* file under the final name;
it does not match its record (size, mtime) and is downloaded again; a lost record only means one
local re-check (sha256 or size) on the next sync.

Transient failures (connection errors, timeouts, 5xx, 429, a dropped stream) are retried with
exponential backoff (tenacity), within a budget per file (:class:`.limits.RetryBudget`: failures
in a row without progress, retries in all, seconds). A redirect loop or chain, a body past the
cap, the floor and a full disk fail the file at once; the last three remove its part.
401/403 name the token variable. Errors and this package's logs never show a URL's query string
or a token; urllib3's own debug lines are stripped of query strings by the CLI's log handlers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import requests
import tenacity

from orchestrator.core.errors import ModelError
from orchestrator.provision.models import limits, partfile, ranged, ranges
from orchestrator.provision.models.limits import Guard, Reservations, RetryBudget
from orchestrator.provision.models.partfile import Partial
from orchestrator.provision.models.responses import (
    NETWORK_ERRORS,
    TransientError,
    check_status,
    describe,
    is_encoded,
    parse_content_range,
    pick_filename,
    redirect_error,
)
from orchestrator.provision.models.tasks import (
    DownloadOptions,
    DownloadResult,
    DownloadTask,
    NullProgress,
    ProgressSink,
    human,
)
from orchestrator.provision.models.verified import (
    VERIFIED_FILE,
    VerifiedStore,
    adopt,
    flock,
    hash_file,
    recorded_path,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def with_retries(task: DownloadTask, state: Partial, opts: DownloadOptions, fn: Callable[[], T]) -> T:
    """Call ``fn`` until it returns, retrying :class:`TransientError` with exponential backoff.

    Raises:
        ModelError: the retry budget is spent (:class:`.limits.RetryBudget`).
    """
    budget = RetryBudget(opts)
    why: list[str] = []

    def stop(_: tenacity.RetryCallState) -> bool:
        reason = budget.exhausted()
        if reason:
            why.append(reason)
        return reason is not None

    def wait(_: tenacity.RetryCallState) -> float:
        return float(min(opts.backoff_max, opts.backoff_initial * 2 ** max(budget.in_a_row - 1, 0)))

    def before_sleep(rs: tenacity.RetryCallState) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
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
                    # Progress (new bytes past the furthest point) resets the count in a row;
                    # the count in all and the seconds are bounded whatever the progress.
                    budget.failure(state.offset, state.received > before)
                    raise
    except TransientError as exc:
        raise ModelError(
            f"{task.name}: download failed {why[-1] if why else ''}: {exc}; "
            "the partial file is kept and the next `orchestrator models sync` resumes it"
        ) from None
    raise RuntimeError("unreachable: tenacity either returns or raises")  # pragma: no cover


def negotiate(task: DownloadTask, state: Partial, resp: requests.Response, opts: DownloadOptions) -> None:
    """Fit ``state`` to the answer: resumed or from 0, its length, validator and file name."""
    # We ask for identity; a server that encodes anyway gets no resume and no length check
    # (lengths and ranges would count encoded bytes).
    encoded = is_encoded(resp)
    if resp.status_code == 206:
        start, total = parse_content_range(resp.headers.get("Content-Range"))
        if start != state.offset or encoded:
            partfile.reset_part(task, state)
            raise TransientError("the server resumed at the wrong offset; starting again")
    else:
        if state.offset:
            log.info("model %s: the server ignored the resume range; starting from 0", task.name)
        state.offset, state.hasher = 0, hashlib.sha256()
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() and not encoded else None
    limits.check_length(task, opts, total)
    state.total = total or task.size
    if resp.status_code == 200 or state.validator is None:
        etag = resp.headers.get("ETag", "")
        state.validator = (etag if etag and not etag.startswith("W/") else None) or resp.headers.get(
            "Last-Modified"
        )
    if not state.filename:
        state.filename = pick_filename(task, resp)


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
        self._reservations = Reservations()

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
        except NETWORK_ERRORS as exc:  # (requests' errors are OSErrors whose text holds the URL)
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

        def attempt() -> Any:
            try:
                timeout = (self.options.connect_timeout, self.options.read_timeout)
                resp = self._session().get(url, headers=dict(headers), timeout=timeout)
            except requests.TooManyRedirects as exc:
                raise redirect_error(name, task.source, exc) from None
            except NETWORK_ERRORS as exc:
                raise TransientError(describe(exc)) from None
            check_status(task, resp)
            try:
                return resp.json()
            except ValueError:
                raise ModelError(f"{name}: {task.source} did not answer JSON") from None

        return with_retries(task, Partial(), self.options, attempt)

    # -- internals
    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self.options.session_factory()
            self._local.session = session
        return session

    def _download(self, task: DownloadTask, start: float) -> DownloadResult:
        task.dest_dir.mkdir(parents=True, exist_ok=True)
        with flock(self.state_dir / "downloads" / f"{task.key}.lock"):
            # Another process may have finished it while we waited for the lock.
            self.store.refresh()
            record = self.store.get(task.key)
            path = recorded_path(task, record)
            if path is not None and record is not None:
                return DownloadResult(task, "skipped", path, seconds=time.monotonic() - start,
                                      sha256=record.get("sha256"))
            adopted = adopt(task, self.store)
            if adopted is not None:
                return dataclasses.replace(adopted, seconds=time.monotonic() - start)
            state = Partial()
            with_retries(task, state, self.options, lambda: self._attempt(task, state))
            path, digest = partfile.install(task, state, fsync=self.options.fsync)
            try:
                self.store.record(task, path, digest)
            except OSError as exc:  # (e.g. a full disk) the file is verified; the next sync re-checks it
                log.warning("model %s: cannot record %s as verified: %s", task.name, path, exc.strerror or exc)
            log.info("model %s: installed %s (%s)", task.name, path, human(state.offset))
            return DownloadResult(task, "downloaded", path, state.received, time.monotonic() - start, digest)

    def _attempt(self, task: DownloadTask, state: Partial) -> None:
        try:
            self._attempt_once(task, state)
        except ranged.Refused:
            log.info("model %s: the server ignored a range request; going on with one connection", task.name)
            state.ranged = False
            self._attempt_once(task, state)

    def _attempt_once(self, task: DownloadTask, state: Partial) -> None:
        """One request: resume or start the part, then stream the body into it (or go ranged)."""
        opts = self.options
        done = ranges.saved_part(task, state)  # a ranged part, of this run or an earlier one
        if done is not None:
            self._guarded(task, state, lambda: self._ranged(task, state, None, done))
            return
        try:
            on_disk = task.part.stat().st_size
        except FileNotFoundError:
            on_disk = 0
        if state.hasher is None or on_disk != state.offset:
            # Resuming a part left by an earlier run: hash its prefix once.
            if on_disk:
                partfile.load_meta(task, state)
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
        except requests.TooManyRedirects as exc:
            raise redirect_error(task.name, task.source, exc) from None
        except NETWORK_ERRORS as exc:
            raise TransientError(describe(exc)) from None
        with resp:
            check_status(task, resp)
            if resp.status_code == 416:
                _, total = parse_content_range(resp.headers.get("Content-Range"))
                if state.offset and total == state.offset and (task.filename or state.filename):
                    state.total = total  # the part is already complete
                    state.filename = task.filename or state.filename
                    return
                partfile.reset_part(task, state)
                raise TransientError("the server refused the resume range; starting again")
            self._guarded(task, state, lambda: self._negotiated(task, state, resp))

    def _negotiated(self, task: DownloadTask, state: Partial, resp: requests.Response) -> None:
        negotiate(task, state, resp, self.options)
        limits.check_space(task, state, self.options, self._reservations)
        if ranged.splittable(state, resp, self.options):
            self._ranged(task, state, resp, [])
        else:
            self._stream(task, state, resp)

    def _guarded(self, task: DownloadTask, state: Partial, fn: Callable[[], None]) -> None:
        """Run ``fn``; the cap, the floor, a full disk and a changed remote file remove the part."""
        try:
            fn()
        except limits.Stop:
            partfile.reset_part(task, state)
            raise
        except ranged.Changed as exc:
            partfile.reset_part(task, state)
            raise TransientError(str(exc)) from None
        except OSError as exc:
            if exc.errno not in limits.DISK_FULL:
                raise
            partfile.reset_part(task, state)
            raise limits.disk_full_error(task, self.options) from None

    def _ranged(self, task: DownloadTask, state: Partial, first: requests.Response | None,
                done: list[tuple[int, int]]) -> None:
        """Fetch the missing ranges over several connections (:mod:`.ranged`)."""
        if first is None:  # resuming: the checks the first answer gets on the one-stream path
            state.offset = sum(b - a for a, b in done)
            limits.check_length(task, self.options, state.total)
            limits.check_space(task, state, self.options, self._reservations)

        def reserve(left: int) -> None:
            self._reservations.set(task.key, state.dev, left)

        run = ranged.RangedDownload(task, state, self.options, done, self.progress, reserve)
        run.run(first, self._session())

    def _stream(self, task: DownloadTask, state: Partial, resp: requests.Response) -> None:
        opts = self.options
        partfile.save_meta(task, state)
        self.progress.started(task, state.total, state.offset)

        def advanced(n: int) -> None:
            self.progress.advanced(task, n)
            if state.total is not None:
                self._reservations.set(task.key, state.dev, state.total - state.offset)

        partfile.stream(task, state, resp, chunk_size=opts.chunk_size, fsync=opts.fsync, advanced=advanced,
                        guard=Guard(task, opts))
