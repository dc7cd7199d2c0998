"""Child processes: deadlines that hold despite background grandchildren, children that die with
their parent, one up/nodes sync per ROOT, and `down` never killing a reused pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from support import clean_env, wait_until

from orchestrator.core.errors import ProvisionError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import load_settings
from orchestrator.lifecycle import down as lifecycle
from orchestrator.machine import lock as oplock
from orchestrator.provision.nodes import deps as nodes_deps

DEADLINE = 30.0  # generous: it only ends a failing test, it measures nothing


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture
def reap() -> Iterator[list[int]]:
    """Pids a test started indirectly; killed (if still there) at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


# ---------------------------------------------------------------- 2: background grandchildren
@pytest.mark.parametrize("spawn", ["sleep 300", "setsid sleep 300"])
def test_run_command_returns_when_a_background_grandchild_keeps_the_output_open(
    tmp_path: Path, reap: list[int], spawn: str
) -> None:
    pidfile = tmp_path / "pid"
    argv = ["sh", "-c", f'{spawn} & echo $! > "$PIDFILE"; echo hi']
    t, box = _in_thread(
        lambda: nodes_deps.run_command(argv, cwd=tmp_path, env={**os.environ, "PIDFILE": str(pidfile)}, timeout=120)
    )
    assert wait_until(lambda: _read_pid(pidfile) is not None, DEADLINE)
    reap.append(_read_pid(pidfile) or 0)
    # Before the fix the call read the pipe until the 300 s helper exited (or 120 s timeout).
    assert wait_until(lambda: not t.is_alive(), DEADLINE), "run_command waited on the helper's pipe"
    result = box[0]
    assert isinstance(result, nodes_deps.CmdResult)
    assert result.ok
    assert result.output.strip() == "hi"


def test_a_command_past_its_timeout_is_killed_with_its_grandchildren(tmp_path: Path, reap: list[int]) -> None:
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    script = 'sleep 300 & echo $! > "$P1"; setsid sleep 300 & echo $! > "$P2"; echo started; wait'
    t, box = _in_thread(
        lambda: nodes_deps.run_command(
            ["sh", "-c", script], cwd=tmp_path, env={**os.environ, "P1": str(p1), "P2": str(p2)}, timeout=2
        )
    )
    assert wait_until(lambda: _read_pid(p1) and _read_pid(p2), DEADLINE)
    grandchildren = [_read_pid(p1) or 0, _read_pid(p2) or 0]
    reap.extend(grandchildren)
    assert wait_until(lambda: not t.is_alive(), DEADLINE), "run_command did not return after its timeout"
    result = box[0]
    assert isinstance(result, nodes_deps.CmdResult)
    assert result.timed_out
    assert not result.ok
    assert "started" in result.output
    # The one in the child's process group and the one that called setsid are both gone.
    assert wait_until(lambda: all(_gone(pid) for pid in grandchildren), DEADLINE), grandchildren


# ---------------------------------------------------------------- 3: children die with their parent
RUNNER_SCRIPT = """
import os, sys
from pathlib import Path
from orchestrator.provision.nodes import deps as nodes_deps
nodes_deps.run_command(["sh", "-c", 'echo $$ > "$CHILD_PID"; exec sleep 300'], cwd=None, env=dict(os.environ), timeout=600)
"""


def test_a_sigkilled_parent_takes_its_running_command_with_it(tmp_path: Path, reap: list[int]) -> None:
    pidfile = tmp_path / "child"
    parent = subprocess.Popen(
        [sys.executable, "-c", RUNNER_SCRIPT], env=clean_env(CHILD_PID=str(pidfile)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: _read_pid(pidfile) is not None, DEADLINE)
        child = _read_pid(pidfile) or 0
        reap.append(child)
        assert not _gone(child)
        parent.kill()  # SIGKILL: no handler, no cleanup code runs
        parent.wait()
        # Before the fix the child (in its own session) ran on: a next `up` could run two pips.
        assert wait_until(lambda: _gone(child), DEADLINE), f"child {child} outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


LOCK_SCRIPT = """
import sys
from pathlib import Path
from orchestrator.machine import lock as oplock
from orchestrator.core.layout import Layout
lock = oplock.acquire(Layout(Path(sys.argv[1])))
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A ROOT whose lock another process holds; yields (root, holder pid)."""
    root = tmp_path / "root"
    root.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_SCRIPT, str(root)], env=clean_env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        yield root, holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_lock_holder_gets_one_clear_error(held_lock: tuple[Path, int]) -> None:
    root, pid = held_lock
    with pytest.raises(ProvisionError) as info:
        oplock.acquire(Layout(root))
    assert str(info.value) == (
        f"another orchestrator up/nodes sync is running on {root} (pid {pid}); wait for it or stop it"
    )


@pytest.mark.parametrize("command", [["up", "--skip-provision"], ["nodes", "sync"]])
def test_a_second_up_or_nodes_sync_on_one_root_fails_with_one_line(
    held_lock: tuple[Path, int], command: list[str]
) -> None:
    root, pid = held_lock
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", *command],
        env=clean_env(ROOT=str(root), MOCK_GPU="1", NUM_GPUS="1"), capture_output=True, text=True, timeout=120,
    )
    assert r.returncode != 0
    expected = f"another orchestrator up/nodes sync is running on {root} (pid {pid}); wait for it or stop it"
    assert expected in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    assert not (root / "ComfyUI").exists()


def test_the_lock_is_free_again_once_its_holder_releases_it(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    with oplock.hold(layout) as lock:
        with pytest.raises(ProvisionError):
            oplock.acquire(layout)
        lock.release()  # what `up --foreground` does before it execs supervisord
        oplock.acquire(layout).release()
    oplock.acquire(layout).release()


# ---------------------------------------------------------------- 4: down and reused pids
class _FakeSupervisor:
    """supervisord as `down` sees it: ``shutdown`` ends the stand-in process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def pid(self) -> int:
        return self.proc.pid

    def stop_all(self) -> None:
        pass

    def shutdown(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_down_does_not_kill_a_process_that_reused_a_recorded_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisord = subprocess.Popen(["sleep", "300"])
    unrelated = subprocess.Popen(["sleep", "300"])
    try:
        # When `down` looked, supervisord had a child with the pid `unrelated` has now, but that
        # child was another process (an older create time): it exited and its pid was reused.
        stale = psutil.Process(unrelated.pid)
        older = stale.create_time() - 1000.0
        setattr(stale, "_create_time", older)  # noqa: B010 - psutil's private identity fields
        setattr(stale, "_ident", (stale.pid, older))  # noqa: B010
        real_children = psutil.Process.children

        def children(self: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
            if self.pid == supervisord.pid:
                return [stale]
            return list(real_children(self, recursive=recursive))

        monkeypatch.setattr(psutil.Process, "children", children)
        monkeypatch.setattr(lifecycle, "Supervisor", lambda layout, timeout=10.0: _FakeSupervisor(supervisord))
        signals: list[tuple[int, int]] = []
        real_kill = os.kill

        def kill(pid: int, sig: int) -> None:
            signals.append((pid, sig))
            real_kill(pid, sig)

        monkeypatch.setattr(os, "kill", kill)
        settings = load_settings({"ROOT": str(tmp_path), "STOP_TIMEOUT": "1"})
        lifecycle.down(settings)
        monkeypatch.setattr(os, "kill", real_kill)
        assert supervisord.poll() is not None
        assert (unrelated.pid, signal.SIGKILL) not in signals, "down killed a process that reused a recorded pid"
        assert unrelated.poll() is None
    finally:
        for p in (supervisord, unrelated):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_down_still_kills_a_leftover_that_is_the_recorded_process(tmp_path: Path) -> None:
    leftover = subprocess.Popen(["sleep", "300"])
    try:
        proc = psutil.Process(leftover.pid)
        assert lifecycle.kill_leftovers([proc]) == [leftover.pid]
        leftover.wait(timeout=DEADLINE)
        assert leftover.returncode == -signal.SIGKILL
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
