"""``orchestrator models sync|status``: the model tree, the manifest, downloads, progress, metrics.

``up`` calls :func:`sync_models` with ``tier="before_start"`` before it starts instances and runs
``orchestrator models sync --tier background`` as a supervisord program while they serve.
Progress goes to ``Layout.models_status_file`` (rewritten at most about once a second, never
holding a token); :class:`DownloadsCollector` turns it into Prometheus gauges.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

from prometheus_client.core import GaugeMetricFamily, Metric

from orchestrator.cli.output import print_json
from orchestrator.core.errors import ConfigError, ModelError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine.fs import read_json
from orchestrator.machine.state import pid_alive
from orchestrator.provision.models import downloads, manifest
from orchestrator.provision.models import tree as modeltree
from orchestrator.provision.models.downloads import DownloadOptions, DownloadResult, DownloadTask, Engine
from orchestrator.provision.models.manifest import ModelEntry

TIER_CHOICES = ("before_start", "background", "all")
STATUS_INTERVAL = 1.0  # seconds between status-file rewrites during downloads
STALE_AFTER = 15.0  # seconds: a status not rewritten for this long has no live throughput


@dataclasses.dataclass(frozen=True)
class ModelItem:
    """One file (or, in a dry run, one whole Hugging Face repo) and what happened to it."""

    name: str
    kind: str  # url | hf | civitai
    source: str  # without credentials or query string
    dest: str  # the destination folder
    file: str | None  # the file name (None: the server names it)
    action: str  # dry run: download | resume | skip | verify | list-repo; else: the result state
    when: str
    optional: bool = False
    bytes: int = 0  # bytes transferred by this run
    error: str = ""

    @property
    def path(self) -> str | None:
        return str(Path(self.dest) / self.file) if self.file else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "source": self.source, "dest": self.dest,
            "file": self.file, "path": self.path, "action": self.action, "when": self.when,
            "optional": self.optional, "bytes": self.bytes, "error": self.error,
        }


@dataclasses.dataclass(frozen=True)
class ModelsReport:
    tier: str
    dry_run: bool
    tree: modeltree.TreeResult
    items: tuple[ModelItem, ...]
    seconds: float = 0.0

    @property
    def failed_items(self) -> tuple[ModelItem, ...]:
        """Required items that failed (a failed optional item is only a warning)."""
        return tuple(i for i in self.items if i.action == "failed" and not i.optional)

    @property
    def failed(self) -> tuple[str, ...]:
        """Names of the required items that failed."""
        return tuple(i.name for i in self.failed_items)

    @property
    def warnings(self) -> tuple[str, ...]:
        optional = tuple(i.error for i in self.items if i.action == "failed" and i.optional)
        return self.tree.warnings + optional

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.action] = counts.get(item.action, 0) + 1
        return {
            "tier": self.tier,
            "dry_run": self.dry_run,
            "tree": self.tree.to_dict(),
            "items": [i.to_dict() for i in self.items],
            "counts": counts,
            "failed": list(self.failed),
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------- sources → tasks (pure)
def _origin(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))


def check_endpoints(settings: Settings) -> None:
    endpoints = (("HF_ENDPOINT", settings.hf_endpoint), ("CIVITAI_ENDPOINT", settings.civitai_endpoint))
    for var, value in endpoints:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"invalid {var}={value!r}: expected a URL such as https://huggingface.co")


def auth_for(settings: Settings, url: str) -> tuple[dict[str, str], str | None]:
    """The Authorization header for ``url`` and the variable it comes from.

    HF_TOKEN goes only to the HF_ENDPOINT host, CIVITAI_TOKEN only to the CIVITAI_ENDPOINT host
    (requests drops the header when a redirect leaves that host).
    """
    origin = _origin(url)
    for endpoint, token, var in (
        (settings.hf_endpoint, settings.hf_token, "HF_TOKEN"),
        (settings.civitai_endpoint, settings.civitai_token, "CIVITAI_TOKEN"),
    ):
        if origin == _origin(endpoint):
            return ({"Authorization": f"Bearer {token}"} if token else {}), var
    return {}, None


def _url_filename(url: str) -> str | None:
    """The URL's last path segment when it looks like a file name (has an extension)."""
    name = PurePosixPath(urlsplit(url).path).name
    if "." not in name.strip(".") or manifest.check_filename(name):
        return None
    return name


def hf_file_url(settings: Settings, repo: str, path: str, revision: str | None) -> str:
    base = settings.hf_endpoint.rstrip("/")
    return f"{base}/{repo}/resolve/{quote(revision or 'main', safe='')}/{quote(path)}"


def hf_listing_url(settings: Settings, repo: str, revision: str | None) -> str:
    base = settings.hf_endpoint.rstrip("/")
    rev = f"/revision/{quote(revision, safe='')}" if revision else ""
    return f"{base}/api/models/{repo}{rev}?blobs=true"


def civitai_url(settings: Settings, version_id: str) -> str:
    return f"{settings.civitai_endpoint.rstrip('/')}/api/download/models/{version_id}"


def entry_task(settings: Settings, entry: ModelEntry, dest_dir: Path) -> DownloadTask:
    """The download for a single-file entry (not a whole HF repo)."""
    if entry.kind == "url":
        url = entry.source
        filename = entry.filename or _url_filename(url)
    elif entry.kind == "hf":
        url = hf_file_url(settings, entry.hf_repo, entry.hf_path, entry.revision)
        filename = entry.filename or PurePosixPath(entry.hf_path).name
    else:
        url = civitai_url(settings, entry.source)
        filename = entry.filename
    headers, token_var = auth_for(settings, url)
    return DownloadTask(
        name=entry.name, url=url, dest_dir=dest_dir, filename=filename, sha256=entry.sha256,
        size=entry.size, optional=entry.optional, token_var=token_var, headers=headers,
    )


def repo_tasks(settings: Settings, entry: ModelEntry, dest_dir: Path, listing: Any) -> list[DownloadTask]:
    """Tasks for every file of a Hugging Face repo listing (``siblings[].rfilename``).

    Raises:
        ModelError: the listing is malformed or names a path that would leave ``dest_dir``.
    """
    siblings = listing.get("siblings") if isinstance(listing, dict) else None
    if not isinstance(siblings, list):
        raise ModelError(f"{entry.name}: the Hugging Face listing has no file list (siblings)")
    tasks = []
    for sib in siblings:
        rfilename = sib.get("rfilename") if isinstance(sib, dict) else None
        if not isinstance(rfilename, str):
            continue
        parts = rfilename.split("/")
        bad = next((p for p in parts if manifest.check_filename(p)), None)
        if bad is not None:
            raise ModelError(f"{entry.name}: the repo lists an unsafe path {rfilename!r}; nothing written")
        lfs = sib.get("lfs") if isinstance(sib.get("lfs"), dict) else {}
        sha = lfs.get("sha256") if isinstance(lfs.get("sha256"), str) else None
        size = lfs.get("size", sib.get("size"))
        url = hf_file_url(settings, entry.hf_repo, rfilename, entry.revision)
        headers, token_var = auth_for(settings, url)
        tasks.append(DownloadTask(
            name=f"{entry.hf_repo}/{rfilename}", url=url, dest_dir=dest_dir.joinpath(*parts[:-1]),
            filename=parts[-1], sha256=sha.lower() if sha else None,
            size=size if isinstance(size, int) else None, optional=entry.optional,
            token_var=token_var, headers=headers,
        ))
    return tasks


def dry_run_action(task: DownloadTask, store: downloads.VerifiedStore) -> tuple[str, str | None]:
    """What a sync would do with ``task``, from local files only: (action, file name)."""
    record = store.get(task.key)
    path = downloads.recorded_path(task, record)
    if path is not None:
        return "skip", path.name
    if task.filename and (task.dest_dir / task.filename).is_file():
        return "verify", task.filename
    if task.part.exists():
        meta = read_json(task.part_meta, {})
        name = task.filename or (meta.get("filename") if isinstance(meta, dict) else None)
        return "resume", name
    return "download", task.filename


# ---------------------------------------------------------------- progress: status file + bar
class StatusWriter:
    """A :class:`downloads.ProgressSink` that keeps the status file (and a tqdm bar) current."""

    def __init__(
        self,
        path: Path,
        *,
        tier: str,
        bar: bool = False,
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
        self._bar: Any = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="models",
                             file=sys.stderr, dynamic_ncols=True)

    def begin(self, tasks: Sequence[DownloadTask], failed: Iterable[ModelItem] = ()) -> None:
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
                self._bar.total = self._sum("bytes_total")
                self._bar.n = self._sum("bytes_done")
                self._bar.refresh()
            self._write()

    def advanced(self, task: DownloadTask, nbytes: int) -> None:
        with self._lock:
            self._entry(task)["bytes_done"] += nbytes
            self._received += nbytes
            if self._bar is not None:
                self._bar.update(nbytes)
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
        downloads.replace_json(self.path, self.snapshot(now))


# ---------------------------------------------------------------- the service
def sync_models(
    settings: Settings,
    layout: Layout,
    *,
    tier: str = "all",
    dry_run: bool = False,
    progress: bool = False,
    options: DownloadOptions | None = None,
) -> ModelsReport:
    """Prepare the model tree and fetch the manifest's models of ``tier``.

    Args:
        tier: before_start | background | all.
        dry_run: validate and list files, destinations and actions; no writes, no network.
        progress: show a progress bar when stderr is a terminal.
        options: download knobs and seams (tests).

    Raises:
        ConfigError: comfy_dir_config.yaml, static-models.json, the manifest or an env list is
            invalid, or an entry names a category the tree does not have (nothing downloaded).
    """
    start = time.monotonic()
    if tier not in TIER_CHOICES:
        raise ConfigError(f"invalid tier {tier!r}: expected one of {', '.join(TIER_CHOICES)}")
    check_endpoints(settings)
    # Validate everything (tree, manifest, env lists, destinations) before writing anything.
    entries = [e for e in manifest.load_entries(settings, layout) if tier == "all" or e.when == tier]
    if not entries and not (layout.shared_dir / modeltree.CONFIG_NAME).exists():
        # Nothing to place and no tree to create (a bare shared folder): not an error here.
        tree = modeltree.empty_tree(layout)
        return ModelsReport(tier, dry_run, tree, (), time.monotonic() - start)
    tree = modeltree.load_tree(settings, layout)
    dests: list[Path] = []
    for entry in entries:
        try:
            dests.append(modeltree.resolve_dest(tree, entry.dest))
        except ConfigError as exc:
            raise ConfigError(f"invalid model {entry.name!r} ({entry.origin}): {exc}") from None
    if not dry_run:
        tree = modeltree.prepare(settings, layout)
    if dry_run:
        items = _dry_run_items(settings, layout, entries, dests)
        return ModelsReport(tier, True, tree, tuple(items), time.monotonic() - start)

    engine_bar = progress and sys.stderr.isatty()
    status = StatusWriter(layout.models_status_file, tier=tier, bar=engine_bar)
    engine = Engine(layout.state_dir, options=options, progress=status)
    tasks: list[tuple[ModelEntry, DownloadTask]] = []
    early: list[ModelItem] = []
    for entry, dest in zip(entries, dests, strict=True):
        if not entry.is_hf_repo:
            tasks.append((entry, entry_task(settings, entry, dest)))
            continue
        headers, token_var = auth_for(settings, hf_listing_url(settings, entry.hf_repo, entry.revision))
        try:
            listing = engine.get_json(
                hf_listing_url(settings, entry.hf_repo, entry.revision),
                headers=headers, name=entry.name, token_var=token_var,
            )
            tasks.extend((entry, t) for t in repo_tasks(settings, entry, dest, listing))
        except ModelError as exc:
            early.append(ModelItem(entry.name, entry.kind, entry.display_source, str(dest), None, "failed",
                                   entry.when, entry.optional, error=str(exc)))
    status.begin([t for _, t in tasks], early)
    try:
        results = engine.run([t for _, t in tasks], settings.models_concurrency)
    finally:
        status.close()
    items = list(early)
    for (entry, task), result in zip(tasks, results, strict=True):
        items.append(ModelItem(
            name=task.name, kind=entry.kind, source=task.source, dest=str(task.dest_dir),
            file=result.path.name if result.path else task.filename, action=result.state,
            when=entry.when, optional=task.optional, bytes=result.bytes_transferred, error=result.error,
        ))
    return ModelsReport(tier, False, tree, tuple(items), time.monotonic() - start)


def _dry_run_items(
    settings: Settings, layout: Layout, entries: Sequence[ModelEntry], dests: Sequence[Path]
) -> list[ModelItem]:
    store = downloads.VerifiedStore(layout.state_dir / downloads.VERIFIED_FILE)
    items = []
    for entry, dest in zip(entries, dests, strict=True):
        if entry.is_hf_repo:
            action, name = "list-repo", None
        else:
            action, name = dry_run_action(entry_task(settings, entry, dest), store)
        items.append(ModelItem(entry.name, entry.kind, entry.display_source, str(dest), name, action,
                               entry.when, entry.optional))
    return items


# ---------------------------------------------------------------- CLI
def cmd_sync(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator models sync [--dry-run] [--tier T] [--json]``: exit 1 when a required model failed."""
    from orchestrator.provision.repos import resolve_shared

    layout = resolve_shared(settings, Layout(settings.root), install=not args.dry_run)
    report = sync_models(settings, layout, tier=args.tier, dry_run=args.dry_run, progress=not args.json)
    if args.json:
        print_json(report.to_dict())
    else:
        for item in report.items:
            where = item.path or f"{item.dest}/ (name from the server)"
            if item.kind == "hf" and item.action == "list-repo":
                where = f"{item.dest}/ (every file of the repo)"
            print(f"{item.action:<10} {where}  ← {item.source}")
            if item.error:
                print(f"           {item.error}")
        for warning in report.tree.warnings:
            print(f"warning: {warning}")
        counts = report.to_dict()["counts"]
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no models"
        print(f"models ({report.tier}{', dry run' if report.dry_run else ''}): {summary}")
    if report.failed:
        names = ", ".join(report.failed)
        print(f"error: {len(report.failed)} required model(s) failed: {names}", file=sys.stderr)
        return 1
    return 0


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


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator models status [--json]``: the last sync's progress."""
    status = read_status(Layout(settings.root))
    if args.json:
        print_json(status or {"files": [], "running": False})
        return 0
    if status is None:
        print("no model sync has run yet")
        return 0
    running = " (running)" if status.get("running") else " (interrupted)" if status.get("interrupted") else ""
    print(
        f"models{running}: {status.get('files_done', 0)}/{status.get('files_total', 0)} files, "
        f"{status.get('files_failed', 0)} failed, {downloads.human(status.get('bytes_done', 0))} of "
        f"{downloads.human(status.get('bytes_total', 0))}, "
        f"{downloads.human(status.get('throughput_bytes_per_second', 0))}/s"
    )
    for f in status.get("files", []):
        total = f.get("bytes_total")
        pct = f" {100 * f.get('bytes_done', 0) / total:5.1f}%" if total else ""
        line = f"{f.get('state', '?'):<11}{pct}  {f.get('name')} → {f.get('dest')}"
        print(line + (f"  ({f['error']})" if f.get("error") else ""))
    return 0


# ---------------------------------------------------------------- metrics
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
