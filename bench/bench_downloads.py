"""Download engine vs curl on the same local server, in the same run.

    /work/venv/bin/python bench/bench_downloads.py            # 1 × 2 GiB, 32 × 64 MiB
    /work/venv/bin/python bench/bench_downloads.py --small    # 1 × 256 MiB, 8 × 16 MiB

Serves the files with nginx (Debian's, run unprivileged on a free port) or, when nginx is
missing, a threaded Python server with sendfile. Measures:

1. one large file: curl -o vs Engine.download with SHA-256 verification and the atomic rename
   (also with DownloadOptions.fsync, for information);
2. many files: one curl fetching them one after another (one connection, reused) vs the engine
   with MODELS_CONCURRENCY=4, each file hashed and verified;
3. kill at 50 %: `orchestrator models sync` is SIGKILLed once the .part passes half the file,
   then run again; the bytes the server sent for the second run are compared with the missing bytes.

Targets: (1) ≥ 0.9× curl's throughput, (2) faster than curl, (3) ≤ 1.05× the missing bytes.
Each timed run starts after os.sync() with the previous outputs deleted; runs rotate between
curl and the engine. The table shows the ratio of the medians and the median of the per-rep
(back-to-back) ratios, which pass/fail uses; every time is in the JSON.
Writes bench/results/downloads[_<out-dir>][_small].json.
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from benchutil import write_results  # noqa: E402
from support import free_port, wait_for  # noqa: E402

from orchestrator.provision.models.downloads import Engine  # noqa: E402
from orchestrator.provision.models.tasks import DownloadOptions, DownloadTask  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


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

    def __init__(self, www: Path, work: Path) -> None:
        self.port = free_port()
        self.log = work / "access.log"
        conf = work / "nginx.conf"
        tmp = work / "nginx-tmp"
        tmp.mkdir()
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
  log_format bench '$request_uri $status $body_bytes_sent "$http_range"';
  access_log {self.log} bench;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  sendfile on; tcp_nopush on;
  server {{ listen 127.0.0.1:{self.port}; root {www}; }}
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
    """Fallback: threaded http.server with Range support and os.sendfile."""

    name = "python"

    def __init__(self, www: Path, work: Path) -> None:
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
                m = re.match(r"bytes=(\d+)-$", rng)
                start = int(m.group(1)) if m else 0
                self.send_response(206 if m else 200)
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.send_header("Content-Length", str(size - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self.wfile.flush()
                sent = 0
                with path.open("rb") as fh:
                    try:
                        while start + sent < size:
                            n = os.sendfile(self.connection.fileno(), fh.fileno(), start + sent, 8 * MiB)
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


def time_curl(urls: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds)."""
    args = ["curl", "-sS", "--fail"]
    for i, url in enumerate(urls):
        args += [url, "-o", str(out / f"c{i}.bin")]
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - start, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def time_engine(tasks: list[DownloadTask], state: Path, concurrency: int, fsync: bool = False) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: downloads and hashing)."""
    engine = Engine(state, options=DownloadOptions(free_space_margin=0, fsync=fsync))
    cpu = cpu_seconds(resource.RUSAGE_SELF)
    start = time.perf_counter()
    results = engine.run(tasks, concurrency=concurrency)
    elapsed = time.perf_counter() - start
    bad = [r for r in results if r.state != "downloaded"]
    if bad:
        raise RuntimeError(f"engine failed: {bad[0].error}")
    return elapsed, cpu_seconds(resource.RUSAGE_SELF) - cpu


def compare(
    label: str,
    urls: list[str],
    shas: list[str],
    size: int,
    work: Path,
    outs: Path,
    reps: int,
    concurrency: int,
    with_fsync: bool = False,
) -> dict[str, Any]:
    """Time curl and the engine (and the engine with fsync) in rotating order."""
    sides = ["curl", "engine"] + (["engine_fsync"] if with_fsync else [])
    times: dict[str, list[float]] = {side: [] for side in sides}
    cpus: dict[str, list[float]] = {side: [] for side in sides}
    for rep in range(reps):
        order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
        for who in order:
            out = fresh(outs / "out")
            if who == "curl":
                wall, cpu = time_curl(urls, out)
                times[who].append(wall)
                cpus[who].append(cpu)
                continue
            tasks = [
                DownloadTask(name=f"f{i}", url=u, dest_dir=out, filename=f"e{i}.bin", sha256=s)
                for i, (u, s) in enumerate(zip(urls, shas, strict=True))
            ]
            wall, cpu = time_engine(tasks, fresh(work / "state"), concurrency, who == "engine_fsync")
            times[who].append(wall)
            cpus[who].append(cpu)
    total = size * len(urls)
    med = {side: statistics.median(t) for side, t in times.items()}
    out: dict[str, Any] = {"label": label, "files": len(urls), "bytes": total, "concurrency": concurrency}
    for side, t in times.items():
        out[f"{side}_seconds"] = t
        out[f"{side}_cpu_seconds_per_gib"] = statistics.median(cpus[side]) / (total / GiB)
        out[f"{side}_mb_per_s_median"] = total / med[side] / 1e6
    out["ratio_median"] = med["curl"] / med["engine"]  # engine throughput / curl throughput
    out["ratio_best"] = min(times["curl"]) / min(times["engine"])
    # Each rep's curl and engine runs are back to back: their ratio cancels slow load drifts.
    out["ratio_paired_median"] = statistics.median(c / e for c, e in zip(times["curl"], times["engine"], strict=True))
    if with_fsync:
        out["fsync_ratio_median"] = med["curl"] / med["engine_fsync"]
    return out


def kill_and_resume(url: str, path: str, sha: str, size: int, outs: Path, server: Any) -> dict[str, Any]:
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
    cli = [
        sys.executable,
        "-c",
        "import sys; from orchestrator.cli.main import main; sys.exit(main())",
        "models",
        "sync",
    ]
    before = len(server.sent(path))
    proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    ckpt = root / "ComfyUI" / "models" / "checkpoints"
    part_size = 0
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            parts = list(ckpt.glob(".*.part")) if ckpt.exists() else []
            if parts and parts[0].stat().st_size >= size // 2:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    (part,) = ckpt.glob(".*.part")
    part_size = part.stat().st_size
    missing = size - part_size
    time.sleep(0.5)  # let the server log the aborted request
    first = len(server.sent(path))
    start = time.perf_counter()
    subprocess.run(cli + ["--json"], env=env, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    time.sleep(0.2)
    resumed = server.sent(path)[first:]
    sent = sum(n for _, n, _ in resumed)
    ok = (ckpt / "big.bin").stat().st_size == size and not list(ckpt.glob(".*.part"))
    return {
        "killed_at_bytes": part_size,
        "killed_at_fraction": part_size / size,
        "missing_bytes": missing,
        "resume_bytes_sent": sent,
        "resume_requests": [{"status": s, "bytes": n, "range": r} for s, n, r in resumed],
        "ratio": sent / missing if missing else float("nan"),
        "resume_seconds": elapsed,
        "installed_and_verified": ok,
        "first_run_requests": len(server.sent(path)[before:first]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="1 × 256 MiB and 8 × 16 MiB")
    parser.add_argument("--reps", type=int, default=5, help="timed runs of each side (default 5)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temp folder on the root disk)")
    parser.add_argument(
        "--out-dir", type=Path, help="where downloads are written (default: the work folder; /dev/shm: no disk)"
    )
    parser.add_argument("--python-server", action="store_true", help="use the Python server even if nginx exists")
    args = parser.parse_args()
    big_size, many, many_size = (256 * MiB, 8, 16 * MiB) if args.small else (2 * GiB, 32, 64 * MiB)
    work = Path(tempfile.mkdtemp(prefix="bench-downloads-", dir=args.dir or "/var/tmp"))
    work.chmod(0o755)  # nginx workers run as an unprivileged user
    www = work / "www"
    www.mkdir()
    outs = Path(tempfile.mkdtemp(prefix="bench-downloads-out-", dir=args.out_dir)) if args.out_dir else work
    print(f"preparing data in {work} ...", flush=True)
    big_sha = make_file(www / "big.bin", big_size, 0)
    shas = [make_file(www / f"m{i}.bin", many_size, i + 1) for i in range(many)]
    load_start = os.getloadavg()
    use_nginx = shutil.which("nginx") and not args.python_server
    server: Nginx | PyServer = Nginx(www, work) if use_nginx else PyServer(www, work)
    base = f"http://127.0.0.1:{server.port}"
    try:
        single = compare("single", [f"{base}/big.bin"], [big_sha], big_size, work, outs, args.reps, 1, True)
        multi = compare("many", [f"{base}/m{i}.bin" for i in range(many)], shas, many_size, work, outs, args.reps, 4)
        shutil.rmtree(outs / "out", ignore_errors=True)
        resume = kill_and_resume(f"{base}/big.bin", "/big.bin", big_sha, big_size, outs, server)
    finally:
        server.stop()
        if outs != work:
            shutil.rmtree(outs, ignore_errors=True)
    results = {
        "size": "small" if args.small else "full",
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "server": server.name,
        "downloads_to": "tmpfs" if args.out_dir and str(args.out_dir).startswith("/dev/shm") else "disk",
        "cpus": os.cpu_count(),
        "reps": args.reps,
        "single": single,
        "many": multi,
        "resume": resume,
        "targets": {
            "single_ratio_min": 0.9,
            "many_ratio_min": 1.0,
            "resume_ratio_max": 1.05,
        },
        "pass": {
            "single": single["ratio_paired_median"] >= 0.9,
            "many": multi["ratio_paired_median"] > 1.0,
            "resume": resume["ratio"] <= 1.05 and resume["installed_and_verified"],
        },
    }
    name = "downloads" if not args.out_dir else "downloads_" + args.out_dir.name.strip("/").replace("/", "_")
    if args.small:
        name += "_small"
    out = HERE / "results" / f"{name}.json"
    write_results(out, results)
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    print(
        f"\nserver: {server.name}; {results['size']} size; downloads to {results['downloads_to']}; "
        f"median of {args.reps} runs (rotating order); "
        f"load average {load_start[0]:.1f} → {results['loadavg_end'][0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print(f"{'case':<34}{'curl MB/s':>11}{'engine MB/s':>13}{'ratio':>8}{'paired':>8}  target")
    print(
        f"{'1 × ' + gib(big_size) + ' (+sha256)':<34}{single['curl_mb_per_s_median']:>11.0f}"
        f"{single['engine_mb_per_s_median']:>13.0f}{single['ratio_median']:>8.2f}"
        f"{single['ratio_paired_median']:>8.2f}  ≥ 0.90"
    )
    print(
        f"{'  same, engine with fsync':<34}{'':>11}"
        f"{single['engine_fsync_mb_per_s_median']:>13.0f}{single['fsync_ratio_median']:>8.2f}{'':>8}  (info)"
    )
    print(
        f"{f'{many} × {many_size // MiB} MiB (curl sequential)':<34}{multi['curl_mb_per_s_median']:>11.0f}"
        f"{multi['engine_mb_per_s_median']:>13.0f}{multi['ratio_median']:>8.2f}"
        f"{multi['ratio_paired_median']:>8.2f}  > 1.00"
    )
    for case in (single, multi):
        mbs = {side: sorted(case["bytes"] / t / 1e6 for t in case[f"{side}_seconds"]) for side in ("curl", "engine")}
        print(f"  {case['label']}: MB/s min–max over {args.reps} runs: "
              f"curl {mbs['curl'][0]:.0f}–{mbs['curl'][-1]:.0f}, engine {mbs['engine'][0]:.0f}–{mbs['engine'][-1]:.0f}")
    print(
        f"\nCPU seconds per GiB (median): single: curl {single['curl_cpu_seconds_per_gib']:.2f}, "
        f"engine {single['engine_cpu_seconds_per_gib']:.2f}; many: curl {multi['curl_cpu_seconds_per_gib']:.2f}, "
        f"engine {multi['engine_cpu_seconds_per_gib']:.2f}"
    )
    print(
        f"\nkill at {resume['killed_at_fraction']:.0%}: missing {resume['missing_bytes']} B, "
        f"resume sent {resume['resume_bytes_sent']} B → ratio {resume['ratio']:.4f} (target ≤ 1.05); "
        f"installed and verified: {resume['installed_and_verified']}"
    )
    print(f"\npass: {results['pass']}\nwrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(results["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
