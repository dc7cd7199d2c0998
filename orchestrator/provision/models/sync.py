"""``models sync``: the model tree, the manifest and the download engine tied into one report.

``up`` calls :func:`sync_models` with ``tier="before_start"`` before it starts instances and runs
``orchestrator models sync --tier background`` as a supervisord program while they serve.
Progress goes to the status file (:mod:`.status`) while files stream.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.core.errors import ConfigError, ModelError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine.fs import read_json
from orchestrator.provision.models import manifest
from orchestrator.provision.models import tree as modeltree
from orchestrator.provision.models.downloads import Engine
from orchestrator.provision.models.manifest import ModelEntry
from orchestrator.provision.models.sources import (
    auth_for,
    check_endpoints,
    entry_task,
    hf_listing_url,
    repo_tasks,
)
from orchestrator.provision.models.status import ByteBar, StatusWriter
from orchestrator.provision.models.tasks import DownloadOptions, DownloadTask
from orchestrator.provision.models.verified import VERIFIED_FILE, VerifiedStore, recorded_path

TIER_CHOICES = ("before_start", "background", "all")


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


def sync_models(
    settings: Settings,
    layout: Layout,
    *,
    tier: str = "all",
    dry_run: bool = False,
    bar: ByteBar | None = None,
    options: DownloadOptions | None = None,
) -> ModelsReport:
    """Prepare the model tree and fetch the manifest's models of ``tier``.

    Args:
        tier: before_start | background | all.
        dry_run: validate and list files, destinations and actions; no writes, no network.
        bar: a progress bar over the bytes to fetch (the CLI's, on a terminal).
        options: download knobs and seams (tests); default: :func:`download_options` of ``settings``.

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

    items = _download(settings, layout, tier, entries, dests, bar=bar, options=options)
    return ModelsReport(tier, False, tree, tuple(items), time.monotonic() - start)


def _download(
    settings: Settings,
    layout: Layout,
    tier: str,
    entries: Sequence[ModelEntry],
    dests: Sequence[Path],
    *,
    bar: ByteBar | None,
    options: DownloadOptions | None,
) -> list[ModelItem]:
    """List the Hugging Face repos, then download every file, keeping the status file current."""
    status = StatusWriter(layout.models_status_file, tier=tier, bar=bar)
    engine = Engine(layout.state_dir, options=options or download_options(settings), progress=status)
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
    return items


def download_options(settings: Settings, base: DownloadOptions | None = None) -> DownloadOptions:
    """The engine's knobs from the settings: the byte cap, the free-space floor, the retry budget, connections."""
    return dataclasses.replace(
        base or DownloadOptions(),
        max_bytes=settings.models_max_bytes,
        min_free=settings.min_free_disk,
        retries=settings.download_retries,
        retry_seconds=settings.download_retry_seconds,
        connections=settings.models_connections,
        ranged_min_bytes=settings.models_ranged_min_bytes,
    )


def _dry_run_items(
    settings: Settings, layout: Layout, entries: Sequence[ModelEntry], dests: Sequence[Path]
) -> list[ModelItem]:
    store = VerifiedStore(layout.state_dir / VERIFIED_FILE)
    items = []
    for entry, dest in zip(entries, dests, strict=True):
        if entry.is_hf_repo:
            action, name = "list-repo", None
        else:
            action, name = dry_run_action(entry_task(settings, entry, dest), store)
        items.append(ModelItem(entry.name, entry.kind, entry.display_source, str(dest), name, action,
                               entry.when, entry.optional))
    return items


def dry_run_action(task: DownloadTask, store: VerifiedStore) -> tuple[str, str | None]:
    """What a sync would do with ``task``, from local files only: (action, file name)."""
    record = store.get(task.key)
    path = recorded_path(task, record)
    if path is not None:
        return "skip", path.name
    if task.filename and (task.dest_dir / task.filename).is_file():
        return "verify", task.filename
    if task.part.exists():
        meta = read_json(task.part_meta, {})
        name = task.filename or (meta.get("filename") if isinstance(meta, dict) else None)
        return "resume", name
    return "download", task.filename
