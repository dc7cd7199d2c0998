"""A fleet on one host: three machines (own ROOTs and ports, one simulated GPU each, each with its
supervisord, monitor and queue worker started by `up` because JOB_QUEUE_URL is set) on one real
redis-server; 200 jobs; one machine SIGKILLed whole while it holds jobs.

Every job reaches exactly one terminal result, none is lost, none is run to completion twice (each
job's completions counter and its output files), the dead machine's leased jobs finish elsewhere,
and `fleet status` drops the dead machine after its heartbeat TTL while listing the live ones
with their free slots, as their monitors see them.
"""

from __future__ import annotations

import collections
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import requests
from support import (
    REDIS_SERVER,
    Machine,
    RedisServer,
    freeze_machine,
    kill_machine,
    process_environ,
    signal_all,
    txt2img,
    wait_for,
)

from orchestrator.fleet import client as fleet_client
from orchestrator.fleet import queue
from orchestrator.fleet.capacity import fleet_status

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]
JOBS = 200
LEASE = 3.0
TTL = 3.0
PASSWORD = "fleet-redis-pw-7c1e"  # in JOB_QUEUE_URL: only the queue worker may hold it


@pytest.fixture
def fleet(tmp_path: Path, machine: Callable[..., Machine]) -> Iterator[tuple[redis.Redis, list[Machine]]]:
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        rds = queue.connect(server.url)
        machines = [
            machine(
                1, JOB_QUEUE_URL=server.url, MACHINE_ID=f"m{i}", JOB_LEASE_SECONDS=str(LEASE),
                FLEET_HEARTBEAT_TTL=str(TTL), JOB_MAX_ATTEMPTS="5", SIM_EXEC_TIME="0.05",
            )
            for i in range(3)
        ]
        for m in machines:
            m.up()
        yield rds, machines
        rds.close()


def live(rds: redis.Redis) -> dict[str, dict[str, Any]]:
    return {m["machine_id"]: m for m in fleet_status(rds).machines}


def outputs(m: Machine) -> list[str]:
    """The job prefixes of the image files this machine's instance wrote."""
    return [re.sub(r"_\d+_\.png$", "", p.name) for p in (m.root / "comfyui_gpu0" / "output").glob("*.png")]


def secret_holders(m: Machine) -> None:
    """The queue's password is in the worker's environment (through its 0600 env file) and in no
    other process of the machine, nor in supervisord.conf, the plan or a log."""
    sup = psutil.Process(int(m.layout.supervisord_pid.read_text()))
    holders = {" ".join(p.cmdline()[-2:]) for p in [sup, *sup.children(recursive=True)]
               if PASSWORD.encode() in process_environ(p.pid)}
    assert holders == {"orchestrator worker"}
    for path in [m.layout.supervisord_conf, m.layout.plan_file, *m.layout.logs_dir.rglob("*.log")]:
        assert PASSWORD not in path.read_text(errors="replace"), path
    assert all(PASSWORD not in p.read_text() for p in (m.layout.state_dir / "env").glob("*.json")
               if p.name != "queue.json")


def test_three_machines_200_jobs_one_killed_every_job_has_exactly_one_result(
    fleet: tuple[redis.Redis, list[Machine]],
) -> None:
    rds, machines = fleet
    wait_for(lambda: [m["free_slots"] for m in live(rds).values()] == [1, 1, 1], 120, 0.2, "3 machines with a slot")
    secret_holders(machines[1])

    ids = [fleet_client.enqueue(rds, {"workflow": txt2img(f"job{i:03d}", seed=i)}, f"job{i:03d}") for i in range(JOBS)]
    done = lambda: sum(1 for i in ids if rds.exists(queue.result_key(i)))  # noqa: E731
    wait_for(lambda: done() >= JOBS // 4, 120, 0.05, "a quarter of the jobs done")

    # The victim: a machine frozen while it holds a lease (the PEL cannot change under a frozen
    # worker but by a reclaim, a lease away), then SIGKILLed whole.
    def leased_by(name: str) -> set[str]:
        pel = rds.xpending_range(queue.STREAM, queue.GROUP, "-", "+", 100)
        found = [rds.xrange(queue.STREAM, e["message_id"], e["message_id"]) for e in pel
                 if e["consumer"].startswith(f"{name}:")]
        return {f[0][1]["id"] for f in found if f and not rds.exists(queue.result_key(f[0][1]["id"]))}

    name, victim = "m0", machines[0]

    def freeze_while_holding_a_job() -> tuple[list[psutil.Process], set[str]] | None:
        frozen = freeze_machine(victim)
        leased = leased_by(name)
        if leased:
            return frozen, leased
        signal_all(frozen, signal.SIGCONT)
        return None

    frozen, leased = wait_for(freeze_while_holding_a_job, 60, 0.05, "m0 frozen while it holds a job")
    kill_machine(victim, frozen)

    wait_for(lambda: done() == JOBS, 120, 0.2, f"all {JOBS} results")
    results = [fleet_client.result(rds, i) for i in ids]
    assert all(r is not None and r["status"] == "success" for r in results), [r for r in results if r][:3]
    assert [r["id"] for r in results if r] == ids
    # Never run to completion twice: one completed attempt per job, one output file per job among
    # the survivors (the victim may have rendered a job it died before reporting).
    completions = [rds.get(queue.completions_key(i)) for i in ids]
    assert collections.Counter(completions) == {"1": JOBS}
    survivors = [m for m in machines if m is not victim]
    files = collections.Counter(p for m in survivors for p in outputs(m))
    assert max(files.values()) == 1
    assert {r["id"] for r in results if r and r["machine"] != name} <= set(files)
    # The victim's leased jobs finished elsewhere, on a later delivery.
    for r in results:
        if r and r["id"] in leased:
            assert r["machine"] != name
            assert r["attempt"] >= 2
    assert rds.xlen(queue.STREAM) == 0
    assert not rds.exists(queue.DEAD_STREAM)

    # fleet status: the dead machine is gone after its TTL; the live ones show their free slot,
    # as many READY instances as their monitors report.
    wait_for(lambda: sorted(live(rds)) == sorted(f"m{machines.index(m)}" for m in survivors), 30, 0.2, "victim dropped")
    # (A heartbeat is up to a second old: the last one may still count the last job.)
    for m in survivors:
        ready = sum(1 for i in requests.get(f"{m.monitor_url}/instances", timeout=5).json()["instances"] if i["ready"])
        row = lambda m=m: live(rds).get(f"m{machines.index(m)}", {})  # noqa: E731
        want = (1, ready, ready)
        wait_for(lambda row=row, want=want: (row()["gpus"], row()["ready_instances"], row()["free_slots"]) == want,
                 10, 0.1, f"{m.root.name}: 1 GPU, {ready} ready, {ready} free")
