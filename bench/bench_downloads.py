"""Download engine vs curl on the same local server, in the same run, unthrottled and per-connection capped.

    python bench/bench_downloads.py                # 1 × 2 GiB, 32 × 64 MiB
    python bench/bench_downloads.py --quick        # 1 × 256 MiB, 8 × 16 MiB (--small: the same)

Serves the files with nginx (Debian's, started unprivileged-friendly on a free port from a
generated config in the work folder) or, when nginx is missing, a threaded Python server with
sendfile (then the capped cases are skipped, with a line saying so). Measures:

(a) unthrottled — one large file: curl -o vs the engine (MODELS_CONNECTIONS=8 ranged connections,
    SHA-256 in order while downloading), the engine hashing in one pass after the last chunk,
    and the engine on one stream (MODELS_CONNECTIONS=1); many files: one curl fetching them one
    after another (one connection, reused) vs the engine (MODELS_CONCURRENCY=4, each file ranged);
(b) capped — the same through an nginx location with ``limit_rate`` (per request, i.e. per
    connection: the way CDNs cap a connection);
(c) kill at 50 %: ``orchestrator models sync`` is SIGKILLed once half the file is written, then
    run again; the bytes nginx sent for the second run are compared with the bytes the part lacked.

Targets: (a) single file ≥ 1.0× curl; (b) single file ≥ 4× curl with 8 connections; (c) ≤ 1.05×
the missing bytes. Each timed run starts after os.sync() with the previous outputs deleted;
sides rotate between reps. Ratios are engine throughput / curl throughput: the median of the
per-rep (back-to-back) ratios (pass/fail) and the ratio of the medians. Writes
bench/results/downloads[_<out-dir>][_small].json.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from benchutil import machine_note, write_results  # noqa: E402
from support import free_port, wait_for  # noqa: E402

from orchestrator.provision.models.downloads import Engine  # noqa: E402
from orchestrator.provision.models.tasks import DownloadOptions, DownloadTask  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
Runner = Callable[[list[str], list[str], Path, Path], tuple[float, float]]


# ---------------------------------------------------------------- data and servers
def make_file(path: Path, size: int, seed: int) -> str:
    """Write ``size`` bytes of incompressible data; returns its sha256."""
    block = hashlib.sha256(str(seed).encode()).digest() * 4  # 128 bytes
    rnd = bytearray(os.urandom(16 * MiB))
    rnd[:128] = block
    h = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        counter = 0
        while left > 0:
            rnd[128:136] = counter.to_bytes(8, "little")
            piece = bytes(rnd[: min(left, len(rnd))])
            fh.write(piece)
            h.update(piece)
            left -= len(piece)
            counter += 1
    return h.hexdigest()


class Nginx:
    name = "nginx"

    def __init__(self, www: Path, work: Path, rate: int) -> None:
        self.port = free_port()
        self.log = work / "access.log"
        conf = work / "nginx.conf"
        tmp = work / "nginx-tmp"
        tmp.mkdir()
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        conf.write_text(f"""
{user}
worker_processes 2;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 512; }}
http {{
  log_format bench '$uri $status $body_bytes_sent "$http_range"';
  access_log {self.log} bench;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  sendfile on; tcp_nopush on; keepalive_requests 10000;
  server {{
    listen 127.0.0.1:{self.port};
    root {www};
    location /capped/ {{ alias {www}/; limit_rate {rate}; }}
  }}
}}
""")
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-e", str(work / "nginx-error.log")])
        wait_port(self.port)

    def sent(self, path: str) -> list[tuple[int, int, str]]:
        """(status, body bytes, range) per request for ``path``, in order."""
        out = []
        for line in self.log.read_text().splitlines():
            m = re.match(r"(\S+) (\d+) (\d+) \"(.*)\"", line)
            if m and m.group(1) == path:
                out.append((int(m.group(2)), int(m.group(3)), m.group(4)))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class PyServer:
    """Fallback: threaded http.server with Range support and os.sendfile (no rate limit)."""

    name = "python"

    def __init__(self, www: Path, work: Path, rate: int) -> None:
        self.records: list[tuple[str, int, int, str]] = []
        records = self.records

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                path = www / self.path.lstrip("/")
                try:
                    size = path.stat().st_size
                except OSError:
                    self.send_error(404)
                    return
                rng = self.headers.get("Range", "")
                m = re.match(r"bytes=(\d+)-(\d*)$", rng)
                start = int(m.group(1)) if m else 0
                end = min(int(m.group(2)) + 1, size) if m and m.group(2) else size
                self.send_response(206 if m else 200)
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self.wfile.flush()
                sent = 0
                with path.open("rb") as fh:
                    try:
                        while start + sent < end:
                            n = os.sendfile(self.connection.fileno(), fh.fileno(), start + sent,
                                            min(8 * MiB, end - start - sent))
                            if n <= 0:
                                break
                            sent += n
                    except OSError:
                        self.close_connection = True
                records.append((self.path, 206 if m else 200, sent, rng))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def sent(self, path: str) -> list[tuple[int, int, str]]:
        return [(s, n, r) for p, s, n, r in self.records if p == path]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_port(port: int, timeout: float = 10.0) -> None:
    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, timeout, what=f"a server listening on port {port}")


# ---------------------------------------------------------------- measurements
def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.sync()
    return path


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def curl(urls: list[str], shas: list[str], out: Path, state: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one curl fetching ``urls`` one after another."""
    args = ["curl", "-sS", "--fail"]
    for i, url in enumerate(urls):
        args += [url, "-o", str(out / f"c{i}.bin")]
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - start, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def engine(concurrency: int, **options: Any) -> Runner:
    def run(urls: list[str], shas: list[str], out: Path, state: Path) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process: downloads and hashing)."""
        tasks = [DownloadTask(name=f"f{i}", url=u, dest_dir=out, filename=f"e{i}.bin", sha256=s)
                 for i, (u, s) in enumerate(zip(urls, shas, strict=True))]
        eng = Engine(state, options=DownloadOptions(free_space_margin=0, **options))
        cpu = cpu_seconds(resource.RUSAGE_SELF)
        start = time.perf_counter()
        results = eng.run(tasks, concurrency=concurrency)
        elapsed = time.perf_counter() - start
        bad = [r for r in results if r.state != "downloaded"]
        if bad:
            raise RuntimeError(f"engine failed: {bad[0].error}")
        return elapsed, cpu_seconds(resource.RUSAGE_SELF) - cpu

    return run


def compare(label: str, urls: list[str], shas: list[str], size: int, dirs: tuple[Path, Path], reps: int,
            sides: dict[str, Runner]) -> dict[str, Any]:
    """Time every side ``reps`` times in rotating order; ratios against ``curl``."""
    work, outs = dirs
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for who in names[rep % len(names):] + names[: rep % len(names)]:
            wall, cpu = sides[who](urls, shas, fresh(outs / "out"), fresh(work / "state"))
            times[who].append(wall)
            cpus[who].append(cpu)
    total = size * len(urls)
    out: dict[str, Any] = {"label": label, "files": len(urls), "bytes": total, "sides": {}}
    med_curl = statistics.median(times["curl"])
    for who in names:
        med = statistics.median(times[who])
        out["sides"][who] = {
            "seconds": times[who],
            "mb_per_s_median": total / med / 1e6,
            "cpu_seconds_per_gib": statistics.median(cpus[who]) / (total / GiB),
            "ratio_median": med_curl / med,
            # Each rep's runs are back to back: their ratio cancels slow load drifts.
            "ratio_paired_median": statistics.median(c / e for c, e in zip(times["curl"], times[who], strict=True)),
        }
    return out


def kill_and_resume(url: str, path: str, sha: str, size: int, outs: Path, server: Any) -> dict[str, Any]:
    """SIGKILL `models sync` once half the file is written, run it again, count what the server re-sent."""
    root = outs / "root"
    shutil.rmtree(root, ignore_errors=True)
    shared = root / "shared"
    shared.mkdir(parents=True)
    shared.joinpath("comfy_dir_config.yaml").write_text(
        "comfyui:\n  base_path: /workspace/ComfyUI\n  checkpoints: models/checkpoints/\n"
    )
    shared.joinpath("models.yaml").write_text(
        f"models:\n  - url: {url}\n    dest: checkpoints\n    filename: big.bin\n    sha256: {sha}\n"
    )
    env = {**os.environ, "ROOT": str(root), "LOG_LEVEL": "warning"}
    cli = [sys.executable, "-c", "import sys; from orchestrator.cli.main import main; sys.exit(main())",
           "models", "sync"]
    before = len(server.sent(path))
    proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    ckpt = root / "ComfyUI" / "models" / "checkpoints"

    def written() -> int:  # the part is sparse: count its allocated blocks
        parts = list(ckpt.glob(".*.part")) if ckpt.exists() else []
        return parts[0].stat().st_blocks * 512 if parts else 0

    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and written() < size // 2:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    had = min(written(), size)
    missing = size - had
    time.sleep(0.5)  # let the server log the aborted requests
    first = len(server.sent(path))
    start = time.perf_counter()
    subprocess.run([*cli, "--json"], env=env, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    time.sleep(0.2)
    resumed = server.sent(path)[first:]
    sent = sum(n for _, n, _ in resumed)
    ok = (ckpt / "big.bin").stat().st_size == size and not list(ckpt.glob(".*.part"))
    return {
        "killed_with_bytes_written": had,
        "killed_at_fraction": had / size,
        "missing_bytes": missing,
        "resume_bytes_sent": sent,
        "resume_requests": len(resumed),
        "ratio": sent / missing if missing else float("nan"),
        "resume_seconds": elapsed,
        "installed_and_verified": ok,
        "first_run_requests": len(server.sent(path)[before:first]),
    }


# ---------------------------------------------------------------- report
def row(case: dict[str, Any], who: str, title: str, target: str) -> str:
    s = case["sides"][who]
    c = case["sides"]["curl"]
    curl_mbs = f"{c['mb_per_s_median']:.0f}" if who != "curl" else ""
    return (f"{title:<44}{curl_mbs:>10}{s['mb_per_s_median']:>10.0f}{s['ratio_median']:>8.2f}"
            f"{s['ratio_paired_median']:>8.2f}{s['cpu_seconds_per_gib']:>8.2f}  {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", "--small", dest="small", action="store_true", help="1 × 256 MiB and 8 × 16 MiB")
    parser.add_argument("--reps", type=int, default=None, help="timed runs of each side (default 5, --quick 3)")
    parser.add_argument("--rate", default=None, help="nginx limit_rate per connection (default 48m, --quick 24m)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temp folder under /tmp)")
    parser.add_argument(
        "--out-dir", type=Path, help="where downloads are written (default: the work folder; /dev/shm: no disk)"
    )
    parser.add_argument("--python-server", action="store_true", help="use the Python server even if nginx exists")
    args = parser.parse_args()
    big_size, many, many_size = (256 * MiB, 8, 16 * MiB) if args.small else (2 * GiB, 32, 64 * MiB)
    reps = args.reps or (3 if args.small else 5)
    rate = args.rate or ("24m" if args.small else "48m")
    work = Path(tempfile.mkdtemp(prefix="bench-downloads-", dir=args.dir or "/tmp"))
    work.chmod(0o755)  # nginx workers run as an unprivileged user
    www = work / "www"
    www.mkdir()
    www.chmod(0o755)
    outs = Path(tempfile.mkdtemp(prefix="bench-downloads-out-", dir=args.out_dir)) if args.out_dir else work
    print(f"preparing data in {work} ...", flush=True)
    big_sha = make_file(www / "big.bin", big_size, 0)
    shas = [make_file(www / f"m{i}.bin", many_size, i + 1) for i in range(many)]
    for p in www.iterdir():
        p.chmod(0o644)
    load_start = os.getloadavg()
    use_nginx = bool(shutil.which("nginx")) and not args.python_server
    if not use_nginx:
        print("nginx not found (apt-get install -y nginx) or --python-server: the capped cases (b) are skipped")
    server: Nginx | PyServer = Nginx(www, work, rate) if use_nginx else PyServer(www, work, rate)
    base = f"http://127.0.0.1:{server.port}"
    dirs = (work, outs)
    single_sides: dict[str, Runner] = {
        "curl": curl,
        "engine": engine(1),
        "engine_hash_after": engine(1, hash_in_order=False),
        "engine_one_stream": engine(1, connections=1),
    }
    many_sides: dict[str, Runner] = {"curl": curl, "engine": engine(4)}
    results: dict[str, Any] = {}
    try:
        print("(a) unthrottled ...", flush=True)
        results["single"] = compare("single", [f"{base}/big.bin"], [big_sha], big_size, dirs, reps, single_sides)
        many_urls = [f"{base}/m{i}.bin" for i in range(many)]
        results["many"] = compare("many", many_urls, shas, many_size, dirs, reps, many_sides)
        if use_nginx:
            print(f"(b) capped at {rate}/connection ...", flush=True)
            capped_sides = {"curl": curl, "engine": engine(1)}
            results["single_capped"] = compare("single_capped", [f"{base}/capped/big.bin"], [big_sha], big_size,
                                               dirs, reps, capped_sides)
            results["many_capped"] = compare("many_capped", [f"{base}/capped/m{i}.bin" for i in range(many)],
                                             shas, many_size, dirs, reps, many_sides)
        print("(c) kill at 50 % and resume ...", flush=True)
        shutil.rmtree(outs / "out", ignore_errors=True)
        results["resume"] = kill_and_resume(f"{base}/big.bin", "/big.bin", big_sha, big_size, outs, server)
    finally:
        server.stop()
        if outs != work:
            shutil.rmtree(outs, ignore_errors=True)
    single, resume = results["single"], results["resume"]
    passed = {
        "single_unthrottled": single["sides"]["engine"]["ratio_paired_median"] >= 1.0,
        "resume": resume["ratio"] <= 1.05 and resume["installed_and_verified"],
    }
    if "single_capped" in results:
        passed["single_capped"] = results["single_capped"]["sides"]["engine"]["ratio_paired_median"] >= 4.0
    hash_choice = min(("engine", "engine_hash_after"), key=lambda w: statistics.median(single["sides"][w]["seconds"]))
    results.update({
        "size": "small" if args.small else "full",
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "machine": machine_note(),
        "server": server.name,
        "rate_per_connection": rate if use_nginx else None,
        "downloads_to": "tmpfs" if args.out_dir and str(args.out_dir).startswith("/dev/shm") else "disk",
        "reps": reps,
        "connections": DownloadOptions().connections,
        "faster_hash": "in order" if hash_choice == "engine" else "after",
        "targets": {"single_unthrottled_min": 1.0, "single_capped_min": 4.0, "resume_ratio_max": 1.05},
        "pass": passed,
    })
    name = "downloads" if not args.out_dir else "downloads_" + args.out_dir.name.strip("/").replace("/", "_")
    if args.small:
        name += "_small"
    out = HERE / "results" / f"{name}.json"
    write_results(out, results)
    print(f"\nserver: {server.name}; {results['size']} size; downloads to {results['downloads_to']} ({work}); "
          f"median of {reps} runs (rotating order); {machine_note()}\n")
    print(f"{'case':<44}{'curl MB/s':>10}{'MB/s':>10}{'ratio':>8}{'paired':>8}{'CPUs/GiB':>8}  target")
    big = f"1 × {big_size / GiB:.2f} GiB" if big_size >= GiB else f"1 × {big_size // MiB} MiB"
    lines = [
        row(single, "engine", f"{big}, 8 connections, sha256 in order", "≥ 1.00"),
        row(single, "engine_hash_after", "  same, sha256 in one pass after", "(info)"),
        row(single, "engine_one_stream", "  same, one stream (MODELS_CONNECTIONS=1)", "(info)"),
        row(results["many"], "engine", f"{many} × {many_size // MiB} MiB, 4 files at once", "(info)"),
    ]
    if "single_capped" in results:
        lines += [
            row(results["single_capped"], "engine", f"{big}, capped {rate}/connection", "≥ 4.00"),
            row(results["many_capped"], "engine", f"{many} × {many_size // MiB} MiB, capped {rate}/connection",
                "(info)"),
        ]
    print("\n".join(lines))
    print(f"curl's own CPU-s/GiB: {single['sides']['curl']['cpu_seconds_per_gib']:.2f}; "
          f"faster hashing here: {results['faster_hash']}")
    print(f"\nkill at {resume['killed_at_fraction']:.0%}: missing {resume['missing_bytes']} B, "
          f"resume sent {resume['resume_bytes_sent']} B in {resume['resume_requests']} requests → ratio "
          f"{resume['ratio']:.4f} (target ≤ 1.05); installed and verified: {resume['installed_and_verified']}")
    print(f"\npass: {passed}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
