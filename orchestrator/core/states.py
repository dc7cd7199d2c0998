"""Process and instance states. Bottom of the import graph: imports nothing from the project."""

from __future__ import annotations

import enum


class ProcessState(enum.IntEnum):
    """supervisord's process state codes, as ``getProcessInfo()['state']`` returns them."""

    STOPPED = 0
    STARTING = 10
    RUNNING = 20
    BACKOFF = 30
    STOPPING = 40
    EXITED = 100
    FATAL = 200
    UNKNOWN = 1000

    @classmethod
    def from_code(cls, code: int) -> ProcessState:
        try:
            return cls(code)
        except ValueError:
            return cls.UNKNOWN


RUNNING_STATES = frozenset({ProcessState.RUNNING, ProcessState.BACKOFF, ProcessState.STARTING})
STOPPED_STATES = frozenset(
    {ProcessState.STOPPED, ProcessState.EXITED, ProcessState.FATAL, ProcessState.UNKNOWN}
)


class InstanceState(enum.Enum):
    """The monitor's view of one ComfyUI instance (DESIGN.md, "Instance states")."""

    STARTING = "STARTING"
    READY = "READY"
    UNHEALTHY = "UNHEALTHY"
    RESTARTING = "RESTARTING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"
    STOPPED = "STOPPED"

    @property
    def code(self) -> int:
        """A stable number for the ``comfyui_instance_state`` gauge."""
        return _STATE_CODES[self]


_STATE_CODES = {
    InstanceState.STOPPED: 0,
    InstanceState.STARTING: 1,
    InstanceState.READY: 2,
    InstanceState.UNHEALTHY: 3,
    InstanceState.RESTARTING: 4,
    InstanceState.BACKOFF: 5,
    InstanceState.FATAL: 6,
}
