"""Run a program so that it dies with its parent: ``python -I -S …/machine/pdeath.py -- ARGV…``.

supervisord starts every instance (and the batch programs: background downloads, cleanup)
through this wrapper. It sets ``PR_SET_PDEATHSIG`` = SIGKILL and then *execs* ``ARGV``: the
program keeps the pid supervisord forked (so supervisord still signals, stops and reaps it), and
the kernel kills it the moment supervisord dies, even by SIGKILL. Without it a killed supervisord
leaves every ComfyUI re-parented to init, serving and holding its port, and the next ``up`` fails.

Why this and not the alternatives:

* a cgroup (systemd scope, ``cgroup.kill``) needs a delegated cgroup tree, which containers and
  plain shells usually do not give us;
* ``setpriv --pdeathsig`` (util-linux) is the same mechanism but is not in every slim image;
* supervisord itself has no such option.

The signal survives ``execve`` (not for set-uid binaries, which we never run). It is *not*
inherited by the program's own children; a ComfyUI's helpers run in its process group, which
supervisord stops as a group (``stopasgroup``) and ``up`` clears from the port it finds held.

The monitor is deliberately not wrapped: it outlives supervisord to answer ``/readyz`` with 503
(and ``/healthz`` with 503), so load balancers and alerts see the failure instead of a refused
connection; ``up`` recognises it as this ROOT's and stops it before starting a new generation.

This file runs before every instance start, as a script in isolated mode without ``site``
(``python -I -S path/to/pdeath.py -- ARGV``, see ``lifecycle.launch.pdeath_wrapper``): it imports
only the standard library's ``os``, ``sys``, ``signal`` and ``ctypes``, and about 40 ms pass
before the exec. ``python -m orchestrator.machine.pdeath`` works too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return bool(prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)


def main(argv: list[str]) -> int:
    """Set the parent-death signal, then exec ``argv`` (after an optional ``--``)."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        os.write(2, b"usage: python -m orchestrator.machine.pdeath -- PROGRAM [ARG...]\n")
        return 2
    parent = os.getppid()
    set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was armed: do not start orphaned
        return 137
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - exec'ing supervisord's program argv is the point
    except OSError as exc:
        os.write(2, f"cannot run {argv[0]}: {exc.strerror}\n".encode(errors="replace"))
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
