"""``logs``: the last lines of an instance's log, then (``--follow``) new lines as they arrive,
as :class:`LogLine` values; the CLI renders them as text or JSON lines."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from orchestrator.core.errors import OrchestratorError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.lifecycle.control import select_instances
from orchestrator.machine.state import applied_plan


@dataclasses.dataclass(frozen=True)
class LogLine:
    """One line (without its newline) of GPU ``gpu``'s instance log."""

    gpu: int
    line: str

    @property
    def key(self) -> str:
        return f"gpu{self.gpu}"

    def to_dict(self) -> dict[str, int | str]:
        return {"gpu": self.gpu, "line": self.line}


def log_files(settings: Settings, target: str) -> dict[int, Path]:
    """GPU index -> log file of ``target`` (``all`` or one GPU index) in the applied plan.

    Raises:
        OrchestratorError: nothing was started here. PlanError: a bad ``target``.
    """
    plan = applied_plan(Layout(settings.root))
    if plan is None:
        raise OrchestratorError("nothing has been started here: run `orchestrator up`")
    return {i.index: i.log_file for i in select_instances(plan, target)}


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of ``path`` (none when it does not exist yet)."""
    try:
        with path.open("rb") as fh:
            return [line.decode(errors="replace").rstrip("\n") for line in collections.deque(fh, maxlen=n)]
    except FileNotFoundError:
        return []


def tail(paths: Mapping[int, Path], n: int) -> Iterator[LogLine]:
    """The last ``n`` lines of each file, file by file."""
    for gpu, path in paths.items():
        for line in tail_lines(path, n):
            yield LogLine(gpu, line)


def follow(
    paths: Mapping[int, Path], stop: Callable[[], bool], *, interval: float = 0.2
) -> Iterator[LogLine]:
    """New lines of every file as they arrive, until ``stop()``; survives rotation and truncation."""
    offsets = {k: (p.stat().st_size if p.exists() else 0) for k, p in paths.items()}
    partial = dict.fromkeys(paths, "")
    while not stop():
        for gpu, path in paths.items():
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < offsets[gpu]:
                offsets[gpu] = 0  # rotated or truncated
            if size == offsets[gpu]:
                continue
            with path.open("rb") as fh:
                fh.seek(offsets[gpu])
                chunk = fh.read(size - offsets[gpu])
            offsets[gpu] = size
            text = partial[gpu] + chunk.decode(errors="replace")
            *lines, partial[gpu] = text.split("\n")
            for line in lines:
                yield LogLine(gpu, line)
        time.sleep(interval)
