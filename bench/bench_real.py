"""Real ComfyUI 0.3.64 (CPU): started by hand vs through `orchestrator up`, and recovery under the monitor.

Measured in one run, each --repeat times (median, min–max), for 1 and 2 instances:

  by hand            N ComfyUI processes started together with the orchestrator's flags (own port,
                     folders and database each): seconds to every first 200 on /system_stats.
                     This is ComfyUI's own start; nothing of ours in it.
  orchestrator up    `orchestrator up --skip-provision` (code tree in place) with MOCK_GPU=1 NUM_GPUS=N:
                     seconds to the last ComfyUI process spawned (our cost before ComfyUI runs), to
                     every /system_stats 200, and to the monitor's /readyz 200.
                     Overhead = orchestrator's /readyz median minus the by-hand median (target ≤ 1 s).

Then, with the production probe settings (PROBE_INTERVAL=5s, PROBE_TIMEOUT=3s,
UNHEALTHY_THRESHOLD=3, STOP_TIMEOUT=10s) and NUM_GPUS=1: SIGKILL of the instance → READY again,
and SIGSTOP → READY again (target ≤ 20 s), from the signal to the monitor reporting a new READY
process.

Needs the ComfyUI venv that the real test tier builds (tests/real/comfy_env.py; `make test` builds
it once, or pass --build). Without it this prints why and exits 0 having measured nothing.

    .venv/bin/python bench/bench_real.py [--repeat 3] [--quick] [--build]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE), str(REPO / "tests")]

from benchutil import fmt, machine_note, spread, write_results  # noqa: E402
from real.comfy_env import RealUnavailable, ensure_python, existing_python, unpack_comfy  # noqa: E402
from support import ComfyServer, answers, wait_for  # noqa: E402

from orchestrator.machine.ports import free_port_block  # noqa: E402

SCRUB = {"MOCK_GPU", "NUM_GPUS", "ROOT", "ORCHESTRATOR_TOKEN", "ORCHESTRATOR_CONFIG", "COMFY_ARGS", "COMFY_FLAGS",
         "SHARED_REPO_URL", "COMFY_REPO_URL", "WORKER_BASE_COMFYUI_PORT", "ORCHESTRATOR_PORT", "GPUS", "TEST_GPUS"}
TARGET_OVERHEAD = 1.0
TARGET_SIGSTOP = 20.0


def wait(pred: Any, timeout: float, what: str, interval: float = 0.05) -> float:
    """``time.monotonic()`` when ``pred()`` first held; AssertionError past ``timeout``."""
    wait_for(pred, timeout, interval, what)
    return time.monotonic()


def uptime() -> float:
    """Seconds since boot: the clock of /proc/<pid>/stat's start times (psutil's create_time adds
    the boot time, which /proc gives in whole seconds only)."""
    return float(Path("/proc/uptime").read_text().split()[0])


def started_at(pid: int) -> float:
    """Seconds since boot at which ``pid`` started (10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def by_hand(python: Path, tree: Path, work: Path, n: int) -> float:
    ports = [free_port_block(1) for _ in range(n)]
    t0 = time.monotonic()
    # The same folders every round, as the orchestrated runs reuse their ROOT: both warm alike.
    servers = [ComfyServer(tree, work / f"hand{n}-{i}", ports[i], python=python, kind="real") for i in range(n)]
    try:
        end = wait(lambda: all(s.answers() for s in servers), 180, "by-hand start")
        return end - t0
    finally:
        for s in servers:
            s.stop()


class Orchestrated:
    """A machine root with the ComfyUI tree in place; `up --skip-provision` / `down` around each run."""

    def __init__(self, python: Path, tree: Path, work: Path, n: int, **settings: str) -> None:
        self.root = work / f"orch{n}-{time.time_ns()}"
        self.root.mkdir(parents=True)
        shutil.copytree(tree, self.root / "ComfyUI", symlinks=True)
        self.n = n
        self.base = free_port_block(n + 1)
        self.monitor = free_port_block(1)
        env = {k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith(("SIM_", "PIP_"))}
        env.update(
            ROOT=str(self.root), MOCK_GPU="1", NUM_GPUS=str(n), WORKER_BASE_COMFYUI_PORT=str(self.base),
            ORCHESTRATOR_PORT=str(self.monitor), SHARED_REPO_URL="", COMFY_PYTHON=str(python),
            OUTPUT_MAX_AGE="0", CUDA_VISIBLE_DEVICES="", **settings,
        )
        self.env = env

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def orchestrator_cpu(self) -> float:
        """CPU seconds used so far by supervisord and its children other than ComfyUI (the monitor)."""
        import psutil

        data = json.loads(self.cli("status", "--json").stdout)
        comfy = {i["pid"] for i in data["instances"]}
        sup = psutil.Process(data["supervisord"]["pid"])
        total = 0.0
        for proc in [sup, *sup.children(recursive=True)]:
            if proc.pid not in comfy:
                try:
                    t = proc.cpu_times()
                except psutil.Error:
                    continue
                total += t.user + t.system
        return total

    def up(self) -> tuple[float, float, float]:
        """Seconds from the `up` command to: the last ComfyUI process spawned, every /system_stats 200,
        and /readyz 200."""
        t0, boot0 = time.monotonic(), uptime()
        r = self.cli("up", "--skip-provision")
        if r.returncode != 0:
            raise RuntimeError(f"orchestrator up failed: {r.stderr}{r.stdout}")
        ports = [self.base + i for i in range(self.n)]
        answered = wait(lambda: all(answers(p) for p in ports), 180, "instances")
        ready = wait(lambda: answers(self.monitor, "/readyz"), 60, "readyz")
        spawned = max(started_at(self.instance(i)["pid"]) for i in range(self.n)) - boot0
        return spawned, answered - t0, ready - t0

    def instance(self, gpu: int = 0) -> dict[str, Any]:
        got = requests.get(f"http://127.0.0.1:{self.monitor}/instances/{gpu}", timeout=5).json()
        return dict(got)

    def recover(self, sig: signal.Signals) -> tuple[float, float]:
        """Seconds from ``sig`` to the new process's spawn, and to the monitor reporting it READY."""
        old = self.instance()["pid"]
        t0, boot0 = time.monotonic(), uptime()
        os.kill(old, sig)

        def back() -> bool:
            try:
                inst = self.instance()
            except (requests.RequestException, ValueError):
                return False
            return bool(inst["pid"] not in (None, old) and inst["state"] == "READY")

        try:
            ready = wait(back, 180, f"{sig.name} -> READY", 0.1) - t0
            return started_at(self.instance()["pid"]) - boot0, ready
        finally:
            if sig is signal.SIGSTOP:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old, signal.SIGCONT)

    def down(self) -> None:
        self.cli("down")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 and 2 instances once each; one recovery each")
    ap.add_argument("--build", action="store_true", help="build the ComfyUI venv if missing (~70 s, ~5.4 GB)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "real.json")
    args = ap.parse_args()
    try:
        python = ensure_python(print) if args.build else existing_python()
    except RealUnavailable as exc:
        print(f"bench_real: skipped: {exc}")
        return 0
    if python is None:
        print("bench_real: skipped: no ComfyUI venv yet (run `make test` once, or bench/bench_real.py --build)")
        return 0
    repeat = 1 if args.quick else max(3, args.repeat)
    print(f"real ComfyUI 0.3.64 on CPU; python {python}; {machine_note()}")
    results: dict[str, Any] = {"machine": machine_note(), "repeat": repeat, "startup": {}, "recovery": {}}
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        work = Path(tmp)
        tree = unpack_comfy(work / "src")
        for n in (1, 2):
            hand: list[float] = []
            spawned: list[float] = []
            cpu: list[float] = []
            answered: list[float] = []
            readyz: list[float] = []
            o = Orchestrated(python, tree, work, n, PROBE_INTERVAL="5s")  # one ROOT, up/down each round
            for _ in range(repeat):  # interleaved, so drift in the machine's load hits both alike
                hand.append(by_hand(python, tree, work, n))
                try:
                    sp, a, r = o.up()
                    cpu.append(o.orchestrator_cpu())
                finally:
                    o.down()
                spawned.append(sp)
                answered.append(a)
                readyz.append(r)
            shutil.rmtree(o.root, ignore_errors=True)
            row = {"by_hand": spread(hand), "orchestrator_spawned": spread(spawned),
                   "orchestrator_answered": spread(answered), "orchestrator_readyz": spread(readyz),
                   "readyz_after_answered": spread([r - a for r, a in zip(readyz, answered, strict=True)]),
                   "orchestrator_cpu_s_until_ready": spread(cpu)}
            row["overhead_readyz_s"] = round(row["orchestrator_readyz"]["median"] - row["by_hand"]["median"], 3)
            results["startup"][str(n)] = row
            print(f"\n{n} instance(s):")
            print(f"  by hand, to /system_stats        {fmt(row['by_hand'])}")
            print(f"  orchestrator up, ComfyUI spawned {fmt(row['orchestrator_spawned'])}")
            print(f"  orchestrator up, /system_stats   {fmt(row['orchestrator_answered'])}")
            print(f"  orchestrator up, /readyz 200     {fmt(row['orchestrator_readyz'])}")
            over = row['overhead_readyz_s']
            print(f"  /readyz after /system_stats      {fmt(row['readyz_after_answered'])}")
            print(f"  CPU of supervisord + monitor     {fmt(row['orchestrator_cpu_s_until_ready'], 'CPU-s')}")
            print(f"  overhead (readyz - by hand)      {over:+.2f} s (target ≤ {TARGET_OVERHEAD} s)")

        o = Orchestrated(python, tree, work, 1)  # production probe settings: nothing set
        try:
            o.up()
            for sig in (signal.SIGKILL, signal.SIGSTOP):
                times, spawns = [], []
                for _ in range(1 if args.quick else repeat):
                    spawn, ready = o.recover(sig)
                    spawns.append(spawn)
                    times.append(ready)
                    time.sleep(1)
                results["recovery"][sig.name] = spread(times)
                results["recovery"][f"{sig.name}_new_process_spawned"] = spread(spawns)
                print(f"\n{sig.name} -> READY (defaults: PROBE_INTERVAL 5s, PROBE_TIMEOUT 3s)  {fmt(spread(times))}")
                print(f"  of which: signal -> new ComfyUI process spawned       {fmt(spread(spawns))}")
        finally:
            o.down()
    over = max(r["overhead_readyz_s"] for r in results["startup"].values())
    stop = results["recovery"]["SIGSTOP"]["median"]
    results["targets"] = {"overhead_readyz_s": over, "overhead_ok": over <= TARGET_OVERHEAD,
                          "sigstop_ready_s": stop, "sigstop_ok": stop <= TARGET_SIGSTOP}
    print()
    write_results(args.out, results)
    ok = results["targets"]["overhead_ok"] and results["targets"]["sigstop_ok"]
    print(f"targets: overhead {over:+.2f} s (≤ {TARGET_OVERHEAD}), SIGSTOP -> READY {stop:.1f} s (≤ {TARGET_SIGSTOP}):"
          f" {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
