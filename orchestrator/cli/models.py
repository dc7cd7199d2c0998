"""``models sync``, ``models status`` and ``cleanup``: call the service, render its report."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from orchestrator.cli.output import error, print_json, print_line
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.provision import cleanup
from orchestrator.provision.models.status import read_status
from orchestrator.provision.models.sync import sync_models
from orchestrator.provision.models.tasks import human
from orchestrator.provision.repos.sync import resolve_shared

log = logging.getLogger(__name__)


class TqdmBar:
    """The sync's byte progress as a tqdm bar on stderr (a :class:`~.status.ByteBar`).

    Drawn from the first file that starts: a sync that fails validation shows no bar.
    """

    def __init__(self) -> None:
        self._bar: Any = None

    def _tqdm(self) -> Any:
        if self._bar is None:
            from tqdm import tqdm  # only when a terminal shows it

            self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="models",
                             file=sys.stderr, dynamic_ncols=True)
        return self._bar

    def reset(self, total: int, done: int) -> None:
        bar = self._tqdm()
        bar.total = total
        bar.n = done
        bar.refresh()

    def advance(self, nbytes: int) -> None:
        self._tqdm().update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def cmd_models_sync(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator models sync [--dry-run] [--tier T] [--json]``: exit 1 when a required model failed."""
    layout = resolve_shared(settings, Layout(settings.root), install=not args.dry_run)
    bar = TqdmBar() if not args.json and not args.dry_run and sys.stderr.isatty() else None
    report = sync_models(settings, layout, tier=args.tier, dry_run=args.dry_run, bar=bar)
    if args.json:
        print_json(report.to_dict())
    else:
        for item in report.items:
            where = item.path or f"{item.dest}/ (name from the server)"
            if item.kind == "hf" and item.action == "list-repo":
                where = f"{item.dest}/ (every file of the repo)"
            print_line(f"{item.action:<10} {where}  ← {item.source}")
            if item.error:
                print_line(f"           {item.error}")
        for warning in report.tree.warnings:
            print_line(f"warning: {warning}")
        counts = report.to_dict()["counts"]
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no models"
        print_line(f"models ({report.tier}{', dry run' if report.dry_run else ''}): {summary}")
    if report.failed:
        error(f"{len(report.failed)} required model(s) failed: {', '.join(report.failed)}")
        return 1
    return 0


def cmd_models_status(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator models status [--json]``: the last sync's progress."""
    status = read_status(Layout(settings.root))
    if args.json:
        print_json(status or {"files": [], "running": False})
        return 0
    if status is None:
        print_line("no model sync has run yet")
        return 0
    running = " (running)" if status.get("running") else " (interrupted)" if status.get("interrupted") else ""
    print_line(
        f"models{running}: {status.get('files_done', 0)}/{status.get('files_total', 0)} files, "
        f"{status.get('files_failed', 0)} failed, {human(status.get('bytes_done', 0))} of "
        f"{human(status.get('bytes_total', 0))}, {human(status.get('throughput_bytes_per_second', 0))}/s"
    )
    for f in status.get("files", []):
        total = f.get("bytes_total")
        pct = f" {100 * f.get('bytes_done', 0) / total:5.1f}%" if total else ""
        line = f"{f.get('state', '?'):<11}{pct}  {f.get('name')} → {f.get('dest')}"
        print_line(line + (f"  ({f['error']})" if f.get("error") else ""))
    return 0


def cmd_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator cleanup [--once] [--json]``: one pass, or a pass every CLEANUP_INTERVAL until a signal."""
    if settings.output_max_age <= 0:
        print_line("cleanup is off (OUTPUT_MAX_AGE=0)")
        return 0
    layout = Layout(settings.root)

    def show(result: cleanup.CleanupResult) -> None:
        if args.json:
            print_line(json.dumps(result.to_dict()), flush=True)  # one line per pass
        else:
            print_line(f"cleanup: deleted {result.files_deleted} files ({result.bytes_freed} bytes), "
                       f"removed {result.dirs_removed} empty folders in {len(result.dirs)} folders", flush=True)

    if args.once:
        show(cleanup.cleanup_once(settings, layout))
        return 0
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("cleanup: every %.0f s, deleting outputs older than %.0f s", settings.cleanup_interval,
                 settings.output_max_age)
        cleanup.run_loop(settings, layout, stop, on_result=show)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
