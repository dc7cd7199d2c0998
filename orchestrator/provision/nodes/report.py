"""The report of one sync: per-node results, counts by state, and the copy kept for ``status``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.core.layout import Layout
from orchestrator.machine.fs import read_json

REPORT_FILE = "nodes_report.json"


STATE_NAMES = ("installed", "updated", "unchanged", "removed", "failed")


_ACTION_STATE = {"install": "installed", "update": "updated", "unchanged": "unchanged", "remove": "removed"}


@dataclasses.dataclass(frozen=True)
class NodeResult:
    name: str
    action: str  # install | update | unchanged | remove
    status: str  # ok | failed | skipped (dry run)
    error: str = ""
    commit: str = ""
    seconds: float = 0.0
    reasons: tuple[str, ...] = ()
    url: str = ""  # credentials stripped

    @property
    def state(self) -> str:
        """installed | updated | unchanged | removed | failed."""
        return "failed" if self.status == "failed" else _ACTION_STATE[self.action]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "status": self.status,
            "state": self.state,
            "error": self.error,
            "commit": self.commit,
            "seconds": round(self.seconds, 3),
            "reasons": list(self.reasons),
            "url": self.url,
        }


@dataclasses.dataclass(frozen=True)
class NodesReport:
    """Per-node results of one sync (in a dry run: the plan, every status "skipped")."""

    config_file: Path
    results: tuple[NodeResult, ...]
    dry_run: bool = False
    warnings: tuple[str, ...] = ()
    pip: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    import_failed: Mapping[str, str] = dataclasses.field(default_factory=dict)  # node -> first error line

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.results if r.status == "failed")

    @property
    def counts(self) -> dict[str, int]:
        """Nodes by state (installed, updated, unchanged, removed, failed); planned in a dry run."""
        counts = dict.fromkeys(STATE_NAMES, 0)
        for r in self.results:
            counts[r.state] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_file": str(self.config_file),
            "dry_run": self.dry_run,
            "counts": self.counts,
            "failed": list(self.failed),
            "nodes": [r.to_dict() for r in self.results],
            "warnings": list(self.warnings),
            "pip": dict(self.pip),
            "import_failed": dict(self.import_failed),
            "seconds": round(self.seconds, 3),
        }


def last_report(layout: Layout) -> dict[str, Any] | None:
    """The last sync's report (for ``status`` and the metrics), or None."""
    data = read_json(layout.state_dir / REPORT_FILE)
    return data if isinstance(data, dict) else None
