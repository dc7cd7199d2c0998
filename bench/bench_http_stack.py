"""Benchmark of the monitor's HTTP stack: /metrics, /readyz, /healthz under many clients, per variant.

The monitor's FastAPI app (``monitor.api.create_app``, the real routes, ExpositionCache and
registry rendering) on a fake control plane (tests/test_api.py's FakeControl, 2 instances, a
registry of 2 × 40 gauges), served by uvicorn in a subprocess on a socket from
``monitor.app.bind_socket``, with the HTTP parser, the event loop and the probe fast path
(``monitor.api.ProbeFastPath``) varied:

  h11+asyncio            uvicorn's pure-Python parser, the stdlib loop, every request through FastAPI
  httptools+asyncio      the C parser (httptools)
  httptools+uvloop       the C parser and uvloop
  h11+asyncio+fast       the probe paths answered in front of FastAPI
  httptools+uvloop+fast  all three (the monitor's default)

C concurrent aiohttp clients (keep-alive, one connection each; bench_scrape.load) cycle through
the three paths for T seconds. Variants interleave within each repetition (rep 1: every variant,
rep 2: ...) so they share the machine's load; median of --reps, ratios against h11+asyncio.

Usage: python bench/bench_http_stack.py [--quick] [--reps N]   (--quick: 50 clients, 5 s;
writes bench/results/http_stack.json, --quick http_stack_quick.json)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from benchutil import machine_note, spread, write_results  # noqa: E402
from support import answers, free_port, wait_until  # noqa: E402

RESULTS = REPO / "bench" / "results" / "http_stack.json"
ENDPOINTS = ("/metrics", "/readyz", "/healthz")
VARIANTS = {  # name: (http parser, loop, fast path)
    "h11+asyncio": ("h11", "asyncio", False),
    "httptools+asyncio": ("httptools", "asyncio", False),
    "httptools+uvloop": ("httptools", "uvloop", False),
    "h11+asyncio+fast": ("h11", "asyncio", True),
    "httptools+uvloop+fast": ("httptools", "uvloop", True),
}
BASELINE = "h11+asyncio"


def serve(variant: str, port: int) -> None:
    """The server process: the monitor's app on a fake control plane, served as ``variant`` says."""
    import tempfile

    from prometheus_client import CollectorRegistry, Gauge
    from test_api import FakeControl

    from orchestrator.core.settings import load_settings
    from orchestrator.monitor.api import create_app, with_fast_probes
    from orchestrator.monitor.app import bind_socket, run_server, uvicorn_config

    http, loop, fast = VARIANTS[variant]
    settings = load_settings({"ROOT": tempfile.mkdtemp(prefix="bench-http-")})
    registry = CollectorRegistry(auto_describe=False)
    for i in range(40):
        g = Gauge(f"bench_metric_{i}", f"metric {i}", ["gpu"], registry=registry)
        for gpu in ("0", "1"):
            g.labels(gpu).set(i)
    app = create_app(FakeControl(), settings, registry)
    sock = bind_socket("127.0.0.1", port)
    config = uvicorn_config(with_fast_probes(app) if fast else app, http=http)
    run_server(config, sock, uvloop=loop == "uvloop")


def measure(variant: str, clients: int, seconds: float) -> dict[str, Any]:
    from bench_scrape import load

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", variant, "--port", str(port)])
    try:
        if not wait_until(lambda: answers(port, path="/healthz", timeout=0.5), 30, 0.1):
            raise RuntimeError(f"the {variant} server did not answer")
        return asyncio.run(load(f"http://127.0.0.1:{port}", clients, seconds))
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 clients for 5 s instead of 200 for 20 s")
    parser.add_argument("--reps", type=int, default=3, help="runs per variant (median reported)")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    clients, seconds = (50, 5.0) if args.quick else (200, 20.0)
    results: dict[str, Any] = {"clients": clients, "seconds": seconds, "reps": args.reps, "cpus": os.cpu_count(),
                               "load_average_start": os.getloadavg()}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for _ in range(args.reps):
        for variant in VARIANTS:
            runs[variant].append(measure(variant, clients, seconds))
            time.sleep(1)
    results["load_average_end"] = os.getloadavg()

    def med(variant: str, path: str, key: str) -> float:
        return float(spread([r[path][key] for r in runs[variant]], 2)["median"])

    print(f"\n/metrics, /readyz, /healthz: {clients} concurrent clients for {seconds:g} s; "
          f"median (min–max) of {args.reps} ({machine_note()})")
    print(f"{'variant':<24}{'p99 ms (all paths)':>26}{'req/s':>8}{'p99 vs ' + BASELINE:>22}{'req/s vs':>10}"
          f"{'errors':>8}")
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        p99 = spread([max(r[p]["p99_ms"] for p in ENDPOINTS) for r in runs[variant]], 2)
        rate = spread([sum(r[p]["per_second"] for p in ENDPOINTS) for r in runs[variant]], 1)
        errors = sum(r[p]["errors"] for r in runs[variant] for p in ENDPOINTS)
        summary[variant] = {"p99_ms_worst_path": p99, "requests_per_second": rate, "errors": errors,
                            "per_path_p99_ms": {p: med(variant, p, "p99_ms") for p in ENDPOINTS}}
    base = summary[BASELINE]
    for variant, s in summary.items():
        s["p99_ratio_vs_baseline"] = s["p99_ms_worst_path"]["median"] / base["p99_ms_worst_path"]["median"]
        s["rate_ratio_vs_baseline"] = s["requests_per_second"]["median"] / base["requests_per_second"]["median"]
        p99, rate = s["p99_ms_worst_path"], s["requests_per_second"]
        print(f"{variant:<24}"
              + f"{p99['median']:.1f} ({p99['min']:.1f}–{p99['max']:.1f})".rjust(26)
              + f"{rate['median']:>8.0f}{s['p99_ratio_vs_baseline']:>21.2f}x{s['rate_ratio_vs_baseline']:>9.2f}x"
              + f"{s['errors']:>8}")
    results["runs"] = runs
    results["summary"] = summary
    results["command"] = "python bench/bench_http_stack.py" + (" --quick" if args.quick else "")
    write_results(RESULTS.with_name("http_stack_quick.json") if args.quick else RESULTS, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
