"""The orchestrator's exception tree.

    OrchestratorError            exit 1 unless stated
    ├── ConfigError              bad settings or input file (exit 2)
    ├── GpuError                 NVML missing, unknown GPU selection
    ├── PlanError                conflicting COMFY_ARGS, busy port
    ├── ProvisionError           git, custom nodes, pip
    ├── ModelError               model tree, manifest, downloads
    ├── SupervisorError          supervisord not running, XML-RPC faults
    └── JobError                 job validation, routing, tracking

Every error carries a one-line message meant for the user; the CLI prints it without a
traceback and exits with ``exit_code``.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class: a one-line, user-facing message and an exit code."""

    exit_code: int = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class ConfigError(OrchestratorError):
    """A setting, flag or input file is invalid."""

    exit_code = 2


class GpuError(OrchestratorError):
    """GPU detection or selection failed."""


class PlanError(OrchestratorError):
    """The machine plan cannot be built or applied (conflicting args, busy port)."""


class ProvisionError(OrchestratorError):
    """Fetching code or installing custom nodes failed."""


class ModelError(OrchestratorError):
    """Model tree, manifest or download failure."""


class SupervisorError(OrchestratorError):
    """Talking to supervisord failed."""


class JobError(OrchestratorError):
    """A job could not be validated, routed or tracked."""
