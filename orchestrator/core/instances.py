"""The monitor's view of instances, as other parts (the job router) consume it."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from orchestrator.core.states import InstanceState


@dataclasses.dataclass(frozen=True)
class InstanceView:
    """What the job router needs to know about one instance at this moment."""

    index: int  # GPU index
    name: str  # comfyui_gpu{N}
    port: int
    state: InstanceState
    queue_pending: int = 0
    queue_running: int = 0
    fenced: str = ""  # why no job may be routed here although it may be READY (a failed GPU, a drain)
    draining: bool = False  # taken out of routing for a planned restart (monitor.drain)

    @property
    def ready(self) -> bool:
        return self.state is InstanceState.READY and not self.draining

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class InstanceDirectory(Protocol):
    """Implemented by the monitor; faked in tests."""

    def snapshot(self) -> list[InstanceView]:
        """The latest view of every planned instance (never blocks on a probe)."""
        ...

    def report_hung(self, index: int, reason: str) -> None:
        """A job found the instance stuck (e.g. an execution past its deadline)."""
        ...
