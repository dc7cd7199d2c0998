"""Pure helpers for a node's dependencies and environment, and the command seam.

* ``.env``: ``${VAR}`` / ``${VAR:-default}`` expanded without a shell, python-dotenv quoting.
* pip: one install for many requirements files, the torch stack pinned by a constraints file.
* :class:`CommandRunner`: how pip, the torch query and custom scripts run (``run_command`` in
  production: :func:`orchestrator.machine.runner.run`, own session, deadline, tree kill).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from orchestrator.core.errors import ProvisionError
from orchestrator.machine import runner as subproc
from orchestrator.provision.nodes import firewall

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


_PLAIN = re.compile(r"^[A-Za-z0-9_./:,@+%=-]*$")


def substitute(template: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand ``${VAR}`` and ``${VAR:-default}`` without a shell; return (value, unset names)."""
    unset: list[str] = []

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if default is not None:
            return value if value else default
        if value is None:
            unset.append(name)
            return ""
        return value

    return _VAR.sub(repl, template), unset


def dotenv_line(key: str, value: str) -> str:
    """A python-dotenv line; anything but plain characters is single-quoted (no interpolation)."""
    if _PLAIN.match(value):
        return f"{key}={value}"
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{escaped}'"


def render_env(env: Sequence[tuple[str, str]], environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """The .env text for a node and the variables that were unset."""
    lines = ["# Written by orchestrator from config_nodes.json; edits are overwritten."]
    unset: list[str] = []
    for key, template in env:
        value, missing = substitute(template, environ)
        unset += missing
        lines.append(dotenv_line(key, value))
    return "\n".join(lines) + "\n", unset


@dataclasses.dataclass(frozen=True)
class CmdResult:
    returncode: int
    output: str
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def tail(self, lines: int = 3) -> str:
        kept = [ln.strip() for ln in self.output.strip().splitlines() if ln.strip()]
        return " | ".join(kept[-lines:]) or f"exit status {self.returncode}"


class CommandRunner(Protocol):
    def __call__(
        self, argv: Sequence[str], *, cwd: Path | None, env: Mapping[str, str], timeout: float
    ) -> CmdResult: ...


def run_command(
    argv: Sequence[str], *, cwd: Path | None, env: Mapping[str, str], timeout: float
) -> CmdResult:
    """Run a command in its own session; on timeout its whole tree is killed.

    Output is collected through a temporary file, so a background helper the command leaves
    behind (``sleep 300 &``) cannot hold us past the command's own exit; the command dies with
    this process (PR_SET_PDEATHSIG) so a killed ``up`` leaves no pip running (see subproc).
    """
    start = time.monotonic()
    try:
        done = subproc.run(argv, cwd=cwd, env=env, timeout=timeout)
    except OSError as exc:
        return CmdResult(
            127, f"cannot run {argv[0]}: {exc.strerror or exc}", seconds=time.monotonic() - start
        )
    text = done.stdout.decode(errors="replace")
    return CmdResult(done.returncode, text, done.timed_out, done.seconds)


# What ``TORCH_QUERY`` asks the target interpreter for: every protected distribution.
PROTECTED = firewall.PROTECTED


TORCH_QUERY = (
    "import importlib.metadata as m, json\n"
    "out = {}\n"
    f"for n in {PROTECTED!r}:\n"
    "    try:\n"
    "        out[n] = m.version(n)\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "print(json.dumps(out))\n"
)

# Every distribution installed in the target interpreter, canonical name -> version (the lock).
FREEZE_QUERY = (
    "import importlib.metadata as m, json, re\n"
    "out = {}\n"
    "for d in m.distributions():\n"
    "    n = d.metadata['Name']\n"
    "    if n:\n"
    "        out.setdefault(re.sub(r'[-_.]+', '-', n).lower(), d.version)\n"
    "print(json.dumps(out, sort_keys=True))\n"
)


def constraints_text(versions: Mapping[str, str]) -> str:
    """Pins for the protected packages, so no node can replace the GPU build (see firewall)."""
    lines = ["# Written by orchestrator: the protected packages, pinned for custom-node installs."]
    lines += list(firewall.constraint_lines(versions))
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Installer:
    """Who installs requirements: ``uv`` (the binary) or ``pip`` (``COMFY_PYTHON -m pip``)."""

    kind: str  # uv | pip
    path: str | None  # the uv binary; None for pip
    how: str  # how it was found, for the report

    def to_dict(self) -> dict[str, str | None]:
        return {"tool": self.kind, "path": self.path, "found": self.how}


def find_installer(choice: str, environ: Mapping[str, str], own_bin: Path) -> Installer:
    """NODES_INSTALLER: ``uv`` next to the orchestrator's interpreter (the ``uv`` dependency),
    else ``uv`` on PATH; ``pip`` (``COMFY_PYTHON -m pip``) when choice is pip or auto finds no uv.

    Raises:
        ProvisionError: NODES_INSTALLER=uv and no uv binary is found.
    """
    if choice != "pip":
        beside = own_bin / "uv"
        if beside.is_file() and os.access(beside, os.X_OK):
            return Installer("uv", str(beside), f"beside the orchestrator's interpreter ({own_bin})")
        on_path = shutil.which("uv", path=environ.get("PATH"))
        if on_path:
            return Installer("uv", on_path, "on PATH")
        if choice == "uv":
            raise ProvisionError(
                f"NODES_INSTALLER=uv but no uv binary is beside {own_bin} or on PATH: "
                "pip install uv, or set NODES_INSTALLER=auto"
            )
    how = "NODES_INSTALLER=pip" if choice == "pip" else "no uv beside the interpreter or on PATH"
    return Installer("pip", None, how)


def _uv_index_flags(environ: Mapping[str, str]) -> list[str]:
    """pip's index settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX) as
    uv flags, unless the uv variables say otherwise: one index configuration for both."""
    if any(k in environ for k in ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_FIND_LINKS")):
        return []
    flags: list[str] = []
    if environ.get("PIP_NO_INDEX", "").lower() in {"1", "true", "yes", "on"}:
        flags.append("--no-index")
    elif environ.get("PIP_INDEX_URL"):
        flags += ["--index-url", environ["PIP_INDEX_URL"]]
    extra = environ.get("PIP_EXTRA_INDEX_URL", "").split()
    for url in extra:
        flags += ["--extra-index-url", url]
    for link in environ.get("PIP_FIND_LINKS", "").split():
        flags += ["--find-links", link]
    if extra and "UV_INDEX_STRATEGY" not in environ:
        flags += ["--index-strategy", "unsafe-best-match"]  # pip's rule: best version of all indexes
    return flags


def pip_command(
    python: str,
    requirement_files: Sequence[Path],
    constraints: Path | None,
    uv: str | None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """One install for many requirements files (``uv pip`` when available)."""
    if uv:
        argv = [uv, "pip", "install", "--python", python, *_uv_index_flags(environ or {})]
    else:
        argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    for req in requirement_files:
        argv += ["-r", str(req)]
    if constraints is not None:
        argv += ["-c", str(constraints)]
    return argv
