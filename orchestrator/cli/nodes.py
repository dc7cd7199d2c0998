"""`nodes sync` and `nodes validate`: call the custom-nodes service, render its report."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from orchestrator.cli.output import print_line, table
from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine import lock as oplock
from orchestrator.provision.nodes.config import load_config
from orchestrator.provision.nodes.report import STATE_NAMES, NodesReport
from orchestrator.provision.nodes.sync import sync_nodes
from orchestrator.provision.repos.sync import resolve_shared


def format_report(report: NodesReport) -> str:
    """The table ``nodes sync`` prints: the plan in a dry run, else what each node went through."""
    if report.dry_run:
        rows = [[r.name, r.action, ", ".join(r.reasons)] for r in report.results]
        body = table(rows, ["NODE", "ACTION", "WHY"])
    else:
        rows = [
            [r.name, r.action, r.status, r.commit[:12], f"{r.seconds:.1f}s", r.error] for r in report.results
        ]
        body = table(rows, ["NODE", "ACTION", "STATUS", "COMMIT", "TIME", "ERROR"])
    counts = report.counts
    planned = "planned: " if report.dry_run else ""
    summary = f"{len(report.results)} nodes, {planned}" + ", ".join(f"{counts[k]} {k}" for k in STATE_NAMES)
    if report.pip.get("ran"):
        summary += f"; pip {report.pip.get('seconds', 0):.1f}s for {len(report.pip.get('nodes', []))} node(s)"
    lines = [body, "", f"{summary} ({report.seconds:.1f}s, {report.config_file})"]
    lines += [f"warning: {w}" for w in report.warnings]
    wall = report.pip.get("firewall") or {}
    lines += [
        f"firewall: node {r['node']}: {r['requested']} rewritten to {r['rewritten']}"
        for r in wall.get("rewritten", [])
    ]
    lines += [
        f"firewall: node {r['node']}: refused: wants {r['wanted']}, {r['package']} {r['kept']} is kept"
        for r in wall.get("refused", [])
    ]
    if report.failed:
        lines.append(f"FAILED: {', '.join(report.failed)}")
    lines += [f"IMPORT FAILED: {name}: {error}" for name, error in sorted(report.import_failed.items())]
    return "\n".join(lines)


def cmd_nodes_sync(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator nodes sync [--dry-run] [--prune] [--file F] [--json]``: exit 1 if any node failed."""
    layout = Layout(settings.root)
    if args.file is not None:
        load_config(args.file)  # validate before acting: a bad file writes nothing, not even the lock
    # One up/nodes sync per ROOT (a dry run writes nothing and needs no lock).
    with contextlib.nullcontext(None) if args.dry_run else oplock.hold(layout):
        if args.file is None:
            layout = resolve_shared(settings, layout, install=not args.dry_run)
        report = sync_nodes(settings, layout, dry_run=args.dry_run, prune=args.prune, config_file=args.file)
    if args.json:
        print_line(settings.redact(json.dumps(report.to_dict(), indent=2)))
    else:
        print_line(settings.redact(format_report(report)))
    return 1 if report.failed or report.import_failed else 0


def cmd_nodes_validate(settings: Settings, args: argparse.Namespace) -> int:
    """``orchestrator nodes validate FILE [--json]``: schema and safety only, no network, no writes."""
    path: Path = args.file
    try:
        config = load_config(path)
    except ConfigError as exc:
        if args.json:
            print_line(settings.redact(json.dumps({"file": str(path), "ok": False, "error": str(exc)}, indent=2)))
            return exc.exit_code
        raise
    if args.json:
        out = {
            "file": str(path),
            "ok": True,
            "nodes": [n.to_dict() for n in config.nodes],
            "warnings": list(config.warnings),
        }
        print_line(settings.redact(json.dumps(out, indent=2)))
        return 0
    for w in config.warnings:
        print_line(f"warning: {w}")
    print_line(f"{path}: OK, {len(config.nodes)} custom nodes")
    return 0
