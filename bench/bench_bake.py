"""Cold boot of an ephemeral pod with and without a baked ROOT (the image's BAKE=1), simulated.

No Docker engine here, so the image layer is stood in for by a folder. Measured, each --repeat
times (median and min–max), in the same run, on the same ROOT path, with N simulated GPUs:

  not baked   a fresh, empty ROOT (an ephemeral pod's first boot): `orchestrator up` clones
              ComfyUI and the shared config (the demo's local file:// repositories), installs its
              three custom nodes (git clone, pip of a requirement already installed, an install
              script), then starts every instance; timed until every instance answers
              /system_stats.
  baked       ROOT restored from what `orchestrator up --provision-only` left (the image's
              layer; the copy is not timed), then the image's boot: `up` with
              COMFY_UPDATE=never (no fetch, nodes unchanged); timed the same way.

Local repositories and an installed requirement make "not baked" a lower bound: a real pod
clones ComfyUI and dozens of nodes from GitHub and runs their pip installs (minutes), which is
what baking removes.

    .venv/bin/python bench/bench_bake.py [--gpus 2] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

from benchutil import fmt, machine_note, spread, write_results  # noqa: E402
from support import answers, clean_env  # noqa: E402

from orchestrator.lifecycle.demo import build_sources, demo_settings  # noqa: E402
from orchestrator.machine.ports import free_port_block  # noqa: E402


def orchestrator(env: dict[str, str], *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"orchestrator {' '.join(args)} failed: {r.stderr.strip()[-400:]}")


def boot(env: dict[str, str], ports: list[int]) -> float:
    """Seconds from `up` to every instance answering; the machine is brought down after."""
    start = time.monotonic()
    try:
        orchestrator(env, "up")
        deadline = start + 300
        while not all(answers(p, timeout=0.5) for p in ports):
            if time.monotonic() > deadline:
                raise TimeoutError("instances never answered")
            time.sleep(0.05)
        return time.monotonic() - start
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator", "down"], env=env, capture_output=True, timeout=180)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run of each, one GPU")
    args = parser.parse_args()
    gpus, repeat = (1, 1) if args.quick else (args.gpus, args.repeat)
    with tempfile.TemporaryDirectory(prefix="bench-bake-") as tmp:
        base = Path(tmp)
        urls = build_sources(base / "src")
        root, layer = base / "root", base / "image-layer"
        port_base = free_port_block(gpus + 1)
        env = clean_env(**demo_settings(root, gpus, urls), WORKER_BASE_COMFYUI_PORT=str(port_base),
                        ORCHESTRATOR_PORT=str(free_port_block(1)), PIP_NO_INDEX="1",
                        PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_CONFIG_FILE=os.devnull)
        ports = [port_base + i for i in range(gpus)]
        orchestrator(env, "up", "--provision-only")  # the image build's step
        shutil.move(root, layer)
        times: dict[str, list[float]] = {"not baked": [], "baked": []}
        for _ in range(repeat):
            shutil.rmtree(root, ignore_errors=True)
            times["not baked"].append(boot(env, ports))
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(layer, root, symlinks=True)
            times["baked"].append(boot({**env, "COMFY_UPDATE": "never"}, ports))
    stats = {name: spread(values) for name, values in times.items()}
    for name, s in stats.items():
        print(f"{name:10} {fmt(s)}")
    ratio = statistics.median(times["not baked"]) / statistics.median(times["baked"])
    print(f"baked boots {ratio:.2f}x faster ({gpus} simulated GPU(s); {machine_note()})")
    write_results(HERE / "results" / ("bake_quick.json" if args.quick else "bake.json"),
                  {"gpus": gpus, "repeat": repeat, "seconds": stats, "ratio": round(ratio, 2), "note": machine_note()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
