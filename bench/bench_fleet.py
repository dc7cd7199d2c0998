"""The fleet's Redis job queue: throughput over 1, 2 and 3 machines, the queue's overhead per job
against POST /jobs directly, and how soon a killed machine's jobs run elsewhere, in one run.

    .venv/bin/python bench/bench_fleet.py            # 200 overhead pairs; 30 jobs of 1 s per count, 3 runs
    .venv/bin/python bench/bench_fleet.py --quick    # 30 pairs; 12 jobs of 1 s, 1 run

Machines are real (`orchestrator up` with MOCK_GPU=1, one simulated GPU each, supervisord, the
monitor and the queue worker) on one real redis-server, in separate ROOTs on this host.

1. Queue overhead. One machine, SIM_EXEC_TIME=0 (the simulator's live faults file). Baseline:
   POST /jobs (wait=true) to its monitor. Measured: the same job through the queue
   (``fleet.client.submit``: XADD, the worker's XREADGROUP and POST /jobs, the result written
   with SET NX, the client's BLPOP and GET). Alternating, sequential. Target: p50(queue) −
   p50(direct) ≤ 10 ms.
2. Throughput. A fixed batch of 1 s jobs enqueued at once, drained by 1, then 2, then 3
   machines (each added with `up`). jobs/s for each; ratio to linear = rate(n) / (n × rate(1)).
   Target ≥ 0.9.
3. Reclaim. Three machines and a backlog; the third machine is frozen while it holds a job,
   then SIGKILLed whole. Per job it held: the start of its next attempt elsewhere minus the
   kill. Target ≤ JOB_LEASE_SECONDS + 2 s (the lease here: 5 s).

Writes bench/results/fleet.json (fleet_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchutil import fmt, machine_note, spread, write_results  # noqa: E402
from support import (  # noqa: E402
    Machine,
    RedisServer,
    freeze_machine,
    kill_machine,
    signal_all,
    simulated_machine,
    txt2img,
    wait_for,
)

from orchestrator.fleet import client as fleet_client  # noqa: E402
from orchestrator.fleet import queue  # noqa: E402
from orchestrator.fleet.capacity import fleet_status  # noqa: E402

LEASE = 5.0
JOB_SECONDS = 1.0


def set_exec_time(m: Machine, seconds: float) -> None:
    """The simulator's live fault file: its exec_time is re-read every 0.5 s."""
    path = m.root / "comfyui_gpu0" / "user" / "simulator_faults.json"
    path.write_text(json.dumps({"exec_time": seconds}))
    time.sleep(1.0)


def wait_fleet(rds: Any, n: int) -> None:
    wait_for(
        lambda: sorted(m.get("free_slots", 0) for m in fleet_status(rds).machines) == [1] * n,
        180, 0.2, f"{n} machines with a free slot",
    )


def overhead(rds: Any, m: Machine, pairs: int) -> dict[str, Any]:
    set_exec_time(m, 0.0)
    direct, queued = [], []
    with requests.Session() as http:
        for i in range(pairs + 3):
            body = {"workflow": txt2img(f"ovh{i}", seed=1000 + i)}
            t0 = time.perf_counter()
            r = http.post(f"{m.monitor_url}/jobs", json={**body, "wait": True}, timeout=60)
            t1 = time.perf_counter()
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "success", r.text
            body = {"workflow": txt2img(f"ovq{i}", seed=5000 + i)}
            result = fleet_client.submit(rds, body, timeout=60)
            t2 = time.perf_counter()
            assert result is not None, body
            assert result["status"] == "success", result
            if i >= 3:  # the first few warm connections up
                direct.append((t1 - t0) * 1000)
                queued.append((t2 - t1) * 1000)
    p50 = statistics.median(queued) - statistics.median(direct)
    return {"direct_ms": spread(direct, 2), "queue_ms": spread(queued, 2), "overhead_p50_ms": round(p50, 2)}


def drain(rds: Any, jobs: int, tag: str) -> float:
    """Enqueue ``jobs`` jobs at once; seconds until the last result."""
    t0 = time.time()
    ids = [fleet_client.enqueue(rds, {"workflow": txt2img(f"{tag}-{i}", seed=i)}) for i in range(jobs)]
    for job in ids:
        result = fleet_client.wait_result(rds, job, 600)
        assert result is not None, job
        assert result["status"] == "success", result
    return time.time() - t0


def reclaim(rds: Any, victim: Machine, name: str, backlog: int) -> dict[str, Any]:
    ids = [fleet_client.enqueue(rds, {"workflow": txt2img(f"rc-{i}", seed=i)}) for i in range(backlog)]

    def holding() -> tuple[list[Any], set[str]] | None:
        frozen = freeze_machine(victim)
        pel = rds.xpending_range(queue.STREAM, queue.GROUP, "-", "+", 100)
        found = [rds.xrange(queue.STREAM, e["message_id"], e["message_id"]) for e in pel
                 if e["consumer"].startswith(f"{name}:")]
        held = {f[0][1]["id"] for f in found if f}
        if held:
            return frozen, held
        signal_all(frozen, signal.SIGCONT)
        return None

    frozen, held = wait_for(holding, 60, 0.05, f"{name} frozen while it holds a job")
    killed_at = time.time()
    kill_machine(victim, frozen)
    results = {j: fleet_client.wait_result(rds, j, 600) for j in ids}
    assert all(r is not None and r["status"] == "success" for r in results.values())
    delays = [results[j]["started_at"] - killed_at for j in held if results[j]]  # type: ignore[index]
    return {"lease_seconds": LEASE, "jobs_held": len(held), "reclaim_seconds": spread(delays, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 overhead pairs, 12 jobs per count, 1 run")
    args = parser.parse_args()
    pairs, batch, runs = (30, 12, 1) if args.quick else (200, 30, 3)
    out: dict[str, Any] = {"machine": machine_note(), "job_seconds": JOB_SECONDS, "batch": batch, "runs": runs}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp, RedisServer(Path(tmp) / "redis") as server:
        rds = queue.connect(server.url)
        machines = [
            simulated_machine(
                Path(tmp) / f"m{i}", 1, JOB_QUEUE_URL=server.url, MACHINE_ID=f"m{i}", JOB_LEASE_SECONDS=str(LEASE),
                FLEET_HEARTBEAT_TTL="5", SIM_EXEC_TIME=str(JOB_SECONDS),
            )
            for i in range(3)
        ]
        try:
            machines[0].up()
            wait_fleet(rds, 1)
            out["overhead"] = overhead(rds, machines[0], pairs)
            print(f"queue overhead p50: {out['overhead']['overhead_p50_ms']:.2f} ms "
                  f"(direct {fmt(out['overhead']['direct_ms'], 'ms')}, queue {fmt(out['overhead']['queue_ms'], 'ms')})")
            set_exec_time(machines[0], JOB_SECONDS)
            rates: dict[int, dict[str, Any]] = {}
            for n in (1, 2, 3):
                if n > 1:
                    machines[n - 1].up()
                wait_fleet(rds, n)
                rates[n] = spread([batch / drain(rds, batch, f"t{n}-{r}") for r in range(runs)], 3)
                ratio = rates[n]["median"] / (n * rates[1]["median"])
                rates[n]["ratio_to_linear"] = round(ratio, 3)
                print(f"{n} machine(s): {fmt(rates[n], 'jobs/s')}  ratio to linear {ratio:.3f}")
            out["throughput"] = {str(n): r for n, r in rates.items()}
            wait_fleet(rds, 3)
            out["reclaim"] = reclaim(rds, machines[2], "m2", backlog=9)
            print(f"reclaim after kill: {fmt(out['reclaim']['reclaim_seconds'])} (lease {LEASE:g} s, "
                  f"target ≤ {LEASE + 2:g} s)")
        finally:
            for m in machines:
                m.down()
            rds.close()
    write_results(ROOT / "bench" / "results" / ("fleet_quick.json" if args.quick else "fleet.json"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
