"""Benchmark of the monitor: recovery after SIGKILL and after a hang, /metrics latency, RSS.

Runs real machines (`orchestrator up --skip-provision`, supervisord, the simulator as ComfyUI,
MOCK_GPU=1) in a temporary ROOT and compares with the targets in the same run:

  crash → READY      ≤ 2 s + the instance's own startup (measured in the same run)
  hang  → READY      ≤ UNHEALTHY_THRESHOLD × PROBE_INTERVAL + PROBE_TIMEOUT + startup, from the
                     settings this run's machine uses (3 × 5 s + 3 s + startup with the defaults).
                     The hang is a real SIGSTOP of the instance process; the clock starts just
                     before the signal and stops when the monitor reports the new process READY.
                     A fault-file hang (the simulator stops answering but its process runs) is
                     measured once more for comparison, from the moment the file is written
                     (the simulator re-reads it every 0.5 s).
  /metrics p99       ≤ 25 ms with 8 instances and 8 mock GPUs, 10 scrapes/s for 30 s, one hung
                     (fault file: its process runs, never answers; UNHEALTHY_THRESHOLD=100 keeps it)
  monitor RSS        ≤ 80 MB

Usage: python bench/bench_monitor.py [--quick]   (writes bench/results/bench_monitor.json)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from benchutil import fmt, machine_note, spread, write_results  # noqa: E402
from support import answers, http_client, simulated_machine, wait_until  # noqa: E402

RESULTS = REPO / "bench" / "results" / "bench_monitor.json"


class Machine:
    """A simulated machine with the product's probe settings, and one kept-alive HTTP session."""

    def __init__(self, root: Path, gpus: int, **env: str) -> None:
        self.machine = simulated_machine(root, gpus, fast=False, **env)
        self.root = root
        self.gpus = gpus
        self.base = self.machine.port_base
        self.env = self.machine.env
        self.url = self.machine.monitor_url
        self.client = http_client(self.url, timeout=5)

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.machine.run(*args, timeout=timeout)

    def instance(self, gpu: int) -> dict[str, Any]:
        try:
            return dict(self.client.get(f"/instances/{gpu}").json())
        except (requests.RequestException, ValueError):
            return {}

    def ready(self) -> bool:
        try:
            return self.client.get("/readyz").status_code == 200
        except requests.RequestException:
            return False

    def answers(self, gpu: int) -> bool:
        return answers(self.base + gpu, timeout=0.5)

    def monitor_pid(self) -> int:
        status = json.loads(self.cli("status", "--json").stdout)
        return int(status["programs"]["monitor"]["pid"])


@contextmanager
def machine(tmp: Path, name: str, gpus: int, **env: str) -> Iterator[Machine]:
    m = Machine(tmp / name, gpus, **env)
    try:
        r = m.cli("up", "--skip-provision")
        if r.returncode != 0:
            raise RuntimeError(f"up failed: {r.stderr}{r.stdout}")
        if not wait_until(m.ready, 180, 0.2):
            raise RuntimeError(f"not ready: {m.cli('status').stdout}")
        yield m
    finally:
        m.client.close()
        m.cli("down")


def _uptime() -> float:
    """Seconds since boot: the clock /proc/<pid>/stat start times use."""
    return float(Path("/proc/uptime").read_text().split()[0])


def _started(pid: int) -> float:
    """When ``pid`` started, in seconds since boot (clock-tick precision)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def recover_from_kill(m: Machine, gpu: int) -> dict[str, float]:
    old = int(m.instance(gpu)["pid"])
    t0, boot0 = time.monotonic(), _uptime()
    os.kill(old, signal.SIGKILL)
    # when the new process answers on its port by itself, and when the monitor calls it READY
    assert wait_until(lambda: m.answers(gpu), 60, 0.01), "instance did not come back"
    t_answer = time.monotonic()
    def recovered() -> bool:
        info = m.instance(gpu)
        return info.get("state") == "READY" and info.get("pid") != old

    assert wait_until(recovered, 60, 0.02)
    t_ready = time.monotonic()
    spawned = _started(int(m.instance(gpu)["pid"])) - boot0  # seconds after the kill
    return {"total_s": t_ready - t0, "respawn_s": spawned, "instance_startup_s": t_answer - t0 - spawned,
            "monitor_lag_s": t_ready - t_answer}


def recover_from_hang(m: Machine, gpu: int, how: str) -> dict[str, float]:
    old = int(m.instance(gpu)["pid"])
    faults = m.root / f"comfyui_gpu{gpu}" / "user" / "simulator_faults.json"
    t0 = time.monotonic()
    if how == "sigstop":
        os.kill(old, signal.SIGSTOP)
    else:
        faults.write_text(json.dumps({"hang_after": 0}))  # the simulator notices within 0.5 s
    try:
        assert wait_until(lambda: m.instance(gpu).get("pid") not in (None, old), 120, 0.02), "never restarted"
        t_restart = time.monotonic()
        if how != "sigstop":
            faults.unlink()
        assert wait_until(lambda: m.answers(gpu), 60, 0.01)
        t_answer = time.monotonic()
        assert wait_until(lambda: m.instance(gpu).get("state") == "READY", 60, 0.02)
        t_ready = time.monotonic()
    finally:
        if how == "sigstop":
            with contextlib.suppress(ProcessLookupError):
                os.kill(old, signal.SIGCONT)
    return {"how": how, "total_s": t_ready - t0, "detect_and_restart_s": t_restart - t0,
            "instance_startup_s": t_answer - t_restart, "monitor_lag_s": t_ready - t_answer}


def scrape_load(m: Machine, rate: float, duration: float) -> dict[str, Any]:
    """GET /metrics at ``rate`` per second; /healthz in between, as the same-run floor."""
    latencies: list[float] = []
    floor: list[float] = []
    rss: list[int] = []
    proc = psutil.Process(m.monitor_pid())
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.is_set():
            rss.append(proc.memory_info().rss)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    errors = 0
    with http_client(timeout=5) as client:
        start = time.perf_counter()
        n = 0
        while True:
            due = start + n / rate
            now = time.perf_counter()
            if due - start >= duration:
                break
            if due > now:
                time.sleep(due - now)
            t = time.perf_counter()
            r = client.get(f"{m.url}/metrics")
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200 or "comfyui_instance_ready" not in r.text:
                errors += 1
            time.sleep(0.5 / rate)
            t = time.perf_counter()
            client.get(f"{m.url}/healthz")
            floor.append(time.perf_counter() - t)
            n += 1
    stop.set()
    sampler.join()
    latencies.sort()
    floor.sort()
    return {
        "healthz_p50_ms": 1000 * statistics.median(floor),
        "healthz_p99_ms": 1000 * floor[max(0, int(len(floor) * 0.99) - 1)],
        "scrapes": len(latencies),
        "errors": errors,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[max(0, int(len(latencies) * 0.99) - 1)],
        "max_ms": 1000 * latencies[-1],
        "rss_max_mb": max(rss) / 2**20,
        "rss_end_mb": rss[-1] / 2**20,
        "body_bytes": len(r.text),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s of scraping instead of 30 s")
    args = parser.parse_args()
    reps = 3
    duration = 10.0 if args.quick else 30.0
    results: dict[str, Any] = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        tmp_path = Path(tmp)
        # 1. recovery with the default probe settings (2 instances keep the box responsive)
        with machine(tmp_path, "recovery", 2, STOP_TIMEOUT="10") as m:
            from orchestrator.core.settings import load_settings

            settings = load_settings(m.env)
            interval, timeout = settings.probe_interval, settings.probe_timeout
            threshold = settings.unhealthy_threshold
            kills = [recover_from_kill(m, i % 2) for i in range(reps)]
            stops = [recover_from_hang(m, i % 2, "sigstop") for i in range(reps)]
            fault = recover_from_hang(m, 0, "fault")
        results["settings"] = {"PROBE_INTERVAL": interval, "PROBE_TIMEOUT": timeout,
                               "UNHEALTHY_THRESHOLD": threshold, "STOP_TIMEOUT": 10}
        results["kill"] = kills
        results["hang_sigstop"] = stops
        results["hang_fault_file"] = fault
        # 2. /metrics under load: 8 instances, 8 mock GPUs, one instance hung for the whole run
        with machine(tmp_path, "scrape", 8, UNHEALTHY_THRESHOLD="100", GPU_SAMPLE_INTERVAL="1") as m:
            # The hung instance's process runs but never answers (the simulator's fault file): a
            # SIGSTOPped one would be replaced within seconds (the monitor sees state T at once).
            hung = int(m.instance(7)["pid"])
            faults = m.root / "comfyui_gpu7" / "user" / "simulator_faults.json"
            faults.write_text(json.dumps({"hang_after": 0}))
            try:
                time.sleep(2 * interval)  # let probes of the hung instance pile onto their timeout
                results["scrape"] = scrape_load(m, 10.0, duration)
                info = m.instance(7)
                results["scrape"]["hung_state"] = info.get("state")
                # whether the hung process stayed (hung the whole run) or the monitor replaced it
                results["scrape"]["hung_replaced"] = info.get("pid") not in (None, hung)
                results["scrape"]["hung_answers"] = m.answers(7)
            finally:
                faults.unlink(missing_ok=True)

    kill_s = spread([k["total_s"] for k in kills])
    kill_start = statistics.median(k["instance_startup_s"] for k in kills)
    stop_s = spread([h["total_s"] for h in stops])
    hang_target = threshold * interval + timeout + kill_start  # the instance's own startup, from the kill runs
    results["crash_to_ready_s"] = kill_s
    results["sigstop_to_ready_s"] = stop_s
    results["hang_target_s"] = hang_target
    s = results["scrape"]
    basis = f"{threshold}x{interval:g}+{timeout:g}+startup {kill_start:.2f} s"
    rows = [
        ("crash -> READY (median of 3)", kill_s["median"], 2.0 + kill_start, "s", f"2 s + startup {kill_start:.2f} s"),
        ("crash -> READY (worst of 3)", kill_s["max"], 2.0 + kill_start, "s", "same"),
        ("crash: monitor lag after answer", statistics.median(k["monitor_lag_s"] for k in kills), 2.0, "s",
         "2 s"),
        ("SIGSTOP -> READY (median of 3)", stop_s["median"], hang_target, "s", basis),
        ("SIGSTOP -> READY (worst of 3)", stop_s["max"], hang_target, "s", "same"),
        ("fault-file hang -> READY (1 run)", fault["total_s"], hang_target + 0.5, "s", "same + 0.5 s re-read"),
        ("/metrics p50", s["p50_ms"], 25.0, "ms", "p99 target"),
        ("/metrics p99", s["p99_ms"], 25.0, "ms", "25 ms"),
        ("/healthz p99 (same-run floor)", s["healthz_p99_ms"], 25.0, "ms", "no rendering: HTTP + scheduling"),
        ("monitor RSS (max)", s["rss_max_mb"], 80.0, "MB", "80 MB"),
    ]
    print(f"\nmonitor benchmark ({machine_note()})")
    print(f"settings: PROBE_INTERVAL {interval:g} s, PROBE_TIMEOUT {timeout:g} s, UNHEALTHY_THRESHOLD {threshold}")
    print(f"crash -> READY {fmt(kill_s)}; SIGSTOP -> READY {fmt(stop_s)}; target {hang_target:.2f} s")
    print(f"{'measure':<34}{'value':>10}  {'target':>10}  {'ratio':>6}  basis")
    for name, value, target, unit, basis_ in rows:
        ratio = value / target
        print(f"{name:<34}{value:>8.2f}{unit:<2}  {target:>8.2f}{unit:<2}  {ratio:>6.2f}  {basis_}")
    print(f"scrapes: {s['scrapes']} ({s['errors']} errors) over {duration:.0f} s, max {s['max_ms']:.1f} ms, "
          f"hung instance at the end: {s['hung_state']}"
          f"{' (the monitor had replaced the hung process)' if s['hung_replaced'] else ' (same process)'}, "
          f"answers /system_stats at the end: {s['hung_answers']}, "
          f"body {s['body_bytes']} bytes")
    results["summary"] = [
        {"measure": n, "value": v, "target": t, "unit": u, "ratio": v / t, "basis": b}
        for n, v, t, u, b in rows
    ]
    results["command"] = "python bench/bench_monitor.py" + (" --quick" if args.quick else "")
    write_results(RESULTS, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
