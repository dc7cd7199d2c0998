"""Pure helpers for a node's dependencies and environment, and the command seam.

* ``.env``: ``${VAR}`` / ``${VAR:-default}`` expanded without a shell, python-dotenv quoting.
* pip: one install for many requirements files, the torch stack pinned by a constraints file.
* :class:`CommandRunner`: how pip, the torch query and custom scripts run (``run_command`` in
  production: :func:`orchestrator.machine.runner.run`, own session, deadline, tree kill).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from orchestrator.machine import runner as subproc

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


PROTECTED = ("torch", "torchvision", "torchaudio", "xformers")


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


def constraints_text(versions: Mapping[str, str]) -> str:
    """Pins for the installed torch stack, so no node can replace the GPU build."""
    lines = ["# Written by orchestrator: the installed torch stack, pinned for custom-node installs."]
    lines += [f"{name}=={versions[name]}" for name in PROTECTED if name in versions]
    return "\n".join(lines) + "\n"


def pip_command(
    python: str, requirement_files: Sequence[Path], constraints: Path | None, uv: str | None
) -> list[str]:
    """One install for many requirements files (``uv pip`` when available)."""
    if uv:
        argv = [uv, "pip", "install", "--python", python]
    else:
        argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    for req in requirement_files:
        argv += ["-r", str(req)]
    if constraints is not None:
        argv += ["-c", str(constraints)]
    return argv
