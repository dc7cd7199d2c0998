"""Change without downtime: a custom node added to a serving machine, rolled in by `up`.

    .venv/bin/python bench/bench_rolling.py [--quick] [--gpus N] [--clients C] [--exec-time S] [--rounds R]

A machine of N simulated instances (default 4, product settings) serves a steady load: C clients
(default 4) each posting jobs of S seconds (default 1) to the monitor's job API, one after another.
Each round:

1. Rolling (measured): a new custom node is written into ComfyUI/custom_nodes and
   `orchestrator up --skip-provision` runs. Reported: jobs failed while it ran (target 0), the
   minimum number of instances serving (READY and not drained, sampled every 0.1 s; target ≥ N-1),
   the time from the change until every instance serves the node (its class in /object_info) and
   is READY, and the extra latency of the jobs that started during the roll (median and p95 over
   the steady-state jobs before it).
2. Baseline (same run, same load): another node is written and every instance is restarted at
   once (`orchestrator restart all`, what a change did before rolling restarts): the same figures.

Figures are medians over the rounds; the ratios compare the two in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

from benchutil import fmt, machine_note, spread, write_results  # noqa: E402
from support import Machine, simulated_machine, txt2img  # noqa: E402


class Load:
    """C clients posting jobs in a loop: (start, end, ok) of each job, by the monotonic clock."""

    def __init__(self, m: Machine, clients: int) -> None:
        self.m = m
        self.clients = clients
        self.jobs: list[tuple[float, float, bool, str]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]

    def _run(self, k: int) -> None:
        session = requests.Session()
        n = 0
        while not self.stop.is_set():
            n += 1
            start = time.monotonic()
            why = ""
            try:
                body = {"workflow": txt2img(f"bench{k}", seed=k * 1_000_000 + n)}
                r = session.post(f"{self.m.monitor_url}/jobs", json=body, timeout=300)
                ok = r.status_code == 200 and r.json().get("status") == "success"
                why = "" if ok else f"{r.status_code} {r.text[:160]}"
            except (requests.RequestException, ValueError) as exc:
                ok, why = False, repr(exc)[:160]
            with self.lock:
                self.jobs.append((start, time.monotonic(), ok, why))
            if not ok:
                time.sleep(0.2)  # a client retries after a failure, as a real one would

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(300)

    def window(self, t0: float, t1: float) -> list[tuple[float, float, bool, str]]:
        """Jobs that were running at some point between t0 and t1."""
        with self.lock:
            return [j for j in self.jobs if j[1] >= t0 and j[0] <= t1]

    def started_in(self, t0: float, t1: float) -> list[tuple[float, float, bool, str]]:
        with self.lock:
            return [j for j in self.jobs if t0 <= j[0] <= t1]


class Serving:
    """Samples /instances every 0.1 s: how many instances are READY and take jobs."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            try:
                data = session.get(f"{self.m.monitor_url}/instances", timeout=2).json()["instances"]
                count = sum(1 for i in data if i["ready"] and not i.get("draining"))
            except (requests.RequestException, ValueError, KeyError):
                count = 0  # the monitor does not answer: nothing is routed
            self.samples.append((time.monotonic(), count))
            time.sleep(0.1)

    def __enter__(self) -> Serving:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def minimum(self) -> int:
        return min((c for _, c in self.samples), default=0)


def serves_node(m: Machine, node_class: str) -> bool:
    for port in m.ports:
        try:
            if node_class not in requests.get(f"http://127.0.0.1:{port}/object_info", timeout=2).json():
                return False
        except (requests.RequestException, ValueError):
            return False
    try:
        data = requests.get(f"{m.monitor_url}/instances", timeout=2).json()["instances"]
    except (requests.RequestException, ValueError, KeyError):
        return False
    return all(i["ready"] for i in data)


def add_node(m: Machine, name: str) -> str:
    node_class = name.replace("-", "_").title().replace("_", "")
    folder = m.root / "ComfyUI" / "custom_nodes" / name
    folder.mkdir()
    (folder / "__init__.py").write_text(f'NODE_CLASS_MAPPINGS = {{"{node_class}": object}}\n')
    return node_class


def one_change(m: Machine, load: Load, name: str, how: str, baseline_latency: float) -> dict[str, Any]:
    node_class = add_node(m, name)
    t0 = time.monotonic()
    with Serving(m) as serving:
        command = ("up", "--skip-provision") if how == "rolling" else ("restart", "all")
        r = m.run(*command, timeout=600)
        command_done = time.monotonic()
        deadline = time.monotonic() + 300
        while not serves_node(m, node_class) and time.monotonic() < deadline:
            time.sleep(0.1)
        t1 = time.monotonic()
        time.sleep(0.5)
    if r.returncode != 0:
        raise SystemExit(f"{how}: orchestrator exited {r.returncode}: {r.stderr[-800:]}{r.stdout[-800:]}")
    during = load.window(t0, t1)
    started = load.started_in(t0, t1)
    lat = [j[1] - j[0] for j in started if j[2]]
    failed = [j for j in during if not j[2]]
    return {
        "how": how,
        "jobs_during": len(during),
        "jobs_failed": len(failed),
        "failures": [j[3] for j in failed[:3]],
        "min_serving": serving.minimum(),
        "seconds_to_all_serving_node": round(t1 - t0, 3),
        "command_seconds": round(command_done - t0, 3),
        "latency_p50": round(statistics.median(lat), 3) if lat else None,
        "latency_p95": round(sorted(lat)[int(0.95 * (len(lat) - 1))], 3) if lat else None,
        "extra_latency_p50": round(statistics.median(lat) - baseline_latency, 3) if lat else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, 3 instances, 0.3 s jobs (about a minute)")
    parser.add_argument("--gpus", type=int, default=None, help="instances (default 4; 3 with --quick)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--exec-time", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.exec_time = 1, 0.3
    n = args.gpus or (3 if args.quick else 4)
    with tempfile.TemporaryDirectory(prefix="bench-rolling-") as tmp:
        m = simulated_machine(Path(tmp) / "m", n, fast=False)
        try:
            r = m.run("up", "--skip-provision", "--wait", "--timeout", "180", timeout=300)
            if r.returncode != 0:
                raise SystemExit(f"up failed: {r.stderr[-800:]}{r.stdout[-800:]}")
            for i in range(n):
                (m.root / f"comfyui_gpu{i}" / "user" / "simulator_faults.json").write_text(
                    json.dumps({"exec_time": args.exec_time})
                )
            load = Load(m, args.clients)
            load.start()
            time.sleep(max(3.0, 3 * args.exec_time))
            now = time.monotonic()
            steady = [j[1] - j[0] for j in load.started_in(0, now) if j[2] and j[0] >= now - 30]
            base_lat = statistics.median(steady) if steady else args.exec_time
            rounds: list[dict[str, Any]] = []
            for k in range(args.rounds):
                rounds.append(one_change(m, load, f"bench-roll-{k}", "rolling", base_lat))
                time.sleep(max(2.0, 2 * args.exec_time))
                rounds.append(one_change(m, load, f"bench-all-{k}", "all at once", base_lat))
                time.sleep(max(2.0, 2 * args.exec_time))
            load.close()
        finally:
            m.down()
    roll = [x for x in rounds if x["how"] == "rolling"]
    base = [x for x in rounds if x["how"] != "rolling"]

    def figures(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "jobs_failed": spread([x["jobs_failed"] for x in rs], 0),
            "min_serving": min(x["min_serving"] for x in rs),
            "seconds_to_all_serving_node": spread([x["seconds_to_all_serving_node"] for x in rs]),
            "extra_latency_p50": spread([x["extra_latency_p50"] or 0.0 for x in rs]),
            "latency_p95": spread([x["latency_p95"] or 0.0 for x in rs]),
        }

    result = {
        "gpus": n, "clients": args.clients, "exec_time": args.exec_time, "rounds": args.rounds,
        "steady_latency_p50": round(base_lat, 3), "rolling": figures(roll), "all_at_once": figures(base),
        "runs": rounds, "host": machine_note(),
    }
    fr, fb = result["rolling"], result["all_at_once"]
    print(f"{n} simulated instances, {args.clients} clients of {args.exec_time:g} s jobs, {args.rounds} round(s); "
          f"steady job latency p50 {base_lat:.2f} s; {machine_note()}")
    print(f"  {'':<22}{'failed jobs':>12}{'min serving':>13}   {'to all serving the node':<34}{'extra p50':>10}")
    for label, f in (("rolling (up)", fr), ("all at once (baseline)", fb)):
        print(f"  {label:<22}{f['jobs_failed']['median']:>12.0f}{f['min_serving']:>10}/{n:<2}   "
              f"{fmt(f['seconds_to_all_serving_node']):<34}{f['extra_latency_p50']['median']:>9.2f}s")
    ratio = fr["seconds_to_all_serving_node"]["median"] / max(fb["seconds_to_all_serving_node"]["median"], 1e-9)
    print(f"  rolling takes {ratio:.2f}x the time of restarting all at once, "
          f"and keeps ≥ {fr['min_serving']} of {n} serving")
    ok = fr["jobs_failed"]["max"] == 0 and fr["min_serving"] >= n - 1
    print(f"  targets (0 failed jobs, ≥ N-1 serving during the roll): {'met' if ok else 'MISSED'}")
    result["ratio_time_rolling_over_all_at_once"] = round(ratio, 3)
    result["targets_met"] = ok
    write_results(HERE / "results" / "bench_rolling.json", result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
