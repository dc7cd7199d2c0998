"""Gather what an instance would see at its start (:class:`core.generation.GenerationInputs`),
keep the current generation in ``$ROOT/.orchestrator/generation.json``, and read the generation a
running process started with (its ``ORCHESTRATOR_GENERATION`` variable).

The fingerprint and the comparison are pure (:mod:`orchestrator.core.generation`); this module reads
the disk: the ComfyUI checkout's HEAD, each custom node's HEAD (or its files), ``.env`` and
requirements, the installed distributions of the instances' Python, the model paths and static links.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.core.generation import ENV_VAR, GenerationInputs, digest, fingerprint
from orchestrator.core.layout import Layout
from orchestrator.core.plan import MachinePlan
from orchestrator.core.settings import Settings
from orchestrator.machine import runner as subproc
from orchestrator.machine.fs import read_json, write_json
from orchestrator.machine.generation import process_generation, state_file
from orchestrator.provision.git.worktree import read_head

log = logging.getLogger(__name__)

# The distributions installed where pip installs (name-version.dist-info): a listing, not a parse.
_PACKAGES = (
    "import os, sysconfig\n"
    "dirs = sorted({sysconfig.get_paths()[k] for k in ('purelib', 'platlib')})\n"
    "print('\\n'.join(sorted({n for d in dirs if os.path.isdir(d) for n in os.listdir(d)"
    " if n.endswith(('.dist-info', '.egg-info', '.pth'))})))"
)
# Per-instance values (its own GPU) that do not make one instance's generation differ from another's.
_OWN_ENV = frozenset({"CUDA_VISIBLE_DEVICES"})
_OWN_FLAGS = frozenset({
    "--port", "--output-directory", "--temp-directory", "--input-directory", "--user-directory", "--database-url",
})


@dataclasses.dataclass(frozen=True)
class Generation:
    """The generation ``up`` computed: its id and the components it was computed from."""

    id: str
    components: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "components": dict(self.components)}


def _file_digest(path: Path) -> str:
    try:
        return digest(path.read_bytes())
    except OSError:
        return ""


# Folders of a code tree that are data, not code (custom nodes are counted one by one).
_NOT_CODE = frozenset({"__pycache__", ".git", "custom_nodes", "models", "input", "output", "temp", "user"})


def _tree_digest(path: Path) -> str:
    """A folder that is not a git checkout: names, sizes and mtimes of its files (not their bytes)."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_CODE)
        for name in sorted(filenames):
            p = Path(dirpath, name)
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
    return digest(entries)


def node_digests(nodes_dir: Path) -> dict[str, str]:
    """Each custom node (folder or single .py) ComfyUI would load: its commit or files, .env, requirements."""
    out: dict[str, str] = {}
    try:
        entries = sorted(nodes_dir.iterdir())
    except OSError:
        return out
    for path in entries:
        name = path.name
        if name.startswith(".") or name == "__pycache__" or name.endswith(".disabled"):
            continue
        if path.is_file():
            if path.suffix == ".py":
                out[name] = _file_digest(path)
            continue
        code = read_head(path) if (path / ".git").exists() else None
        out[name] = digest([
            code or _tree_digest(path), _file_digest(path / ".env"), _file_digest(path / "requirements.txt"),
        ])
    return out


def _own_packages() -> str:
    """What :data:`_PACKAGES` prints, for this interpreter, without starting another."""
    dirs = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    suffixes = (".dist-info", ".egg-info", ".pth")
    names = sorted({n for d in dirs if os.path.isdir(d) for n in os.listdir(d) if n.endswith(suffixes)})
    return digest(("\n".join(names) + "\n").encode())


def installed_packages(python: str, timeout: float = 60) -> str:
    """Digest of ``name==version`` of every distribution the instances' Python sees ("" if unknown)."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return _own_packages()  # the same interpreter: no second Python to start
    try:
        done = subproc.run([python, "-I", "-c", _PACKAGES], cwd=None, env={"PATH": os.environ.get("PATH", "")},
                           timeout=timeout, merge_stderr=False)
    except OSError as exc:
        log.warning("cannot list the packages of %s: %s", python, exc)
        return ""
    if done.timed_out or done.returncode != 0:
        log.warning("cannot list the packages of %s (exit %s)", python, done.returncode)
        return ""
    return digest(done.stdout)


def _shared_argv(argv: tuple[str, ...]) -> tuple[str, ...]:
    """An instance's argv without its own port and folders (what every instance shares)."""
    out: list[str] = []
    skip = False
    for arg in argv[1:]:  # argv[0] is the interpreter, kept apart
        if skip:
            skip = False
            continue
        if arg in _OWN_FLAGS:
            skip = True
            continue
        out.append(arg)
    return tuple(out)


def gather(settings: Settings, layout: Layout, plan: MachinePlan, instance_env: Mapping[str, str]) -> GenerationInputs:
    """Read every input of the generation from the disk (a second or less: one Python start)."""
    first = plan.instances[0] if plan.instances else None
    env = {**(dict(first.env) if first else {}), **instance_env}
    return GenerationInputs(
        comfy_commit=read_head(layout.comfy_dir) or _tree_digest(layout.comfy_dir),
        nodes=node_digests(layout.custom_nodes_dir),
        requirements=installed_packages(settings.python),
        model_paths=_file_digest(layout.extra_model_paths),
        static_links=_file_digest(layout.static_models),
        argv=(settings.python, *(_shared_argv(first.argv) if first else ())),
        env={k: digest(v) for k, v in env.items() if k not in _OWN_ENV and k != ENV_VAR},
    )


def compute(settings: Settings, layout: Layout, plan: MachinePlan, instance_env: Mapping[str, str]) -> Generation:
    inputs = gather(settings, layout, plan, instance_env)
    return Generation(fingerprint(inputs), inputs.components())


def recorded(layout: Layout) -> Generation | None:
    """The generation the last ``up`` recorded (None when none, or unreadable)."""
    data = read_json(state_file(layout), None)
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return None
    return Generation(data["id"], data.get("components") or {})


def record(layout: Layout, generation: Generation, previous: Generation | None) -> None:
    """Keep ``generation`` (and the components of the one before, for the reasons) in the state file."""
    data = generation.to_dict()
    if previous is not None and previous.id != generation.id:
        data["previous"] = previous.to_dict()
    elif previous is not None:
        old = read_json(state_file(layout), {}) or {}
        if isinstance(old, dict) and isinstance(old.get("previous"), dict):
            data["previous"] = old["previous"]
    write_json(state_file(layout), data)


__all__ = ["Generation", "compute", "gather", "process_generation", "record", "recorded"]
