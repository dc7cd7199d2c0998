"""The machine's own files outside the plan's values: the applied plan, instance folders, the demo pointer.

The pointer (``$XDG_RUNTIME_DIR/comfy-orchestrator/demo.json``) lets read-only commands find a
running ``orchestrator demo`` when no ROOT was given.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from orchestrator.core.errors import OrchestratorError
from orchestrator.core.layout import DEMO_SETTINGS, Layout
from orchestrator.core.plan import MachinePlan
from orchestrator.machine.fs import read_json, write_json

log = logging.getLogger(__name__)


def create_instance_dirs(plan: MachinePlan, umask: int = 0o077) -> None:
    """Create each instance's folders (ComfyUI refuses a missing --user-directory) and the logs
    folder, with mode ``0o777 & ~umask`` (0700 by default: outputs, uploads and logs are private
    to the user); folders left by an earlier, looser `up` are tightened (or relaxed) to it."""
    mode = 0o777 & ~umask
    folders = [Layout(plan.root).logs_dir]
    for inst in plan.instances:
        folders += [inst.directory, inst.output_dir, inst.temp_dir, inst.input_dir, inst.user_dir, inst.logs_dir]
    for d in folders:
        d.mkdir(mode=mode, parents=True, exist_ok=True)
        try:
            d.chmod(mode)
        except OSError as exc:  # a mount without modes, or a folder another user owns
            log.warning("cannot set mode %03o on %s: %s", mode, d, exc.strerror or exc)


def applied_plan(layout: Layout) -> MachinePlan | None:
    """The plan the last `orchestrator up` applied (``plan.json``), or None when there is none
    or it cannot be read."""
    data = read_json(layout.plan_file)
    if not isinstance(data, dict):
        return None
    try:
        return MachinePlan.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def damaged(path: Path) -> str:
    """The one line for a state file that exists but cannot be used."""
    return f"{path} is damaged or unreadable: run `orchestrator up` to rewrite it"


def load_applied_plan(layout: Layout) -> MachinePlan | None:
    """Like :func:`applied_plan`, but a ``plan.json`` that exists and is damaged is an error.

    Raises:
        OrchestratorError: naming the file and the recovery (never a traceback).
    """
    if not (layout.plan_file.exists() or layout.plan_file.is_symlink()):
        return None
    plan = applied_plan(layout)
    if plan is None:
        raise OrchestratorError(damaged(layout.plan_file))
    return plan


def read_state(path: Path) -> dict[str, Any]:
    """A JSON object state file (status.json…): {} when missing.

    Raises:
        OrchestratorError: the file exists but is not a JSON object (garbage bytes included).
    """
    if not (path.exists() or path.is_symlink()):
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise OrchestratorError(damaged(path))
    return data


def demo_pointer() -> Path:
    """Per user: ``$XDG_RUNTIME_DIR/comfy-orchestrator/demo.json``, else ``~/.cache/…``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = Path(runtime) if runtime and os.path.isabs(runtime) else Path.home() / ".cache"
    return base / "comfy-orchestrator" / "demo.json"


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid exists (any user's); False for anything that is not a pid."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_demo_pointer(settings: dict[str, str], pid: int | None = None) -> Path:
    path = demo_pointer()
    chosen = {k: v for k, v in settings.items() if k in DEMO_SETTINGS}
    write_json(path, {"pid": pid or os.getpid(), "settings": chosen}, mode=0o600)
    return path


def remove_demo_pointer(pid: int | None = None) -> None:
    """Remove the pointer if it is this process's (a newer demo's pointer is left alone)."""
    path = demo_pointer()
    data = read_json(path)
    if isinstance(data, dict) and data.get("pid") == (pid or os.getpid()):
        with contextlib.suppress(OSError):
            path.unlink()


def running_demo() -> dict[str, str] | None:
    """The settings of the demo that is running now (ROOT, MOCK_GPU, NUM_GPUS…), else None."""
    data = read_json(demo_pointer())
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        return None
    pid, chosen = data.get("pid"), data["settings"]
    if not pid_alive(pid):
        return None
    root = chosen.get("ROOT")
    if not isinstance(root, str) or not (Path(root) / ".orchestrator").is_dir():
        return None
    return {str(k): str(v) for k, v in chosen.items() if k in DEMO_SETTINGS}
