"""One provisioning operation per ROOT: ``up`` and ``nodes sync`` hold ``$ROOT/.orchestrator/lock``.

Two of them at once would run two pips into one venv, or clone over each other. The lock is an
``flock`` on a close-on-exec descriptor, so it goes away with its holder (a SIGKILLed ``up``
included) and is never inherited by pip, git or supervisord. ``up --foreground`` releases it
before it execs supervisord: a long-running supervisord or monitor never holds it, so a later
``up`` can still reconcile.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from orchestrator.core.errors import ProvisionError
from orchestrator.core.layout import Layout


def lock_path(layout: Layout) -> str:
    return str(layout.state_dir / "lock")


class RootLock:
    """A held lock; :meth:`release` is idempotent."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 64, 0).decode(errors="replace").split()
        if text:
            return str(int(text[0]))
    return "unknown"


def acquire(layout: Layout) -> RootLock:
    """Take the ROOT lock or raise :class:`ProvisionError` naming the process that holds it."""
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(layout), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ProvisionError(
            f"another orchestrator up/nodes sync is running on {layout.root} (pid {holder}); "
            "wait for it or stop it"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RootLock(fd)


@contextlib.contextmanager
def hold(layout: Layout) -> Iterator[RootLock]:
    """``with hold(layout) as lock:`` … ``lock.release()`` may end it early (before an exec)."""
    lock = acquire(layout)
    try:
        yield lock
    finally:
        lock.release()
