"""Time from `orchestrator up` to every instance answering /system_stats, vs the legacy start.

Legacy (the bash start.sh): start instance 0, wait for its port, start instance 1, ...
Ours: `orchestrator up --skip-provision` on a warm machine (code tree present), all instances in
parallel under supervisord. Overhead = our time minus one simulator's own startup time.

    .venv/bin/python bench/bench_startup.py [--counts 1,2,4,8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from orchestrator.ports import free_port_block
from orchestrator.simulator.tree import write_code_tree


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/system_stats", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ports(ports: list[int], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ports)
    while pending:
        pending = {p for p in pending if not answers(p)}
        if time.monotonic() > deadline:
            raise TimeoutError(f"ports {sorted(pending)} never answered")
        if pending:
            time.sleep(0.02)


def sim_argv(root: Path, i: int, port: int) -> list[str]:
    d = root / f"comfyui_gpu{i}"
    for sub in ("output", "temp", "input", "user"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--output-directory",
            str(d / "output"), "--temp-directory", str(d / "temp"), "--input-directory", str(d / "input"),
            "--user-directory", str(d / "user"), "--cpu"]


def by_hand(root: Path, n: int, *, sequential: bool) -> float:
    """N simulators without the orchestrator: one after another, each waited for (the legacy
    start.sh), or all at once (the simulators' own startup at N)."""
    base = free_port_block(n)
    procs: list[subprocess.Popen[bytes]] = []
    start = time.monotonic()
    try:
        for i in range(n):
            procs.append(subprocess.Popen(sim_argv(root, i, base + i), cwd=root / "ComfyUI",
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if sequential:
                wait_ports([base + i])
        wait_ports([base + i for i in range(n)])
        return time.monotonic() - start
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def legacy(root: Path, n: int) -> float:
    return by_hand(root, n, sequential=True)


def parallel(root: Path, n: int) -> float:
    return by_hand(root, n, sequential=False)


def ours(root: Path, n: int) -> float:
    base = free_port_block(n)
    env = {**os.environ, "ROOT": str(root), "MOCK_GPU": "1", "NUM_GPUS": str(n),
           "WORKER_BASE_COMFYUI_PORT": str(base), "ORCHESTRATOR_PORT": str(free_port_block(1)), "SHARED_REPO_URL": ""}
    cmd = [sys.executable, "-m", "orchestrator", "up", "--skip-provision"]
    start = time.monotonic()
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        wait_ports([base + i for i in range(n)])
        return time.monotonic() - start
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator", "down"], env=env, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,2,4,8")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_code_tree(root / "ComfyUI")
        # Warm-up: the first `up` creates state dirs and the shipped shared config.
        ours(root, 1)
        sim_alone = statistics.median(legacy(root, 1) for _ in range(args.repeat))
        rows = []
        for n in counts:
            t_ours = statistics.median(ours(root, n) for _ in range(args.repeat))
            t_legacy = statistics.median(legacy(root, n) for _ in range(args.repeat))
            t_par = statistics.median(parallel(root, n) for _ in range(args.repeat))
            rows.append({"instances": n, "ours_s": round(t_ours, 3), "legacy_s": round(t_legacy, 3),
                         "parallel_sims_s": round(t_par, 3), "speedup": round(t_legacy / t_ours, 2),
                         "overhead_s": round(t_ours - t_par, 3)})
    t1 = rows[0]["ours_s"] if counts[0] == 1 else None
    print(f"one simulator alone: {sim_alone:.3f}s (median of {args.repeat})")
    print("overhead = ours - the same N simulators started at once by hand (their own startup)")
    print(f"{'N':>3} {'ours':>8} {'legacy':>8} {'sims':>8} {'speedup':>8} {'overhead':>9} {'vs N=1':>7}")
    for r in rows:
        ratio = f"{r['ours_s'] / t1:.2f}x" if t1 else "-"
        r["vs_one"] = round(r["ours_s"] / t1, 2) if t1 else None
        print(f"{r['instances']:>3} {r['ours_s']:>7.3f}s {r['legacy_s']:>7.3f}s {r['parallel_sims_s']:>7.3f}s "
              f"{r['speedup']:>7.2f}x "
              f"{r['overhead_s']:>8.3f}s {ratio:>7}")
    out = Path(__file__).parent / "results" / "startup.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"simulator_alone_s": round(sim_alone, 3), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
