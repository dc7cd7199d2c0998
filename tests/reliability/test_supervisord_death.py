"""supervisord's death is survivable, and derived files are derived.

Real supervisord, real simulated instances (MOCK_GPU): kill -9 supervisord and the instances die
with it (the pdeath exec wrapper) while the monitor stays to answer /readyz with 503; ``status``
names the orphans; ``up`` stops this ROOT's processes of the earlier generation and starts clean,
but never touches a foreign process. A truncated or garbage supervisord.conf does not stop
``status``, ``down`` or ``up``; damaged state files give one line, never a traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from support import Machine, answers, gone, readyz_code, wait_for, wait_until

from orchestrator.core.layout import Layout
from orchestrator.lifecycle.down import _remove_socket
from orchestrator.machine.orphans import is_ours
from orchestrator.machine.supervisor import auth_file, read_credentials, socket_in_use

pytestmark = pytest.mark.integration

LISTEN = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('ok', flush=True); time.sleep(600)\n"
)


@pytest.fixture
def listeners() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """listener(port, cwd, *args) → a process listening on ``port`` (stopped at the end)."""
    made: list[subprocess.Popen[str]] = []

    def start(port: int, cwd: Path, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", LISTEN, str(port), *args], cwd=cwd, stdout=subprocess.PIPE, text=True
        )
        made.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ok"
        return proc

    yield start
    for proc in made:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_kill_9_supervisord_takes_the_instances_along_readyz_turns_503_and_up_recovers(
    machine: Callable[..., Machine],
) -> None:
    m = machine(2)
    m.up()
    assert m.wait_all_answer(60)
    wait_for(m.ready, 60, 0.2, what="READY before the kill")
    st = m.status()
    sup_pid = st["supervisord"]["pid"]
    instances = [i["pid"] for i in st["instances"]]
    assert all(instances)
    os.kill(sup_pid, signal.SIGKILL)
    # The instances die with supervisord (PR_SET_PDEATHSIG through the exec wrapper).
    wait_for(lambda: all(gone(p) for p in instances), 10, 0.1, what="instances gone after supervisord")
    assert not any(answers(p) for p in m.ports)
    # The monitor is not wrapped: it stays and says not ready.
    wait_for(lambda: readyz_code(m) == 503, 15, 0.2, what="/readyz 503")
    r = m.run("status")
    assert r.returncode == 0, r.stderr
    assert "supervisord is not running; 1 orphaned process" in r.stdout
    assert f"{m.monitor_port} (monitor" in r.stdout
    assert "run `orchestrator up`" in r.stdout
    monitor_pid = m.status()["orphans"][0]["pid"]
    # `up` recognises its own earlier generation, stops it and starts clean: no manual kill.
    m.up()
    assert gone(monitor_pid)
    wait_for(m.ready, 60, 0.2, what="READY after up")
    assert m.status()["supervisord"]["running"]


def test_orphans_of_this_root_are_stopped_by_up_but_a_foreign_process_is_only_reported(
    machine: Callable[..., Machine], listeners: Callable[..., subprocess.Popen[str]]
) -> None:
    m = machine(2)
    m.up()
    assert m.wait_all_answer(60)
    assert m.down().returncode == 0
    # An instance of an earlier generation (cwd $ROOT/ComfyUI, argv under $ROOT) on port 0 …
    orphan = listeners(m.ports[0], m.root / "ComfyUI", "--output-directory", str(m.root / "comfyui_gpu0" / "output"))
    # … and somebody else's process on port 1 (not under this ROOT).
    foreign = listeners(m.ports[1], Path("/"))
    assert is_ours(psutil.Process(orphan.pid), m.root)
    assert not is_ours(psutil.Process(foreign.pid), m.root)
    out = m.run("status").stdout
    assert f"supervisord is not running; 1 orphaned process holds port {m.ports[0]} (comfyui_gpu0" in out
    assert f"port {m.ports[1]} (comfyui_gpu1) is held by pid {foreign.pid}" in out
    assert "not a process of this ROOT" in out
    r = m.run("up", "--skip-provision")
    assert r.returncode != 0
    assert f"port {m.ports[1]} (comfyui_gpu1) is already in use by pid {foreign.pid}" in r.stderr
    wait_for(lambda: orphan.poll() is not None, 15, 0.1, what="the orphan stopped")
    assert foreign.poll() is None  # never killed
    # `down` reports the foreign process by pid and leaves it running.
    d = m.down()
    assert foreign.poll() is None
    assert f"by pid {foreign.pid}" in d.stderr
    foreign.kill()
    foreign.wait()
    m.up()
    wait_for(m.ready, 60, 0.2, what="READY once the foreign process left")


@pytest.mark.parametrize("damage", [b"[unix_http_server]\nfile=/x\nuser", b"\xff\xfe\x00garbage\x80\x81"])
def test_a_truncated_or_garbage_conf_does_not_stop_status_up_or_down(
    machine: Callable[..., Machine], damage: bytes
) -> None:
    m = machine(1)
    m.up()
    assert m.wait_all_answer(60)
    conf = m.layout.supervisord_conf
    conf.write_bytes(damage)
    st = m.run("status", "--json")
    assert st.returncode == 0, st.stderr
    assert "Traceback" not in st.stderr
    assert m.status()["supervisord"]["running"]
    before = m.status()["instances"][0]["pid"]
    m.up()  # rewrites the conf, reaches the running supervisord through the auth file
    assert conf.read_text().startswith("; Generated by orchestrator up")
    assert m.status()["instances"][0]["pid"] == before
    conf.write_bytes(damage)
    sup_pid = m.status()["supervisord"]["pid"]
    d = m.down()
    assert d.returncode == 0, d.stderr
    assert gone(sup_pid)
    assert not m.layout.socket.exists()
    assert wait_until(lambda: not answers(m.ports[0]), 10)


def test_damaged_state_files_give_one_line_naming_the_file(machine: Callable[..., Machine]) -> None:
    m = machine(1)
    m.up()
    assert m.wait_all_answer(60)
    m.layout.status_file.write_bytes(b"\x80\x81 not json")
    r = m.run("status")
    assert r.returncode == 0, r.stderr
    assert f"{m.layout.status_file} is damaged or unreadable: run `orchestrator up`" in r.stdout
    auth = auth_file(m.layout)
    assert oct(auth.stat().st_mode & 0o777) == "0o600"
    saved = auth.read_bytes()
    auth.write_bytes(b"\xff garbage")
    m.layout.supervisord_conf.write_bytes(b"\xff garbage")
    r = m.run("stop", "0")
    assert r.returncode != 0
    assert f"{auth} is damaged: run `orchestrator up`" in r.stderr
    assert "Traceback" not in r.stderr
    auth.write_bytes(saved)
    m.layout.plan_file.write_bytes(b"\xff\xfe{")
    r = m.run("status")
    assert r.returncode != 0
    assert f"{m.layout.plan_file} is damaged or unreadable: run `orchestrator up`" in r.stderr
    assert "Traceback" not in r.stderr
    m.up()  # rewrites plan.json
    assert m.status()["supervisord"]["running"]


def test_the_socket_of_a_process_that_still_listens_is_never_unlinked(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.socket.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(layout.socket))
        srv.listen(1)  # a slow supervisord: listens, never accepts
        assert socket_in_use(layout.socket)
        problems: list[str] = []
        _remove_socket(layout, problems)
        assert layout.socket.exists()
        assert "the socket was left in place" in problems[0]
    assert not socket_in_use(layout.socket)  # closed: a stale file
    problems = []
    _remove_socket(layout, problems)
    assert not layout.socket.exists()
    assert problems == []


def test_credentials_come_from_the_auth_file_not_the_conf(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.state_dir.mkdir(parents=True)
    layout.supervisord_conf.write_bytes(b"\xff\xfe garbage")
    auth_file(layout).write_text('{"username": "u", "password": "p"}')
    assert read_credentials(layout) == ("u", "p")


def test_the_pdeath_wrapper_execs_in_place_and_dies_with_its_parent(tmp_path: Path) -> None:
    from orchestrator.lifecycle.launch import pdeath_wrapper

    wrapper = list(pdeath_wrapper())
    parent_code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen({wrapper!r} + ['sleep', '300'])\n"
        "print(p.pid, flush=True); time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        # The exec keeps the pid: supervisord's child *is* the program.
        wait_for(lambda: psutil.Process(child).cmdline() == ["sleep", "300"], 10, 0.02, what="exec")
        parent.kill()
        parent.wait()
        wait_for(lambda: gone(child), 10, 0.05, what="the child killed with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_down_after_supervisord_was_killed_stops_the_orphaned_monitor(machine: Callable[..., Machine]) -> None:
    m = machine(1)
    m.up()
    assert m.wait_all_answer(60)
    wait_for(lambda: readyz_code(m) is not None, 60, 0.2, what="the monitor answers")
    os.kill(m.status()["supervisord"]["pid"], signal.SIGKILL)
    wait_for(lambda: m.status()["orphans"], 15, 0.2, what="the monitor seen as an orphan")
    monitor_pid = m.status()["orphans"][0]["pid"]
    d = m.down()
    assert d.returncode == 0, d.stderr
    assert gone(monitor_pid)
    assert not m.layout.socket.exists()  # nobody listened on it any more: a stale file, removed
