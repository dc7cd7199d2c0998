"""Custom-node sync vs a re-enactment of the legacy start.sh loop, N nodes with production names.

    .venv/bin/python bench/bench_nodes.py [--nodes 16] [--repeat 3] [--quick] [--keep]

The node repos are local git repos (file:// URLs) named like the first N production nodes; each
has a small requirements.txt drawn from POOL. The legacy side is a re-enactment of the legacy
start.sh (it no longer exists to run): per node, `git clone` when missing, then
`python -m pip install -r requirements.txt`, one after another, every command a subprocess.
Our side is `python -m orchestrator nodes sync` run as a subprocess too (the like-for-like figure);
the in-process sync (what `up` calls) is reported as well. Scenarios, each repeated --repeat
times (median and min–max):

  cold, truly        a fresh venv for each side (created outside the timing); every requirement
                     is installed from a local package index that this benchmark serves on
                     127.0.0.1 (Python's http.server, in a thread, over a PEP 503 layout of a
                     wheelhouse of POOL and its dependencies, built once with `pip download`
                     and cached under ~/.cache/orchestrator-bench); PIP_CONFIG_FILE=/dev/null
                     so that no site pip configuration adds other indexes
  cold clone, reqs   an empty custom_nodes folder, but every requirement is already installed in
  already satisfied  the interpreter (PIP_NO_INDEX=1): pip resolves and installs nothing
  warm / boot        nothing changed; legacy: what every later boot did (pip install -r per node)
  one node changed   one node moves to a new commit with new requirements (ours, in-process;
                     compared with one node's share of the legacy cold clone run)

Installers and the lock (the "cold, truly" world draws its requirements from POOL + COLD_EXTRA,
several dozen wheels with their dependencies; every side gets a fresh venv AND fresh pip/uv
caches, so nothing is reused between sides or repetitions):

  cold, uv           ours through the CLI with NODES_INSTALLER=uv (the default when uv is found)
  cold, pip          the same with NODES_INSTALLER=pip (COMFY_PYTHON -m pip), same local index
  locked, 2nd ROOT   `orchestrator lock` on the uv side's ROOT, then on a second fresh ROOT and
                     venv what `up --locked` provisions (prepare, the nodes at the lock's commits,
                     the lock's packages; in-process), checked with `drift` (must be empty)

Prints a table with ratios and writes bench/results/nodes.json.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchutil import fmt, machine_note, spread  # noqa: E402
from support import Recording  # noqa: E402

from orchestrator.core.layout import Layout  # noqa: E402
from orchestrator.core.settings import load_settings  # noqa: E402
from orchestrator.provision.git import client as git_client  # noqa: E402
from orchestrator.provision.git import command as git_command  # noqa: E402
from orchestrator.provision.nodes import config as nodes_config  # noqa: E402
from orchestrator.provision.nodes import deps as nodes_deps  # noqa: E402
from orchestrator.provision.nodes import sync as nodes_sync  # noqa: E402

FIXTURE = REPO / "shared" / "config_nodes.json"
# Installed in this interpreter already: pip resolves them offline and changes nothing.
POOL = [
    "PyYAML>=5",
    "requests",
    "tqdm",
    "psutil",
    "jsonschema",
    "starlette",
    "packaging",
    "idna",
    "certifi",
    "attrs",
]
# Only in the "cold, truly" world (not installed in this interpreter): what custom nodes pull in.
COLD_EXTRA = [
    "numpy", "pillow", "einops", "safetensors", "huggingface-hub", "GitPython", "rich", "piexif",
    "aiohttp", "scipy", "pandas", "matplotlib", "filelock", "fsspec", "simpleeval", "toml",
    "websocket-client", "colorama",
]


def run(argv: Sequence[str], cwd: Path | None = None, env: Mapping[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(
        list(argv),
        cwd=cwd,
        env=dict(env) if env else None,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        [
            "git",
            "-c",
            "user.email=b@example.com",
            "-c",
            "user.name=bench",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def build_world(base: Path, count: int, pool: Sequence[str] = POOL) -> tuple[list[dict[str, Any]], Path]:
    """Node repos named like production, and a config_nodes.json pointing at them."""
    production = json.loads(FIXTURE.read_text())["custom_nodes"][:count]
    repos = base / "repos"
    entries: list[dict[str, Any]] = []
    for i, prod in enumerate(production):
        path = repos / prod["name"]
        path.mkdir(parents=True)
        git(path, "init", "-q")
        step = 1 if pool is POOL else 3  # the cold pool is larger: spread the nodes over all of it
        reqs = [pool[(i * step + k) % len(pool)] for k in range(1 + i % 3)]
        (path / "requirements.txt").write_text("\n".join(reqs) + "\n")
        (path / "__init__.py").write_text(f"NODE_CLASS_MAPPINGS = {{}}  # {prod['name']}\n")
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", "init")
        prefix = "git clone " if prod["url"].startswith("git clone ") else ""
        entry: dict[str, Any] = {"name": prod["name"], "url": f"{prefix}file://{path}", "requirements": True}
        if prod.get("env"):
            entry["env"] = prod["env"]
        entries.append(entry)
    config = base / "config_nodes.json"
    config.write_text(json.dumps({"custom_nodes": entries}, indent=2))
    return entries, config


def legacy(
    entries: list[dict[str, Any]], target: Path, env: Mapping[str, str], *, clone: bool, python: str = sys.executable
) -> dict[str, float]:
    """Re-enactment of the legacy start.sh loop: per node, clone when missing, then pip install -r."""
    target.mkdir(parents=True, exist_ok=True)
    clone_s = pip_s = 0.0
    for entry in entries:
        url = nodes_config.normalise_url(entry["url"])
        dest = target / entry["name"]
        if clone and not dest.exists():
            clone_s += run(["git", "clone", "-q", url, str(dest)])
        pip_s += run(
            [python, "-m", "pip", "install", "-q", "-r", str(dest / "requirements.txt")], env=env
        )
    return {
        "seconds": clone_s + pip_s,
        "git_seconds": clone_s,
        "pip_seconds": pip_s,
        "pip_runs": len(entries),
    }


def ours(root: Path, config: Path, env: Mapping[str, str]) -> dict[str, Any]:
    settings = load_settings({**env, "ROOT": str(root)})
    commands, git_calls = Recording(nodes_deps.run_command), Recording(git_command.git_runner)
    client = git_client.GitClient(timeout=settings.git_timeout, runner=git_calls)
    start = time.perf_counter()
    report = nodes_sync.sync_nodes(
        settings, Layout(root), config_file=config, git=client, runner=commands, environ=env
    )
    seconds = time.perf_counter() - start
    if report.failed:
        raise SystemExit(
            f"bench: nodes failed: {report.failed}: {[r.error for r in report.results if r.error]}"
        )
    pip_runs = sum(1 for c in commands.calls if "install" in c)
    return {
        "seconds": seconds,
        "counts": report.counts,
        "pip_runs": pip_runs,
        "git_commands": len(git_calls.calls),
        "pip_seconds": float(report.pip.get("seconds", 0.0)),
    }


# ---------------------------------------------------------------- a local package index
def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "orchestrator-bench"


def build_wheelhouse(cache: Path) -> Path:
    """Wheels for POOL and their dependencies, downloaded once (the only step that needs the network)."""
    house = cache / "wheelhouse"
    stamp = house / ".complete"
    wanted = [*POOL, *COLD_EXTRA]
    if stamp.exists() and stamp.read_text() == "\n".join(wanted):
        return house
    house.mkdir(parents=True, exist_ok=True)
    print(f"building the wheelhouse once: pip download {' '.join(wanted)} -> {house}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", str(house), *wanted],
        check=True,
    )
    stamp.write_text("\n".join(wanted))
    return house


def simple_index(house: Path, dest: Path) -> Path:
    """A PEP 503 layout: dest/simple/<normalised name>/index.html linking to the wheels."""
    import re

    by_name: dict[str, list[Path]] = {}
    for whl in sorted(house.glob("*.whl")):
        name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
        by_name.setdefault(name, []).append(whl)
    simple = dest / "simple"
    for name, wheels in by_name.items():
        d = simple / name
        d.mkdir(parents=True, exist_ok=True)
        links = []
        for whl in wheels:
            shutil.copy2(whl, d / whl.name)
            links.append(f'<a href="{whl.name}">{whl.name}</a><br>')
        (d / "index.html").write_text("<html><body>\n" + "\n".join(links) + "\n</body></html>\n")
    (simple / "index.html").write_text(
        "<html><body>\n" + "\n".join(f'<a href="{n}/">{n}</a><br>' for n in by_name) + "\n</body></html>\n"
    )
    return dest


class IndexServer:
    """python's http.server over the simple index, in a thread of this process, on 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, directory=str(directory), **kw)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Quiet)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}/simple"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def fresh_venv(path: Path) -> str:
    """A new venv with pip and nothing else (created outside any timing)."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, stdout=subprocess.DEVNULL)
    return str(path / "bin" / "python")


def caches(d: Path) -> dict[str, str]:
    """Fresh pip and uv caches: a cold install downloads every wheel from the index."""
    return {"PIP_CACHE_DIR": str(d / "pip"), "UV_CACHE_DIR": str(d / "uv")}


def comfy_tree(path: Path) -> None:
    """A one-commit repository standing in for $ROOT/ComfyUI (the lock names its commit)."""
    path.mkdir(parents=True)
    (path / "main.py").write_text("# stand-in\n")
    git(path, "init", "-q")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "comfy")


def locked_second_root(d: Path, first: Path, config: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """`orchestrator lock` on ``first``; then what `up --locked` provisions on a fresh ROOT and venv."""
    from orchestrator.provision.lock import locked

    lock_file = d / "fleet.lock"
    subprocess.run([sys.executable, "-m", "orchestrator", "--root", str(first), "lock", "-o", str(lock_file)],
                   env=dict(env), check=True, capture_output=True)
    second = d / "root-locked"
    subprocess.run(["git", "clone", "-q", str(first / "ComfyUI"), str(second / "ComfyUI")], check=True)
    second_env = {**env, **caches(d / "c-locked"), "COMFY_PYTHON": fresh_venv(d / "venv-locked"),
                  "LOCKFILE": str(lock_file), "ROOT": str(second)}
    saved = dict(os.environ)
    os.environ.update(second_env)  # the lock's installs read the process environment, as in `up`
    try:
        settings, layout = load_settings(second_env), Layout(second)
        layout.state_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        run = locked.prepare(settings, layout)
        report = nodes_sync.sync_nodes(run.settings, layout, config_file=run.node_config(layout, config),
                                       constraints=run.pins, environ=second_env)
        differences = run.install(layout)
        seconds = time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"seconds": seconds, "drift": [x.line for x in differences], "failed": list(report.failed),
            "pip_seconds": float(report.pip.get("seconds", 0.0) or 0.0), "pip_runs": 1}


# ---------------------------------------------------------------- our side through the CLI
def cli_sync(root: Path, config: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """`python -m orchestrator nodes sync --json` as a subprocess: wall time and its own report."""
    argv = [sys.executable, "-m", "orchestrator", "--root", str(root), "nodes", "sync", "--file", str(config), "--json"]
    start = time.perf_counter()
    r = subprocess.run(argv, env=dict(env), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"bench: nodes sync failed ({r.returncode}): {r.stderr[-2000:]}{r.stdout[-2000:]}")
    report = json.loads(r.stdout)
    pip = report.get("pip") or {}
    return {
        "seconds": seconds,
        "counts": report.get("counts"),
        "pip_runs": 1 if pip.get("ran") else 0,
        "pip_seconds": float(pip.get("seconds", 0.0) or 0.0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 nodes, 3 repetitions")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the wheelhouse is kept")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    if args.quick:
        args.nodes = min(args.nodes, 8)
    logging.getLogger("orchestrator").setLevel(logging.ERROR)  # unset .env variables are expected here
    base = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    common = {
        "PIP_CONFIG_FILE": os.devnull,  # no site pip config (extra indexes, find-links): only what we name
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONPATH": str(REPO),
        "LOG_LEVEL": "warning",
    }
    # requirements already satisfied: this interpreter, offline
    env = {**clean, **common, "PIP_NO_INDEX": "1", "COMFY_PYTHON": sys.executable}
    house = build_wheelhouse(args.cache)
    server = IndexServer(simple_index(house, base / "index"))
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in (
        "legacy_truly_cold", "truly_cold", "truly_cold_pip", "locked", "legacy_satisfied", "satisfied", "legacy_boot",
        "warm_cli", "warm_inprocess", "one_node")}
    try:
        entries, config = build_world(base, args.nodes)
        cold_entries, cold_config = build_world(base / "cold", args.nodes, [*POOL, *COLD_EXTRA])
        n = len(entries)
        print(f"{n} nodes, {args.repeat} repetitions, interpreter {sys.executable}, {machine_note()}", flush=True)
        print(f"package index: {server.url} ({len(list(house.glob('*.whl')))} wheels from {house})", flush=True)
        victim = entries[n // 2]
        victim_repo = Path(nodes_config.normalise_url(victim["url"]).removeprefix("file://"))
        for rep in range(args.repeat):
            d = base / f"rep{rep}"
            # truly cold: a fresh venv per side, every requirement from the local index
            py_legacy, py_ours = fresh_venv(d / "venv-legacy"), fresh_venv(d / "venv-ours")
            py_pip = fresh_venv(d / "venv-pip")
            index_env = {**clean, **common, "PIP_INDEX_URL": server.url}
            runs["legacy_truly_cold"].append(legacy(
                cold_entries, d / "legacy-cold" / "custom_nodes", {**index_env, **caches(d / "c-legacy")},
                clone=True, python=py_legacy))
            uv_env = {**index_env, **caches(d / "c-uv"), "COMFY_PYTHON": py_ours, "NODES_INSTALLER": "uv"}
            comfy_tree(d / "root-cold" / "ComfyUI")
            runs["truly_cold"].append(cli_sync(d / "root-cold", cold_config, uv_env))
            runs["truly_cold_pip"].append(cli_sync(d / "root-pip", cold_config, {
                **index_env, **caches(d / "c-pip"), "COMFY_PYTHON": py_pip, "NODES_INSTALLER": "pip"}))
            runs["locked"].append(locked_second_root(d, d / "root-cold", cold_config, uv_env))
            # cold clone, requirements already satisfied (this interpreter, no index)
            runs["legacy_satisfied"].append(legacy(entries, d / "legacy" / "custom_nodes", env, clone=True))
            runs["legacy_boot"].append(legacy(entries, d / "legacy" / "custom_nodes", env, clone=False))
            root = d / "root"
            runs["satisfied"].append(cli_sync(root, config, env))
            runs["warm_cli"].append(cli_sync(root, config, env))
            runs["warm_inprocess"].append(ours(root, config, env))
            # one node moves to a new commit that also changes its requirements
            reqs = ["PyYAML>=5\nrequests\n", "tqdm\nidna\n"][rep % 2]
            (victim_repo / "requirements.txt").write_text(reqs)
            git(victim_repo, "commit", "-q", "-am", f"bump {rep}")
            victim["commit"] = git(victim_repo, "rev-parse", "HEAD")
            config.write_text(json.dumps({"custom_nodes": entries}, indent=2))
            one = ours(root, config, env)
            one["node"] = victim["name"]
            runs["one_node"].append(one)
            print(f"  repetition {rep + 1}/{args.repeat} done: "
                  + ", ".join(f"{k} {v[-1]['seconds']:.2f}s" for k, v in runs.items()), flush=True)
    finally:
        server.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    s = {k: spread([r["seconds"] for r in v]) for k, v in runs.items()}
    med = {k: v["median"] for k, v in s.items()}
    per_node_legacy = med["legacy_satisfied"] / n
    ratios = {
        "truly_cold_speedup": med["legacy_truly_cold"] / med["truly_cold"],
        "uv_vs_pip_cold_speedup": med["truly_cold_pip"] / med["truly_cold"],
        "pip_cold_speedup_vs_legacy": med["legacy_truly_cold"] / med["truly_cold_pip"],
        "locked_second_root_vs_cold": med["locked"] / med["truly_cold"],
        "satisfied_cold_speedup": med["legacy_satisfied"] / med["satisfied"],
        "warm_cli_speedup_vs_legacy_boot": med["legacy_boot"] / med["warm_cli"],
        "warm_inprocess_speedup_vs_legacy_boot": med["legacy_boot"] / med["warm_inprocess"],
        "one_node_in_legacy_nodes": med["one_node"] / per_node_legacy,
    }
    targets = {
        "warm (CLI) >= 20x legacy boot": ratios["warm_cli_speedup_vs_legacy_boot"] >= 20,
        "warm in-process <= 1 s": med["warm_inprocess"] <= 1.0,
        "truly cold >= 2x legacy": ratios["truly_cold_speedup"] >= 2,
        "the default installer (uv) is the faster one cold": ratios["uv_vs_pip_cold_speedup"] >= 1,
        "up --locked on a 2nd ROOT: no drift": all(not r["drift"] for r in runs["locked"]),
        "one-node change ~ one node (<= 3 legacy nodes)": ratios["one_node_in_legacy_nodes"] <= 3,
    }
    rows = [
        ("legacy cold, truly (fresh venv, local index)", "legacy_truly_cold"),
        ("ours  cold, truly, uv (CLI, fresh venv+cache, local index)", "truly_cold"),
        ("ours  cold, truly, pip (CLI, fresh venv+cache, local index)", "truly_cold_pip"),
        ("ours  up --locked provisioning on a 2nd fresh ROOT (uv)", "locked"),
        ("legacy cold clone, reqs already satisfied", "legacy_satisfied"),
        ("ours  cold clone, reqs already satisfied (CLI)", "satisfied"),
        ("legacy boot (pip install -r for every node)", "legacy_boot"),
        ("ours  warm, nothing changed (CLI)", "warm_cli"),
        ("ours  warm, nothing changed (in-process)", "warm_inprocess"),
        ("ours  one node changed (in-process)", "one_node"),
    ]
    print(f"\n{n} nodes; median (min–max) of {args.repeat}; legacy = a re-enactment of start.sh's loop; "
          "every legacy command and our CLI are subprocesses")
    print(f"{'scenario':<50}{'seconds':>34}{'pip runs':>10}{'pip s':>8}")
    for name, key in rows:
        last = runs[key][-1]
        pip_s = statistics_median([r.get("pip_seconds", 0.0) for r in runs[key]])
        print(f"{name:<50}{fmt(s[key]):>34}{last.get('pip_runs', 0):>10}{pip_s:>8.1f}")
    print(f"  in-process warm sync: {runs['warm_inprocess'][-1]['git_commands']} git commands, "
          f"{runs['warm_inprocess'][-1]['pip_runs']} pip runs")
    print()
    print(f"warm, like for like (CLI vs legacy boot, both subprocesses): "
          f"{ratios['warm_cli_speedup_vs_legacy_boot']:.1f}x faster "
          f"(in-process, as `up` runs it: {ratios['warm_inprocess_speedup_vs_legacy_boot']:.0f}x)")
    print(f"cold, truly (fresh venvs, local index): {ratios['truly_cold_speedup']:.1f}x faster (uv); "
          f"pip {ratios['pip_cold_speedup_vs_legacy']:.1f}x; uv vs pip: {ratios['uv_vs_pip_cold_speedup']:.1f}x")
    print(f"locked 2nd ROOT: {ratios['locked_second_root_vs_cold']:.2f}x the unlocked cold sync's time; "
          f"drift after it: {runs['locked'][-1]['drift'] or 'none'}")
    print(f"cold clone, requirements already satisfied: {ratios['satisfied_cold_speedup']:.1f}x faster")
    print(f"one-node change: {ratios['one_node_in_legacy_nodes']:.2f} legacy nodes' worth")
    for target, ok in targets.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {target}")
    out = HERE / "results" / "nodes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "nodes": n,
                "repeat": args.repeat,
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg(),
                "python": platform.python_version(),
                "legacy": "re-enactment of start.sh (clone when missing, then pip install -r, per node)",
                "summary_seconds": s,
                "runs": runs,
                "ratios": ratios,
                "targets": targets,
                "command": "python bench/bench_nodes.py" + (" --quick" if args.quick else ""),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out.relative_to(REPO)}")
    return 0 if all(targets.values()) else 1


def statistics_median(values: Sequence[float]) -> float:
    import statistics

    return float(statistics.median(values)) if values else 0.0


if __name__ == "__main__":
    raise SystemExit(main())
