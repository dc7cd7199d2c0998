"""Running a child command with a deadline that holds, and that dies with us.

* The child starts in its own session (so its own process group). At the deadline the group is
  killed, and so is every descendant found under the child (a helper that called ``setsid``
  included, while its parent is still there to find it by).
* Output goes to temporary files, never pipes: a background grandchild (``sleep 300 &``, a
  custom_script's helper) that inherited stdout cannot keep us waiting after the child exits.
* On Linux the child gets ``PR_SET_PDEATHSIG`` = SIGKILL: a SIGKILLed ``up`` does not leave its
  pip or git running (a second ``up`` could otherwise run two pips at once). The signal follows
  the *thread* that started the child; :func:`run` waits for the child in that same thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

_PR_SET_PDEATHSIG = 1


@functools.cache
def _load_prctl() -> Any:
    """libc's prctl, loaded once on first use (in the parent: nothing is loaded between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return prctl


def die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies (Linux; else None)."""
    prctl = _load_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(137)

    return preexec


@dataclasses.dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes  # empty when stderr was merged into stdout
    timed_out: bool
    seconds: float


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every descendant of ``pid`` that can still be found."""
    descendants: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        descendants = psutil.Process(pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()  # psutil checks the create time: a reused pid is left alone


def _read(f: IO[bytes]) -> bytes:
    f.seek(0)
    return f.read()


def run(
    argv: Sequence[str],
    *,
    cwd: Path | str | None,
    env: Mapping[str, str],
    timeout: float | None,
    merge_stderr: bool = True,
    die_with_parent: bool = True,
) -> Completed:
    """Run ``argv`` to completion or until ``timeout`` seconds pass (then kill it and its tree).

    Raises ``OSError`` when the program cannot be started.
    """
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # err stays empty when merged
        proc = subprocess.Popen(  # noqa: S603 - THE runner: a list argv (no shell), chosen by its caller
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if merge_stderr else err,
            start_new_session=True,
            preexec_fn=die_with_parent_hook() if die_with_parent else None,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(proc.pid)
            proc.wait()
        except BaseException:  # interrupted (KeyboardInterrupt): leave nothing behind
            kill_tree(proc.pid)
            proc.wait()
            raise
        return Completed(proc.returncode, _read(out), _read(err), timed_out, time.monotonic() - start)
