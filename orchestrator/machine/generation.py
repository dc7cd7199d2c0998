"""Where generations are read on the machine: the current one (``.orchestrator/generation.json``,
written by ``up``) and the one a running process started with (its ``ORCHESTRATOR_GENERATION``).

Both the monitor (to show each instance's generation) and ``up`` (to choose what to roll) read
them here; what a generation is: :mod:`orchestrator.core.generation`.
"""

from __future__ import annotations

from pathlib import Path

import psutil

from orchestrator.core.generation import ENV_VAR
from orchestrator.core.layout import Layout
from orchestrator.machine.fs import read_json

STATE_NAME = "generation.json"


def state_file(layout: Layout) -> Path:
    return layout.state_dir / STATE_NAME


def current_id(layout: Layout) -> str | None:
    """The id of the generation the last ``up`` applied (None before the first)."""
    data = read_json(state_file(layout), None)
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


class CurrentGeneration:
    """:func:`current_id`, read again only when the file changed (the monitor asks on every view)."""

    def __init__(self, layout: Layout) -> None:
        self.path = state_file(layout)
        self._layout = layout
        self._stamp: tuple[int, int, int] | None = None
        self._value: str | None = None

    def get(self) -> str | None:
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # written by rename: a new inode each time
        except OSError:
            return None
        if stamp != self._stamp:
            self._value, self._stamp = current_id(self._layout), stamp
        return self._value


def process_generation(pid: int | None) -> str | None:
    """The generation a running process started with (its ``ORCHESTRATOR_GENERATION``), None if unknown."""
    if not pid:
        return None
    try:
        return psutil.Process(pid).environ().get(ENV_VAR) or None
    except (psutil.Error, OSError):
        return None
