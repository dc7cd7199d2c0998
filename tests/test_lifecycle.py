"""Real supervisord, real simulated ComfyUI processes, real ports."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable

import psutil
import pytest
from support import Machine, answers, wait_until

pytestmark = pytest.mark.integration


def instance_pids(m: Machine) -> dict[int, int]:
    return {i["gpu"]: i["pid"] for i in m.status()["instances"]}


def test_up_runs_every_instance_on_base_plus_index_and_status_shows_real_pids(
    machine: Callable[..., Machine],
) -> None:
    m = machine(3)
    m.up()
    assert m.wait_all_answer(60)
    # supervisord says STARTING until an instance has lived ``startsecs``, even once its port answers.
    assert wait_until(lambda: all(i["state"] == "RUNNING" for i in m.status()["instances"]), 60, 0.2)
    st = m.status()
    assert st["supervisord"]["running"]
    for inst in st["instances"]:
        assert inst["state"] == "RUNNING"
        assert inst["port"] == m.port_base + inst["gpu"]
        cmd = psutil.Process(inst["pid"]).cmdline()
        assert "main.py" in cmd
        assert str(inst["port"]) in cmd
    conf = m.layout.supervisord_conf
    assert oct(conf.stat().st_mode & 0o777) == "0o600"


def test_a_killed_instance_is_brought_back_by_supervisord(machine: Callable[..., Machine]) -> None:
    m = machine(2)
    m.up()
    assert m.wait_all_answer(60)
    before = instance_pids(m)
    os.kill(before[1], signal.SIGKILL)
    assert wait_until(lambda: instance_pids(m)[1] not in (0, before[1]), 30, 0.2)
    assert wait_until(lambda: answers(m.ports[1]), 30, 0.2)
    assert instance_pids(m)[0] == before[0]


def test_up_twice_leaves_running_instances_alone_and_changed_args_restart_them(
    machine: Callable[..., Machine],
) -> None:
    m = machine(2)
    m.up()
    assert m.wait_all_answer(60)
    before = instance_pids(m)
    out = m.up().stdout
    assert "nothing changed" in out
    assert instance_pids(m) == before
    m.up(COMFY_ARGS="--disable-auto-launch")
    assert wait_until(lambda: all(p not in before.values() and p for p in instance_pids(m).values()), 30, 0.2)
    for pid in instance_pids(m).values():
        assert "--disable-auto-launch" in psutil.Process(pid).cmdline()


def test_down_leaves_no_process_socket_or_port(machine: Callable[..., Machine]) -> None:
    m = machine(2)
    m.up()
    assert m.wait_all_answer(60)
    sup_pid = m.status()["supervisord"]["pid"]
    tree = [sup_pid] + [c.pid for c in psutil.Process(sup_pid).children(recursive=True)]
    r = m.down()
    assert r.returncode == 0, r.stderr
    assert not [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not m.layout.socket.exists()
    for port in [*m.ports, m.monitor_port]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_control_verbs_and_clear_errors(machine: Callable[..., Machine]) -> None:
    m = machine(2)
    r = m.run("status")
    assert r.returncode != 0
    assert "run `orchestrator up`" in r.stderr
    m.up()
    assert m.wait_all_answer(60)
    m.run("stop", "1", check=True)
    assert wait_until(lambda: not answers(m.ports[1]), 15)
    assert wait_until(lambda: m.status()["instances"][1]["state"] == "STOPPED", 15, 0.2)
    m.run("start", "1", check=True)
    assert wait_until(lambda: answers(m.ports[1]), 30, 0.2)
    r = m.run("restart", "7")
    assert r.returncode != 0
    assert "unknown GPU 7" in r.stderr
    assert "Traceback" not in r.stderr
    logs = m.run("logs", "all", "-n", "200", check=True).stdout
    assert "[gpu0]" in logs
    assert "[gpu1]" in logs
    assert "To see the GUI go to" in logs
    rows = [json.loads(line) for line in m.run("logs", "all", "-n", "200", "--json", check=True).stdout.splitlines()]
    assert {r["gpu"] for r in rows} == {0, 1}
    assert any("To see the GUI go to" in r["line"] for r in rows)


def test_a_port_held_by_a_foreign_process_stops_up_with_its_name(machine: Callable[..., Machine]) -> None:
    m = machine(2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", m.ports[1]))
        s.listen()
        r = m.run("up", "--skip-provision")
    assert r.returncode != 0
    assert f"port {m.ports[1]} (comfyui_gpu1) is already in use" in r.stderr
    assert not m.layout.socket.exists()
