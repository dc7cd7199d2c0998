"""cgroup v2 memory limits for the instances, where this process may create child cgroups.

:func:`detect` says whether the orchestrator can enforce ``memory.max``: the machine runs the
unified hierarchy (``/sys/fs/cgroup/cgroup.controllers`` exists), the ``memory`` controller is
available in our own cgroup (read from ``/proc/self/cgroup``), and that cgroup directory is
writable by us (a container with a delegated cgroup namespace, or root on the host). Otherwise
it answers ``cgroup: unavailable (<why>)`` and the budgets are enforced by recycling alone.

:class:`MemoryCgroups` then creates ``<our cgroup>/comfyui_gpu{N}`` with ``memory.max`` set to
the budget, and moves each new instance process into it (children it forks later follow). The
cgroup v2 rule that a cgroup with member processes cannot give controllers to its children is
met by moving our own processes into a ``<our cgroup>/orchestrator`` leaf first, as container
runtimes do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
LEAF = "orchestrator"


@dataclasses.dataclass(frozen=True)
class CgroupSupport:
    """Whether memory limits can be enforced, where, and why not."""

    available: bool
    path: Path | None  # our own cgroup directory
    why: str = ""

    def describe(self) -> str:
        return f"cgroup: v2 memory.max under {self.path}" if self.available else f"cgroup: unavailable ({self.why})"


def _own_cgroup(text: str) -> str | None:
    """The unified hierarchy's path from ``/proc/self/cgroup`` (the ``0::/path`` line)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return None


def detect(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> CgroupSupport:
    """Whether this process can create child cgroups with ``memory.max`` (see the module's docstring)."""
    if not (root / "cgroup.controllers").is_file():
        return CgroupSupport(False, None, f"not cgroup v2: {root}/cgroup.controllers is missing (cgroup v1 or none)")
    try:
        own = _own_cgroup(self_cgroup.read_text())
    except OSError as exc:
        return CgroupSupport(False, None, f"cannot read {self_cgroup}: {exc.strerror or exc}")
    if own is None:
        return CgroupSupport(False, None, f"{self_cgroup} names no cgroup v2 path")
    path = root / own.lstrip("/")
    if path.name == LEAF and path != root:
        path = path.parent  # an earlier monitor moved us into our leaf: the instances' parent is above it
    try:
        controllers = (path / "cgroup.controllers").read_text().split()
    except OSError as exc:
        return CgroupSupport(False, path, f"cannot read {path}/cgroup.controllers: {exc.strerror or exc}")
    if "memory" not in controllers:
        return CgroupSupport(False, path, f"the memory controller is not delegated to {path}")
    if not os.access(path, os.W_OK) or not os.access(path / "cgroup.subtree_control", os.W_OK):
        return CgroupSupport(False, path, f"{path} is not writable by this user")
    return CgroupSupport(True, path)


class CgroupError(OSError):
    """A cgroup could not be created, limited or joined (the message says which and why)."""


class MemoryCgroups:
    """The instances' cgroups under ``support.path`` (only when ``support.available``)."""

    def __init__(self, support: CgroupSupport) -> None:
        if not support.available or support.path is None:
            raise CgroupError(support.describe())
        self.base = support.path
        self._prepared = False

    def _prepare(self) -> None:
        """Move our own cgroup's processes into a leaf, then give ``memory`` to the children."""
        if self._prepared:
            return
        control = self.base / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            leaf = self.base / LEAF
            leaf.mkdir(exist_ok=True)
            for pid in (self.base / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, OSError):
                    (leaf / "cgroup.procs").write_text(pid)
            try:
                control.write_text("+memory")
            except OSError as exc:
                why = "processes left in it" if exc.errno == errno.EBUSY else (exc.strerror or str(exc))
                raise CgroupError(f"cannot enable memory for the children of {self.base}: {why}") from None
        self._prepared = True

    def limit(self, name: str, max_bytes: int) -> Path:
        """Create (or reuse) the cgroup ``name`` with ``memory.max`` = ``max_bytes``; its directory."""
        try:
            self._prepare()
            path = self.base / name
            path.mkdir(exist_ok=True)
            (path / "memory.max").write_text(str(max_bytes))
        except CgroupError:
            raise
        except OSError as exc:
            raise CgroupError(f"cannot limit {self.base / name}: {exc.strerror or exc}") from None
        return path

    def join(self, name: str, pid: int) -> None:
        """Move process ``pid`` into the cgroup ``name`` (a vanished process is no error)."""
        try:
            (self.base / name / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            return
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                return
            raise CgroupError(f"cannot move pid {pid} into {self.base / name}: {exc.strerror or exc}") from None

    def members(self, name: str) -> list[int]:
        try:
            return [int(p) for p in (self.base / name / "cgroup.procs").read_text().split()]
        except OSError:
            return []
