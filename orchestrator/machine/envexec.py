"""Run a program with variables from a private file: ``python -I -S …/machine/envexec.py FILE -- ARGV…``.

supervisord starts the orchestrator's own programs (monitor, background downloads, cleanup)
through this wrapper, so that each gets the settings ``up`` saw and the secrets it needs without
them passing through supervisord. supervisord hands its own environment to every program and a
program's ``environment=`` can only add to it; so supervisord runs with the allow-list only (see
``core.environment``), and what a program needs beyond that is in ``FILE``, a JSON object of
variable → value that ``up`` writes with mode 0600 under ``$ROOT/.orchestrator/env/`` (0700). The
wrapper adds those variables to its environment and *execs* ``ARGV``: same pid, and the
variables are the program's own environment (``/proc/<pid>/environ``), not supervisord's or an
instance's. A file is used rather than ``environment=`` in supervisord.conf so that no secret is
written to the conf and any value (quotes, commas) passes unchanged.

Like ``pdeath.py`` it runs as a script in isolated mode without ``site``, importing only ``json``,
``os`` and ``sys``.
"""

from __future__ import annotations

import json
import os
import sys


def read_env_file(path: str) -> dict[str, str] | None:
    """The variables in ``path``, or None when it is missing or not a JSON object of strings."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return None
    return data


def main(argv: list[str]) -> int:
    """Add FILE's variables to the environment, then exec the program after ``--``."""
    if len(argv) < 3 or argv[1] != "--":
        os.write(2, b"usage: python -m orchestrator.machine.envexec FILE -- PROGRAM [ARG...]\n")
        return 2
    path, program = argv[0], argv[2:]
    env = read_env_file(path)
    if env is None:
        os.write(2, f"{path} is missing or damaged: run `orchestrator up` to rewrite it\n".encode(errors="replace"))
        return 2
    try:
        os.execvpe(program[0], program, {**os.environ, **env})  # noqa: S606 - exec'ing our own program argv
    except OSError as exc:
        os.write(2, f"cannot run {program[0]}: {exc.strerror}\n".encode(errors="replace"))
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
