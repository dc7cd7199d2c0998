"""The ComfyUI simulator: start time, idle memory, prompt round trip.

    /work/venv/bin/python bench/bench_simulator.py [--starts 5] [--prompts 100]

1. start: spawn ``python main.py --cpu ...`` in a simulated tree, time to the first 200 on
   /system_stats. In-run baseline: the bare interpreter importing aiohttp + PyYAML (the floor
   any aiohttp server pays).
2. memory: VmRSS of an idle, ready simulator.
No comparison with real ComfyUI here: its figures come from bench/bench_real.py, which runs it.
3. prompts: POST /prompt + /ws until ``executing`` null, SIM_EXEC_TIME=0, the default
   text-to-image graph with a new seed each time (a 64x64 PNG written per prompt), and the
   same graph again (served from cache).
Writes bench/results/simulator.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from orchestrator.simulator.tree import write_code_tree  # noqa: E402

sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from benchutil import fmt, machine_note, spread, write_results  # noqa: E402
from support import ComfyServer, txt2img  # noqa: E402


def start(tree: Path, base: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int, float]:
    """A simulator in ``tree`` with its folders under ``base``: (process, port, seconds to the first 200)."""
    server = ComfyServer(tree, base, env=env)
    return server.proc, server.port, server.wait_ready(interval=0.01)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def round_trips(port: int, seeds: list[int]) -> list[float]:
    url = f"http://127.0.0.1:{port}"
    out = []
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId=bench") as ws:
        for seed in seeds:
            t0 = time.perf_counter()
            body = {"prompt": txt2img("bench", seed, steps=20, height=64), "client_id": "bench"}
            async with session.post(f"{url}/prompt", json=body) as r:
                prompt_id = (await r.json())["prompt_id"]
            while True:
                msg = await ws.receive_json()
                data = msg.get("data", {})
                if (
                    msg["type"] == "executing"
                    and data.get("node") is None
                    and data.get("prompt_id") == prompt_id
                ):
                    break
            out.append(time.perf_counter() - t0)
    return out


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="3 starts, 30 prompts")
    opts = parser.parse_args()
    if opts.quick:
        opts.starts, opts.prompts = 3, 30
    env = {"SIM_EXEC_TIME": "0"}
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        root = Path(tmp)
        tree = root / "ComfyUI"
        write_code_tree(tree)

        floors = []
        for _ in range(opts.starts):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import aiohttp.web, yaml"], check=True)
            floors.append(time.perf_counter() - t0)

        starts, rss = [], []
        for i in range(opts.starts):
            proc, port, took = start(tree, root / f"s{i}", env)
            starts.append(took)
            time.sleep(0.3)
            rss.append(rss_bytes(proc.pid))
            proc.terminate()
            proc.wait(10)

        proc, port, _ = start(tree, root / "prompts", env)
        try:
            fresh = asyncio.run(round_trips(port, list(range(1, opts.prompts + 1))))
            cached = asyncio.run(round_trips(port, [opts.prompts] * max(10, opts.prompts // 5)))
            rss_after = rss_bytes(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)

    start_med, floor_med = statistics.median(starts), statistics.median(floors)
    rss_med = statistics.median(rss)
    results = {
        "start_seconds_median": start_med,
        "start_seconds_all": starts,
        "import_floor_seconds_median": floor_med,
        "start_vs_floor": start_med / floor_med,
        "start_seconds": spread(starts),
        "idle_rss_bytes_median": rss_med,
        "rss_after_prompts_bytes": rss_after,
        "idle_rss_mb": spread([r / 1e6 for r in rss], 1),
        "prompt_fresh_ms_median": statistics.median(fresh) * 1000,
        "prompt_fresh_ms_p95": pct(fresh, 0.95) * 1000,
        "prompt_cached_ms_median": statistics.median(cached) * 1000,
        "prompts_per_second_fresh": len(fresh) / sum(fresh),
        "starts": opts.starts,
        "prompts": opts.prompts,
        "load_average": os.getloadavg(),
        "command": "python bench/bench_simulator.py" + (" --quick" if opts.quick else ""),
    }
    print(machine_note())
    print(f"{'measure':38} {'value':>12} {'baseline':>12} {'ratio':>8}")
    print(
        f"{'start to first /system_stats (s)':38} {start_med:12.3f} {floor_med:12.3f} "
        f"{start_med / floor_med:8.2f}  (baseline: import aiohttp+yaml)"
    )
    print(f"{'start to first /system_stats':38} {fmt(results['start_seconds'])}")
    print(f"{'idle RSS':38} {fmt(results['idle_rss_mb'], 'MB', 1)}")
    print(f"{'RSS after prompts (MB)':38} {rss_after / 1e6:12.1f}")
    print(f"{'prompt round trip, fresh (ms, median)':38} {results['prompt_fresh_ms_median']:12.2f}")
    print(f"{'prompt round trip, fresh (ms, p95)':38} {results['prompt_fresh_ms_p95']:12.2f}")
    print(f"{'prompt round trip, cached (ms, median)':38} {results['prompt_cached_ms_median']:12.2f}")
    out = HERE / "results" / "simulator.json"
    write_results(out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
