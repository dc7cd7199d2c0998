"""Time from `orchestrator up` to every instance answering /system_stats, with N simulated GPUs.

Measured, each --repeat times (median and min–max), in the same run:

  ours, --skip-provision   `orchestrator up --skip-provision` (no git, no nodes, no models: the
                           code tree is already there), all instances in parallel under supervisord
  ours, full warm up       a full `orchestrator up` (comfy + shared repo sync, nodes sync, models)
                           of the demo's local repos after a first full `up` + `down`, with
                           nothing changed since; and `up` again while it runs (reconcile)
  legacy, re-enacted       the legacy start.sh no longer exists to run; this re-enacts its loop:
                           start instance 0, wait for its port, start instance 1, ...
  sims by hand at once     the same N simulators started together without the orchestrator:
                           their own startup at N. Overhead = ours minus this.

    .venv/bin/python bench/bench_startup.py [--counts 1,8] [--repeat 3] [--quick]
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
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

from benchutil import fmt, machine_note, spread  # noqa: E402
from support import ComfyServer, answers  # noqa: E402

from orchestrator.machine.ports import free_port_block  # noqa: E402
from orchestrator.simulator.tree import write_code_tree  # noqa: E402

T = TypeVar("T")

SCRUB = {"MOCK_GPU", "NUM_GPUS", "ROOT", "ORCHESTRATOR_TOKEN", "ORCHESTRATOR_CONFIG", "COMFY_ARGS",
         "SHARED_REPO_URL", "COMFY_REPO_URL", "WORKER_BASE_COMFYUI_PORT", "ORCHESTRATOR_PORT"}
BASE_ENV = {k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith(("SIM_", "PIP_"))}
# the demo's one node requirement (PyYAML) is installed here already: pip needs no index
BASE_ENV.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")


class Died(RuntimeError):
    """A simulator exited before answering (on a shared machine: its port was taken meanwhile)."""


def wait_ports(ports: list[int], timeout: float = 120, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ports)
    while pending:
        pending = {p for p in pending if not answers(p, timeout=0.5)}
        if time.monotonic() > deadline:
            raise TimeoutError(f"ports {sorted(pending)} never answered")
        if procs and any(p.poll() is not None for p in procs):
            raise Died(f"a simulator exited before answering (ports {sorted(pending)})")
        if pending:
            time.sleep(0.02)


def by_hand(root: Path, n: int, *, sequential: bool) -> float:
    """N simulators without the orchestrator: one after another, each waited for (the legacy
    start.sh, re-enacted), or all at once (the simulators' own startup at N). An attempt in which
    a simulator dies before answering (port taken by other work meanwhile) is repeated on fresh
    ports, up to 3 times."""
    return retried(f"by hand, N={n}", lambda: _by_hand(root, n, sequential=sequential))


def _by_hand(root: Path, n: int, *, sequential: bool) -> float:
    base = free_port_block(n)
    servers: list[ComfyServer] = []
    start = time.monotonic()
    try:
        for i in range(n):
            servers.append(ComfyServer(root / "ComfyUI", root / f"comfyui_gpu{i}", base + i))
            if sequential:
                wait_ports([base + i], procs=[s.proc for s in servers])
        wait_ports([base + i for i in range(n)], procs=[s.proc for s in servers])
        return time.monotonic() - start
    finally:
        for s in servers:
            s.proc.terminate()
        for s in servers:
            s.stop()


class PortTaken(RuntimeError):
    """`up` refused: a port of its block was taken by other work on this shared machine."""


def retried(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, again on fresh ports (``fn`` picks them) when other work took one meanwhile."""
    for attempt in range(3):
        try:
            return fn()
        except (PortTaken, Died) as exc:
            print(f"    {what}: {exc}; again on new ports ({attempt + 1}/3)", flush=True)
    raise RuntimeError(f"{what}: ports kept being taken")


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and args[0] != "down" and "already in use" in r.stderr + r.stdout:
        raise PortTaken(f"orchestrator {' '.join(args)}: {(r.stderr + r.stdout).strip().splitlines()[-1]}")
    if r.returncode != 0 and args[0] != "down":
        raise RuntimeError(f"orchestrator {' '.join(args)} failed: {r.stderr[-2000:]}{r.stdout[-2000:]}")
    return r


def machine_env(root: Path, n: int, **extra: str) -> tuple[dict[str, str], int]:
    base = free_port_block(n)
    env = {**BASE_ENV, "ROOT": str(root), "MOCK_GPU": "1", "NUM_GPUS": str(n), "WORKER_BASE_COMFYUI_PORT": str(base),
           "ORCHESTRATOR_PORT": str(free_port_block(1)), "SHARED_REPO_URL": "", **extra}
    return env, base


def ours_skip(root: Path, n: int) -> float:
    """`up --skip-provision` → every instance answers."""
    env, base = machine_env(root, n)
    start = time.monotonic()
    try:
        cli(env, "up", "--skip-provision")
        wait_ports([base + i for i in range(n)])
        return time.monotonic() - start
    finally:
        cli(env, "down")


def demo_env(root: Path, n: int, urls: dict[str, str]) -> tuple[dict[str, str], int]:
    from orchestrator.lifecycle.demo import demo_settings

    return machine_env(root, n, **demo_settings(root, n, urls))


def ours_full_warm(root: Path, n: int, urls: dict[str, str]) -> tuple[float, float, dict[str, object]]:
    """A full `up` (nothing changed since the last one) → every instance answers; then the CLI time
    of `up` again while everything runs (reconcile, nothing to do)."""
    env, base = demo_env(root, n, urls)
    start = time.monotonic()
    try:
        cli(env, "up")
        wait_ports([base + i for i in range(n)])
        to_answer = time.monotonic() - start
        from orchestrator.core.layout import Layout

        status = json.loads(Layout(root).status_file.read_text())  # what that `up` did, stage by stage
        t = time.monotonic()
        cli(env, "up")
        reconcile = time.monotonic() - t
        wait_ports([base + i for i in range(n)])
        return to_answer, reconcile, {"stages": status.get("stages"), "nodes": status.get("nodes")}
    finally:
        cli(env, "down")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="1,8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="N=1 only")
    args = ap.parse_args()
    counts = [1] if args.quick else [int(c) for c in args.counts.split(",")]
    print(f"{machine_note()}; ours = `orchestrator up` as a subprocess; legacy = a re-enactment", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        root = Path(tmp) / "skip"
        write_code_tree(root / "ComfyUI")
        # Warm-up: the first `up` creates state dirs and the shipped shared config.
        retried("warm-up up", lambda: ours_skip(root, 1))
        from orchestrator.lifecycle.demo import build_sources

        demo_root = Path(tmp) / "demo"
        urls = build_sources(demo_root / "demo-src")
        for n in counts:
            # the first full `up` at this N clones, syncs nodes and models: not timed
            def first_up(n: int = n) -> None:
                env, _ = demo_env(demo_root, n, urls)
                try:
                    cli(env, "up")
                finally:
                    cli(env, "down")

            retried("first full up", first_up)
            skip, full, reconcile, legacy, par = [], [], [], [], []
            for _ in range(args.repeat):
                skip.append(retried("up --skip-provision", lambda n=n: ours_skip(root, n)))
                f, r, warm_status = retried("full warm up", lambda n=n: ours_full_warm(demo_root, n, urls))
                full.append(f)
                reconcile.append(r)
                legacy.append(by_hand(root, n, sequential=True))
                par.append(by_hand(root, n, sequential=False))
            row = {"instances": n, "ours_skip_provision_s": spread(skip), "ours_full_warm_up_s": spread(full),
                   "ours_up_again_while_running_s": spread(reconcile), "legacy_reenacted_s": spread(legacy),
                   "sims_by_hand_at_once_s": spread(par), "full_warm_up_status": warm_status}
            row["overhead_skip_provision_s"] = round(row["ours_skip_provision_s"]["median"] - statistics.median(par), 3)
            row["overhead_full_warm_s"] = round(row["ours_full_warm_up_s"]["median"] - statistics.median(par), 3)
            rows.append(row)
            print(f"  N={n} done", flush=True)
    print(f"\nmedian (min–max) of {args.repeat}; overhead = ours minus the same N simulators started at once by hand")
    for r in rows:
        n = r["instances"]
        print(f"N={n}")
        print(f"  ours: up --skip-provision -> all answer      {fmt(r['ours_skip_provision_s'])}"
              f"   overhead {r['overhead_skip_provision_s']:.2f} s")
        print(f"  ours: full warm up (nothing changed) -> all  {fmt(r['ours_full_warm_up_s'])}"
              f"   overhead {r['overhead_full_warm_s']:.2f} s")
        print(f"  ours: up again while running (reconcile)     {fmt(r['ours_up_again_while_running_s'])}")
        st = r["full_warm_up_status"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in (st.get("stages") or {}).items())
        print(f"    full warm up, last run: nodes {st.get('nodes')}; stages (s): {stages}")
        print(f"  legacy sequential start (re-enactment)       {fmt(r['legacy_reenacted_s'])}")
        print(f"  {n} simulators started by hand at once        {fmt(r['sims_by_hand_at_once_s'])}")
    if rows[0]["instances"] == 1 and len(rows) > 1:
        t1 = rows[0]["ours_skip_provision_s"]["median"]
        for r in rows[1:]:
            print(f"N={r['instances']} vs N=1 (--skip-provision): {r['ours_skip_provision_s']['median'] / t1:.2f}x")
    out = HERE / "results" / "startup.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "load_average": os.getloadavg(), "repeat": args.repeat,
                               "legacy": "re-enactment of start.sh: start one, wait for its port, next",
                               "rows": rows,
                               "command": "python bench/bench_startup.py" + (" --quick" if args.quick else "")},
                              indent=2) + "\n")
    print(f"wrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
