"""One sync's shared state (:class:`RunState`) and removing a node folder."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.provision.git.client import GitClient
from orchestrator.provision.git.urls import redact_url
from orchestrator.provision.nodes.deps import CmdResult, CommandRunner
from orchestrator.provision.nodes.plan import Planned
from orchestrator.provision.nodes.state import NodeRecord, save_state

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Outcome:
    status: str = "ok"
    error: str = ""
    seconds: float = 0.0


class RunState:
    """One sync's shared state: the records (written after each success), outcomes, warnings."""

    def __init__(
        self,
        settings: Settings,
        layout: Layout,
        state: dict[str, NodeRecord],
        git: GitClient,
        runner: CommandRunner,
        environ: Mapping[str, str],
    ) -> None:
        self.settings = settings
        self.layout = layout
        self.dir = layout.custom_nodes_dir
        self.records = state
        self.git = git
        self.runner = runner
        self.environ = environ
        self.warnings: list[str] = []
        self.outcomes: dict[str, Outcome] = {}
        self.pip: dict[str, Any] = {"ran": False}
        self.constraints: tuple[str, ...] = ()  # extra pins (the lock's packages)
        self.progress: Callable[[str], None] = lambda _line: None  # "nodes: git 3/12 ..." as steps run
        self._lock = threading.Lock()

    def record(self, name: str, record: NodeRecord | None) -> None:
        with self._lock:
            if record is None:
                self.records.pop(name, None)
            else:
                self.records[name] = record
            save_state(self.layout, self.records)

    def update_record(self, name: str, **changes: Any) -> None:
        with self._lock:
            rec = self.records.get(name)
            if rec is None:
                return
            self.records[name] = dataclasses.replace(rec, updated=time.time(), **changes)
            save_state(self.layout, self.records)

    def fail(self, name: str, error: str) -> None:
        message = self.settings.redact(redact_url(error))
        outcome = self.outcomes.setdefault(name, Outcome())
        if outcome.status != "failed":
            outcome.status, outcome.error = "failed", message
        log.error("node %s: %s", name, message)

    def ok(self, name: str) -> bool:
        return self.outcomes.setdefault(name, Outcome()).status == "ok"

    def clean(self, text: str) -> str:
        return self.settings.redact(redact_url(text))

    def log_output(self, what: str, result: CmdResult) -> None:
        level = logging.DEBUG if result.ok else logging.WARNING
        for line in result.output.splitlines()[-40:]:
            if line.strip():
                log.log(level, "%s: %s", what, self.clean(line.rstrip()))


def remove_node(run: RunState, item: Planned) -> None:
    start = time.monotonic()
    path = run.dir / item.name
    try:
        if path.is_symlink():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except OSError as exc:
        run.fail(item.name, f"cannot remove {path}: {exc.strerror or exc}")
        return
    if item.managed:
        run.record(item.name, None)
    run.outcomes.setdefault(item.name, Outcome()).seconds = time.monotonic() - start
    log.info("node %s: removed (%s)", item.name, ", ".join(item.reasons))
