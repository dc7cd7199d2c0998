"""The job API against posting directly to ComfyUI (the simulator), in one run.

    /work/venv/bin/python bench/bench_jobs.py                 # 200 latency pairs; 24 jobs of 1 s
    /work/venv/bin/python bench/bench_jobs.py --quick         # 60 pairs; 16 jobs of 0.5 s

1. Added latency per job. Baseline: what a worker does on its own against one instance: open
   /ws?clientId, POST /prompt, wait for `executing` with node null, GET /history. Measured:
   POST /jobs (wait=true) to the job API, which does the same on the worker's behalf. The
   simulator runs with SIM_EXEC_TIME=0; direct and job API runs alternate; every job has a
   fresh seed (no cache hits). Target: the job API adds ≤ 5 ms at p50.
2. Throughput: the same burst of jobs (SIM_EXEC_TIME=1 s each, all submitted at once) through
   a job API over 1 instance, then over 4. Target: 4 instances ≥ 3.5× one. The simulator
   spends some real CPU per prompt (events, a PNG written with fsync) on top of the simulated
   time; on a small, busy host four simulators contend for it, which a short SIM_EXEC_TIME
   turns into a lower ratio that says nothing about the router (try --exec-time 0.25).
3. Fork job: time from server done to success. A simulator in the fleet fork's mode
   (SIM_PROTOCOL=fork: /ws ignores ?clientId= and assigns its own id); per job, the job's
   finished_at minus the server's execution_success timestamp (its `executing` null follows
   at once). Measured twice: with the tracker adopting the fork's client_id (events on the
   socket), and with the socket silent for the prompt (own id kept: /history polling only).
   Target: ≤ 1 s at p99 for both.

The job API runs in its own process (this script with --serve), as it does under the monitor.
Writes bench/results/bench_jobs.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchutil import write_results  # noqa: E402
from support import ComfyServer, free_port, jobs_app  # noqa: E402

WORKFLOW = json.loads((ROOT / "examples" / "workflow.json").read_text())["workflow"]
RESULTS = ROOT / "bench" / "results" / "bench_jobs.json"


async def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer in {timeout}s")


class Procs:
    """Processes this script started; all killed at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []

    def sim(self, exec_time: float, protocol: str = "upstream") -> int:
        from orchestrator.simulator.tree import write_code_tree

        tree = self.base / "ComfyUI"
        if not tree.exists():
            write_code_tree(tree)
        port = free_port()
        env = {"SIM_EXEC_TIME": str(exec_time), "SIM_PROTOCOL": protocol}
        self.procs.append(ComfyServer(tree, self.base / f"sim{port}", port, env=env).proc)
        return port

    def job_api(self, sim_ports: list[int], silent_socket: bool = False) -> int:
        port = free_port()
        extra = ["--silent-socket"] if silent_socket else []
        self.procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port), ",".join(map(str, sim_ports)), *extra],
                stdout=subprocess.DEVNULL,
                stderr=None,
            )
        )
        return port

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(10)


# ---------------------------------------------------------------- the job API process
def serve(port: int, sim_ports: list[int], silent_socket: bool = False) -> None:
    import uvicorn
    from prometheus_client import CollectorRegistry

    from orchestrator.core.instances import InstanceView
    from orchestrator.core.settings import load_settings
    from orchestrator.core.states import InstanceState
    from orchestrator.jobs.tracker import JobManager

    class Directory:
        def __init__(self) -> None:
            self.views = [InstanceView(i, f"comfyui_gpu{i}", p, InstanceState.READY) for i, p in enumerate(sim_ports)]

        def snapshot(self) -> list[InstanceView]:
            return list(self.views)

        def report_hung(self, index: int, reason: str) -> None:
            print(f"hung: {index}: {reason}", file=sys.stderr)

    if silent_socket:

        from orchestrator.comfy.client import ComfySocket

        async def keep_own_id(socket: ComfySocket, timeout: float = 2.0) -> tuple[str, str]:
            return socket.client_id, ""  # ignore the fork's client_id message: no event reaches the socket

        ComfySocket.read_greeting = keep_own_id  # type: ignore[method-assign,assignment]

    settings = load_settings({"ROOT": tempfile.gettempdir(), "MAX_QUEUE_DEPTH": "10000", "JOB_TIMEOUT": "300"})
    manager = JobManager(settings, Directory(), CollectorRegistry())
    uvicorn.run(jobs_app(manager), host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------- clients
_seed = iter(range(1, 1 << 40))


def workflow() -> dict[str, Any]:
    wf = json.loads(json.dumps(WORKFLOW))
    wf["3"]["inputs"]["seed"] = next(_seed)
    return wf


async def direct_job(session: aiohttp.ClientSession, base: str) -> float:
    """What a worker does on its own: ws, POST /prompt, wait for the end, GET /history."""
    started = time.perf_counter()
    client_id = uuid.uuid4().hex
    async with session.ws_connect(f"{base}/ws", params={"clientId": client_id}) as ws:
        async with session.post(f"{base}/prompt", json={"prompt": workflow(), "client_id": client_id}) as r:
            prompt_id = (await r.json())["prompt_id"]
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            m = json.loads(msg.data)
            if m["type"] == "executing" and m["data"].get("node") is None and m["data"].get("prompt_id") == prompt_id:
                break
    async with session.get(f"{base}/history/{prompt_id}") as r:
        outputs = (await r.json())[prompt_id]["outputs"]
    assert outputs, "no outputs"
    return time.perf_counter() - started


async def api_job(session: aiohttp.ClientSession, base: str) -> float:
    started = time.perf_counter()
    async with session.post(f"{base}/jobs", json={"workflow": workflow()}) as r:
        body = await r.json()
    assert r.status == 200, body
    assert body["status"] == "success", body
    return time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


async def latency(procs: Procs, pairs: int) -> dict[str, Any]:
    sim = procs.sim(0.0)
    api = procs.job_api([sim])
    api_pid = procs.procs[-1].pid
    sim_url, api_url = f"http://127.0.0.1:{sim}", f"http://127.0.0.1:{api}"
    await wait_http(f"{sim_url}/system_stats")
    await wait_http(f"{api_url}/jobs/none")
    direct: list[float] = []
    through: list[float] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(10):  # warm up both paths
            await direct_job(session, sim_url)
            await api_job(session, api_url)
        cpu0 = cpu_seconds(api_pid)
        for i in range(pairs):
            # Alternate the order so neither path always runs first.
            if i % 2:
                direct.append(await direct_job(session, sim_url))
                through.append(await api_job(session, api_url))
            else:
                through.append(await api_job(session, api_url))
                direct.append(await direct_job(session, sim_url))
        cpu = cpu_seconds(api_pid) - cpu0
    ms = 1000.0
    diffs = [a - d for a, d in zip(through, direct, strict=True)]
    return {
        "pairs": pairs,
        "direct_p50_ms": pct(direct, 0.5) * ms,
        "direct_p99_ms": pct(direct, 0.99) * ms,
        "api_p50_ms": pct(through, 0.5) * ms,
        "api_p99_ms": pct(through, 0.99) * ms,
        # p50: the median of paired differences (each pair ran back to back, under the same load).
        "added_p50_ms": pct(diffs, 0.5) * ms,
        "added_p99_ms": (pct(through, 0.99) - pct(direct, 0.99)) * ms,
        "added_p50_of_medians_ms": (pct(through, 0.5) - pct(direct, 0.5)) * ms,
        "api_cpu_ms_per_job": cpu / pairs * ms,
    }


async def burst(api_url: str, jobs: int) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await api_job(session, api_url)  # warm up
        started = time.perf_counter()
        await asyncio.gather(*(api_job(session, api_url) for _ in range(jobs)))
        return time.perf_counter() - started


async def throughput(procs: Procs, jobs: int, exec_time: float) -> dict[str, Any]:
    sims = [procs.sim(exec_time) for _ in range(4)]
    one, four = procs.job_api(sims[:1]), procs.job_api(sims)
    for p in sims:
        await wait_http(f"http://127.0.0.1:{p}/system_stats")
    for p in (one, four):
        await wait_http(f"http://127.0.0.1:{p}/jobs/none")
    t1 = await burst(f"http://127.0.0.1:{one}", jobs)
    t4 = await burst(f"http://127.0.0.1:{four}", jobs)
    return {
        "jobs": jobs,
        "exec_time_s": exec_time,
        "one_s": t1,
        "four_s": t4,
        "one_jobs_per_s": jobs / t1,
        "four_jobs_per_s": jobs / t4,
        "ratio": t1 / t4,
        "ideal_one_s": jobs * exec_time,
    }


async def done_to_success(session: aiohttp.ClientSession, api_url: str, sim_url: str) -> float:
    """Seconds from the server's execution_success to the job's finished_at (both wall clock)."""
    async with session.post(f"{api_url}/jobs", json={"workflow": workflow()}) as r:
        body = await r.json()
    assert body["status"] == "success", body
    async with session.get(f"{sim_url}/history/{body['prompt_id']}") as r:
        entry = (await r.json())[body["prompt_id"]]
    (ts,) = [m[1]["timestamp"] for m in entry["status"]["messages"] if m[0] == "execution_success"]
    return float(body["finished_at"]) - ts / 1000.0


async def fork_done(procs: Procs, jobs: int) -> dict[str, Any]:
    sim = procs.sim(0.3, protocol="fork")
    adopted, silent = procs.job_api([sim]), procs.job_api([sim], silent_socket=True)
    sim_url = f"http://127.0.0.1:{sim}"
    await wait_http(f"{sim_url}/system_stats")
    out: dict[str, Any] = {"jobs": jobs, "exec_time_s": 0.3}
    async with aiohttp.ClientSession() as session:
        for name, port in (("adopted", adopted), ("silent", silent)):
            api_url = f"http://127.0.0.1:{port}"
            await wait_http(f"{api_url}/jobs/none")
            lags = [await done_to_success(session, api_url, sim_url) for _ in range(jobs)]
            out[f"{name}_p50_s"] = pct(lags, 0.5)
            out[f"{name}_p99_s"] = pct(lags, 0.99)
            out[f"{name}_max_s"] = max(lags)
    return out


async def run(pairs: int, jobs: int, exec_time: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_jobs.") as tmp:
        procs = Procs(Path(tmp))
        try:
            lat = await latency(procs, pairs)
            thr = await throughput(procs, jobs, exec_time)
            fork = await fork_done(procs, jobs)
        finally:
            procs.close()
    return {"latency": lat, "throughput": thr, "fork_done_to_success": fork}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "SIM_PORTS"), help=argparse.SUPPRESS)
    parser.add_argument("--silent-socket", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer jobs")
    parser.add_argument("--exec-time", type=float, help="simulated seconds per prompt (throughput; default 1)")
    parser.add_argument("--jobs", type=int, help="jobs per throughput burst (default 24)")
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), [int(p) for p in args.serve[1].split(",")], args.silent_socket)
        return 0
    pairs, jobs, exec_time = (60, 16, 0.5) if args.quick else (200, 24, 1.0)
    result = asyncio.run(run(pairs, args.jobs or jobs, args.exec_time or exec_time))
    lat, thr, fork = result["latency"], result["throughput"], result["fork_done_to_success"]
    result["targets"] = {
        "added_p50_ms_max": 5.0,
        "added_p50_ok": lat["added_p50_ms"] <= 5.0,
        "ratio_min": 3.5,
        "ratio_ok": thr["ratio"] >= 3.5,
        "fork_done_to_success_p99_s_max": 1.0,
        "fork_done_to_success_ok": max(fork["adopted_p99_s"], fork["silent_p99_s"]) <= 1.0,
    }
    result["host"] = {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]}
    print(
        f"latency per job, SIM_EXEC_TIME=0, {lat['pairs']} jobs each way (alternating; added p50 = median of "
        "paired differences)"
    )
    print(f"  {'':<34}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"  {'direct to one simulator':<34}{lat['direct_p50_ms']:>9.2f}{lat['direct_p99_ms']:>9.2f}")
    print(f"  {'through the job API':<34}{lat['api_p50_ms']:>9.2f}{lat['api_p99_ms']:>9.2f}")
    print(
        f"  {'added by the job API':<34}{lat['added_p50_ms']:>9.2f}{lat['added_p99_ms']:>9.2f}"
        f"   target p50 <= 5 ms: {'ok' if result['targets']['added_p50_ok'] else 'MISSED'}"
    )
    print(
        f"  (difference of the medians: {lat['added_p50_of_medians_ms']:.2f} ms; job API process CPU per job: "
        f"{lat['api_cpu_ms_per_job']:.2f} ms; host load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(f"throughput, {thr['jobs']} jobs at once, SIM_EXEC_TIME={thr['exec_time_s']} s")
    print(f"  {'':<34}{'seconds':>9}{'jobs/s':>9}")
    print(f"  {'1 instance':<34}{thr['one_s']:>9.2f}{thr['one_jobs_per_s']:>9.2f}")
    print(f"  {'4 instances':<34}{thr['four_s']:>9.2f}{thr['four_jobs_per_s']:>9.2f}")
    print(
        f"  4 instances / 1 instance: {thr['ratio']:.2f}x   target >= 3.5x: "
        f"{'ok' if result['targets']['ratio_ok'] else 'MISSED'}"
    )
    print(f"fork job: time from server done to success, {fork['jobs']} jobs each, SIM_PROTOCOL=fork")
    print(f"  {'':<34}{'p50 s':>9}{'p99 s':>9}{'max s':>9}")
    for name, label in (("adopted", "socket (fork client_id adopted)"), ("silent", "socket silent: /history polls")):
        print(f"  {label:<34}{fork[name + '_p50_s']:>9.3f}{fork[name + '_p99_s']:>9.3f}{fork[name + '_max_s']:>9.3f}")
    print(f"  target p99 <= 1 s: {'ok' if result['targets']['fork_done_to_success_ok'] else 'MISSED'}")
    write_results(RESULTS, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
