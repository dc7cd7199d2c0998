"""Where everything lives under ``$ROOT`` (DESIGN.md, "On disk")."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Layout:
    root: Path
    # Where the shared config is read from when $ROOT/shared has none: set only by
    # orchestrator.provision.repos.sync.resolve_shared for read-only commands (the shipped defaults, in place).
    shared: Path | None = dataclasses.field(default=None, compare=False)

    @property
    def comfy_dir(self) -> Path:
        """The one ComfyUI code tree shared by every instance."""
        return self.root / "ComfyUI"

    @property
    def shared_dir(self) -> Path:
        return self.shared or self.root / "shared"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.comfy_dir / "custom_nodes"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def state_dir(self) -> Path:
        return self.root / ".orchestrator"

    @property
    def supervisord_conf(self) -> Path:
        return self.state_dir / "supervisord.conf"

    @property
    def socket(self) -> Path:
        """supervisord's control socket; AF_UNIX paths are limited to 107 bytes, so a deep ROOT
        gets a short private folder in the temp dir instead (created 0700 by `up`)."""
        path = self.state_dir / "supervisor.sock"
        if len(os.fsencode(path)) <= 100:
            return path
        digest = hashlib.sha256(os.fsencode(self.root.resolve())).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"orchestrator-{digest}" / "supervisor.sock"

    @property
    def supervisord_pid(self) -> Path:
        return self.state_dir / "supervisord.pid"

    @property
    def supervisord_log(self) -> Path:
        return self.logs_dir / "supervisord.log"

    @property
    def orchestrator_log(self) -> Path:
        return self.logs_dir / "orchestrator.log"

    @property
    def extra_model_paths(self) -> Path:
        """comfy_dir_config.yaml with its base path rebased under $ROOT (passed to ComfyUI)."""
        return self.state_dir / "extra_model_paths.yaml"

    @property
    def static_models(self) -> Path:
        return self.shared_dir / "static-models.json"

    @property
    def plan_file(self) -> Path:
        """The plan last applied by `up`, read by the monitor and the CLI."""
        return self.state_dir / "plan.json"

    @property
    def jobs_dir(self) -> Path:
        """The job journal: one record per accepted job (jobs/journal.py)."""
        return self.state_dir / "jobs"

    @property
    def status_file(self) -> Path:
        """Provisioning status (fallback in use, failed nodes) for `status` and metrics."""
        return self.state_dir / "status.json"

    @property
    def models_status_file(self) -> Path:
        """Download progress, written by `models sync`, read by `models status` and the monitor."""
        return self.state_dir / "models_status.json"

    @property
    def cleanup_status_file(self) -> Path:
        return self.state_dir / "cleanup_status.json"

    def instance_dir(self, index: int) -> Path:
        return self.root / f"comfyui_gpu{index}"

    def instance_log(self, index: int) -> Path:
        return self.instance_dir(index) / "logs" / "output.log"


# ---------------------------------------------------------------- the running demo
# `orchestrator demo` picks a temp ROOT; it records it here while it runs so that read-only
# commands given no ROOT (flag, env or settings file) look at the demo rather than /workspace.
DEMO_SETTINGS = ("ROOT", "MOCK_GPU", "NUM_GPUS", "MOCK_GPU_MEMORY_MB", "WORKER_BASE_COMFYUI_PORT",
                 "ORCHESTRATOR_LISTEN", "ORCHESTRATOR_PORT")
