"""Capacity and affinity routing against least-queue routing, the same jobs in the same run.

    .venv/bin/python bench/bench_routing.py            # 3 runs per policy, bursts of 40 jobs
    .venv/bin/python bench/bench_routing.py --quick    # 1 run per policy, bursts of 16 jobs

Each run starts two fresh simulators (ComfyUI stand-ins: separate processes, real HTTP and /ws)
and one job manager (ROUTING_POLICY=capacity or least_queue) over them, in this process. A run
is a warm-up of 4 jobs sent one after another (the router learns from completed jobs), then a
burst of the rest submitted at once; figures are over the burst: makespan (first submission to
last completion) and p95 job latency (submission to completion).

1. Capacity: GPU 0 is 3x slower than GPU 1 (SIM_SPEED=0.333 vs 1, SIM_EXEC_TIME per prompt);
   a mixed stream of txt2img jobs on two checkpoints and a model-free image job. Target:
   capacity routing's makespan >= 1.3x better than least-queue's.
2. Model affinity: two equal instances, a load cost per checkpoint change
   (SIM_MODEL_LOAD_SECONDS), jobs on checkpoint A or B in a seeded random order. Model loads
   are counted from the jobs' own results (the checkpoint loader node not cached). Target:
   >= 2x fewer loads than least-queue.

Policies alternate run by run; every figure is the median over runs. Writes
bench/results/bench_routing.json (--quick: bench_routing_quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchutil import fmt, machine_note, spread, write_results  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from support import ComfyServer  # noqa: E402

from orchestrator.core.instances import InstanceView  # noqa: E402
from orchestrator.core.settings import load_settings  # noqa: E402
from orchestrator.core.states import InstanceState  # noqa: E402
from orchestrator.jobs.schemas import JobRequest  # noqa: E402
from orchestrator.jobs.store import Job  # noqa: E402
from orchestrator.jobs.tracker import JobManager  # noqa: E402

EXAMPLE = json.loads((ROOT / "examples" / "workflow.json").read_text())["workflow"]
RESULTS = ROOT / "bench" / "results" / "bench_routing.json"
WARMUP = 4
POLICIES = ("least_queue", "capacity")


def txt2img(ckpt: str, seed: int) -> dict[str, Any]:
    wf = json.loads(json.dumps(EXAMPLE))
    wf["4"]["inputs"]["ckpt_name"] = ckpt
    wf["3"]["inputs"]["seed"] = seed
    return wf


def image_job(seed: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": seed}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}},
    }


def mixed_stream(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choice(("a", "b", "image"))
        out.append(image_job(i + 1) if kind == "image" else txt2img(f"{kind}.safetensors", i + 1))
    return out


def affinity_stream(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [txt2img(rng.choice(("a.safetensors", "b.safetensors")), i + 1) for i in range(n)]


class Directory:
    def __init__(self, ports: list[int]) -> None:
        self.views = [InstanceView(i, f"comfyui_gpu{i}", p, InstanceState.READY) for i, p in enumerate(ports)]

    def snapshot(self) -> list[InstanceView]:
        return list(self.views)

    def report_hung(self, index: int, reason: str) -> None:
        raise RuntimeError(f"instance {index} reported hung: {reason}")


def start_sims(tmp: Path, envs: list[dict[str, str]]) -> list[ComfyServer]:
    from orchestrator.simulator.tree import write_code_tree

    tree = tmp / "ComfyUI"
    if not tree.exists():
        write_code_tree(tree)
    sims: list[ComfyServer] = []
    try:
        for env in envs:
            sims.append(ComfyServer(tree, Path(tempfile.mkdtemp(dir=tmp)), env=env))
        for sim in sims:
            sim.wait_ready()
    except BaseException:
        for sim in sims:
            sim.stop()
        raise
    return sims


async def drive(policy: str, ports: list[int], workflows: list[dict[str, Any]]) -> dict[str, Any]:
    settings = load_settings({"ROOT": "/nonexistent-root", "ROUTING_POLICY": policy, "MAX_QUEUE_DEPTH": "10000",
                              "JOB_TIMEOUT": "3600"})
    manager = JobManager(settings, Directory(ports), CollectorRegistry(), poll_interval=5, check_interval=0.2)
    await manager.start()
    try:
        for wf in workflows[:WARMUP]:
            job = await manager.submit(JobRequest(workflow=wf))
            await manager.wait(job)
        start = time.monotonic()
        jobs: list[Job] = [await manager.submit(JobRequest(workflow=wf)) for wf in workflows[WARMUP:]]
        await asyncio.gather(*(manager.wait(j) for j in jobs))
        makespan = time.monotonic() - start
    finally:
        await manager.close()
    failed = [j.error.message if j.error else j.status for j in jobs if j.status != "success"]
    if failed:
        raise RuntimeError(f"{policy}: {len(failed)} jobs failed, e.g. {failed[0]}")
    latencies = sorted((j.finished_mono or 0) - j.created_mono for j in jobs)
    timings = [j.progress.timings() if j.progress else [] for j in jobs]
    loads = sum(1 for nodes in timings if any(n.id == "4" and not n.cached for n in nodes))
    shares = {i: sum(1 for j in jobs if j.instance and j.instance.index == i) for i in range(len(ports))}
    return {
        "makespan_s": makespan,
        "p95_latency_s": latencies[max(0, int(round(0.95 * len(latencies))) - 1)],
        "model_loads": loads,
        "jobs_per_gpu": shares,
        "example_reason": jobs[-1].routing.reason if jobs[-1].routing else "",
    }


def scenario(tmp: Path, runs: int, envs: list[dict[str, str]], workflows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    for r in range(runs):
        for policy in POLICIES if r % 2 == 0 else POLICIES[::-1]:
            sims = start_sims(tmp, envs)
            try:
                out[policy].append(asyncio.run(drive(policy, [s.port for s in sims], workflows)))
            finally:
                for sim in sims:
                    sim.stop()
    summary: dict[str, Any] = {}
    for policy, results in out.items():
        summary[policy] = {
            "makespan_s": spread([x["makespan_s"] for x in results]),
            "p95_latency_s": spread([x["p95_latency_s"] for x in results]),
            "model_loads": spread([x["model_loads"] for x in results], 1),
            "jobs_per_gpu": [x["jobs_per_gpu"] for x in results],
            "example_reason": results[-1]["example_reason"],
        }
    return summary


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 run per policy, bursts of 16 jobs")
    args = parser.parse_args()
    runs, burst, exec_time, load_time = (1, 16, 0.2, 0.6) if args.quick else (3, 40, 0.3, 0.6)
    n = WARMUP + burst
    with tempfile.TemporaryDirectory(prefix="bench_routing.") as t:
        tmp = Path(t)
        base = {"SIM_EXEC_TIME": str(exec_time)}
        cap = scenario(tmp, runs, [{**base, "SIM_SPEED": "0.333"}, {**base, "SIM_SPEED": "1"}], mixed_stream(n, 7))
        aff_env = {"SIM_EXEC_TIME": str(exec_time), "SIM_MODEL_LOAD_SECONDS": str(load_time)}
        aff = scenario(tmp, runs, [aff_env, aff_env], affinity_stream(n, 11))
    lq, cp = cap["least_queue"], cap["capacity"]
    makespan_ratio = ratio(lq["makespan_s"]["median"], cp["makespan_s"]["median"])
    p95_ratio = ratio(lq["p95_latency_s"]["median"], cp["p95_latency_s"]["median"])
    loads_ratio = ratio(aff["least_queue"]["model_loads"]["median"], aff["capacity"]["model_loads"]["median"])
    result = {
        "setup": {"runs": runs, "warmup_jobs": WARMUP, "burst_jobs": burst, "exec_time_s": exec_time,
                  "model_load_s": load_time, "slow_speed": 0.333},
        "capacity": cap,
        "affinity": aff,
        "makespan_ratio": round(makespan_ratio, 3),
        "p95_ratio": round(p95_ratio, 3),
        "model_loads_ratio": round(loads_ratio, 3),
        "targets": {"makespan_ratio_min": 1.3, "makespan_ok": makespan_ratio >= 1.3,
                    "model_loads_ratio_min": 2.0, "model_loads_ok": loads_ratio >= 2.0},
        "host": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]},
    }
    print(f"routing, {runs} run(s) per policy, burst of {burst} jobs after {WARMUP} warm-up jobs; {machine_note()}")
    print(f"1. GPU 0 3x slower than GPU 1 (SIM_EXEC_TIME={exec_time}), mixed jobs")
    for policy in POLICIES:
        c = cap[policy]
        print(f"  {policy:<12} makespan {fmt(c['makespan_s'])}  p95 latency {fmt(c['p95_latency_s'])}  "
              f"jobs per GPU {c['jobs_per_gpu']}")
    print(f"  capacity vs least_queue: makespan {makespan_ratio:.2f}x, p95 {p95_ratio:.2f}x better "
          f"(target makespan >= 1.3x: {'ok' if makespan_ratio >= 1.3 else 'MISSED'})")
    print(f"  e.g. {cp['example_reason']}")
    print(f"2. two equal GPUs, checkpoint A/B at random, {load_time} s per model load")
    for policy in POLICIES:
        a = aff[policy]
        print(f"  {policy:<12} model loads {fmt(a['model_loads'], '', 0)}  makespan {fmt(a['makespan_s'])}")
    print(f"  model loads reduced {loads_ratio:.2f}x (target >= 2x: {'ok' if loads_ratio >= 2.0 else 'MISSED'})")
    write_results(RESULTS.with_name("bench_routing_quick.json") if args.quick else RESULTS, result)
    return 0 if makespan_ratio >= 1.3 and loads_ratio >= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
