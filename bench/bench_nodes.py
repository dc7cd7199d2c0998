"""Custom-node sync vs the legacy boot, 64 nodes with the production names, served from local repos.

    /work/venv/bin/python bench/bench_nodes.py [--nodes 64] [--keep]

Every node repo has a small requirements.txt of packages already installed in this interpreter
(offline: PIP_NO_INDEX=1), so pip resolves but installs nothing, which is what a warm legacy
boot paid for on every start. Scenarios, all in the same run:

  legacy cold   sequential `git clone` then `pip install -r` for every node
  legacy boot   what the legacy machine did on every later boot: `pip install -r` for every node
  cold          orchestrator nodes sync on an empty folder
  warm          orchestrator nodes sync with nothing changed (in-process and via the CLI)
  one-node      one node moves to a new commit with new requirements

Prints a table with ratios and writes bench/results/nodes.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from orchestrator import gitops, nodes  # noqa: E402
from orchestrator.paths import Layout  # noqa: E402
from orchestrator.settings import load_settings  # noqa: E402

FIXTURE = REPO / "shared" / "config_nodes.json"
# Installed in this interpreter already: pip resolves them offline and changes nothing.
POOL = [
    "PyYAML>=5",
    "requests",
    "tqdm",
    "psutil",
    "jsonschema",
    "httpx",
    "packaging",
    "idna",
    "certifi",
    "attrs",
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


def build_world(base: Path, count: int) -> tuple[list[dict[str, Any]], Path]:
    """Node repos named like production, and a config_nodes.json pointing at them."""
    production = json.loads(FIXTURE.read_text())["custom_nodes"][:count]
    repos = base / "repos"
    entries: list[dict[str, Any]] = []
    for i, prod in enumerate(production):
        path = repos / prod["name"]
        path.mkdir(parents=True)
        git(path, "init", "-q")
        reqs = [POOL[(i + k) % len(POOL)] for k in range(1 + i % 3)]
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
    entries: list[dict[str, Any]], target: Path, env: Mapping[str, str], *, clone: bool
) -> dict[str, float]:
    """The legacy start.sh loop: per node, clone when missing, then pip install -r (sequential)."""
    target.mkdir(parents=True, exist_ok=True)
    clone_s = pip_s = 0.0
    for entry in entries:
        url = nodes.normalise_url(entry["url"])
        dest = target / entry["name"]
        if clone and not dest.exists():
            clone_s += run(["git", "clone", "-q", url, str(dest)])
        pip_s += run(
            [sys.executable, "-m", "pip", "install", "-q", "-r", str(dest / "requirements.txt")], env=env
        )
    return {
        "seconds": clone_s + pip_s,
        "git_seconds": clone_s,
        "pip_seconds": pip_s,
        "pip_runs": len(entries),
    }


class Commands:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(
        self, argv: Sequence[str], *, cwd: Path | None, env: Mapping[str, str], timeout: float
    ) -> Any:
        self.calls.append(list(argv))
        return nodes.run_command(argv, cwd=cwd, env=env, timeout=timeout)


class GitCalls:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self, args: Sequence[str], *, cwd: Path | None, timeout: float | None, env: Mapping[str, str]
    ) -> str:
        self.calls += 1
        return gitops.gitpython_runner(args, cwd=cwd, timeout=timeout, env=env)


def ours(root: Path, config: Path, env: Mapping[str, str]) -> dict[str, Any]:
    settings = load_settings({**env, "ROOT": str(root)})
    commands, git_calls = Commands(), GitCalls()
    client = gitops.GitClient(timeout=settings.git_timeout, runner=git_calls)
    start = time.perf_counter()
    report = nodes.sync_nodes(
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
        "git_commands": git_calls.calls,
        "pip_seconds": float(report.pip.get("seconds", 0.0)),
    }


def cli_warm(root: Path, config: Path, env: Mapping[str, str]) -> float:
    return run(
        [sys.executable, "-m", "orchestrator", "--root", str(root), "nodes", "sync", "--file", str(config)],
        env=env,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    logging.getLogger("orchestrator").setLevel(logging.ERROR)  # unset .env variables are expected here
    base = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        {
            "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PYTHONPATH": str(REPO),
            "COMFY_PYTHON": sys.executable,
            "LOG_LEVEL": "warning",
        }
    )
    try:
        entries, config = build_world(base, args.nodes)
        n = len(entries)
        print(
            f"{n} nodes, interpreter {sys.executable}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
        )
        res: dict[str, Any] = {}
        res["legacy_cold"] = legacy(entries, base / "legacy" / "custom_nodes", env, clone=True)
        res["legacy_boot"] = legacy(entries, base / "legacy" / "custom_nodes", env, clone=False)
        root = base / "root"
        res["cold"] = ours(root, config, env)
        res["warm"] = ours(root, config, env)
        res["warm_cli_seconds"] = min(cli_warm(root, config, env) for _ in range(3))
        # one node moves to a new commit that also changes its requirements
        victim = entries[n // 2]
        repo = Path(nodes.normalise_url(victim["url"]).removeprefix("file://"))
        (repo / "requirements.txt").write_text("PyYAML>=5\nrequests\n")
        git(repo, "commit", "-q", "-am", "bump")
        victim["commit"] = git(repo, "rev-parse", "HEAD")
        config.write_text(json.dumps({"custom_nodes": entries}, indent=2))
        res["one_node"] = ours(root, config, env)
        res["one_node"]["node"] = victim["name"]
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    per_node_legacy = res["legacy_cold"]["seconds"] / n
    ratios = {
        "cold_speedup_vs_legacy_cold": res["legacy_cold"]["seconds"] / res["cold"]["seconds"],
        "warm_speedup_vs_legacy_boot": res["legacy_boot"]["seconds"] / res["warm"]["seconds"],
        "warm_cli_speedup_vs_legacy_boot": res["legacy_boot"]["seconds"] / res["warm_cli_seconds"],
        "one_node_in_legacy_nodes": res["one_node"]["seconds"] / per_node_legacy,
        "one_node_share_of_cold": res["one_node"]["seconds"] / res["cold"]["seconds"],
    }
    targets = {
        "warm <= 1 s": res["warm"]["seconds"] <= 1.0,
        "warm >= 20x legacy boot": ratios["warm_speedup_vs_legacy_boot"] >= 20,
        "cold >= 2x legacy cold": ratios["cold_speedup_vs_legacy_cold"] >= 2,
        "one-node change ~ one node (<= 3 legacy nodes)": ratios["one_node_in_legacy_nodes"] <= 3,
    }
    rows = [
        (
            "legacy cold (clone + pip -r, sequential)",
            res["legacy_cold"]["seconds"],
            res["legacy_cold"]["pip_runs"],
            n,
        ),
        (
            "legacy boot (pip -r for every node)",
            res["legacy_boot"]["seconds"],
            res["legacy_boot"]["pip_runs"],
            0,
        ),
        ("cold sync", res["cold"]["seconds"], res["cold"]["pip_runs"], res["cold"]["git_commands"]),
        (
            "warm sync (in-process)",
            res["warm"]["seconds"],
            res["warm"]["pip_runs"],
            res["warm"]["git_commands"],
        ),
        ("warm sync (CLI, incl. interpreter start)", res["warm_cli_seconds"], 0, 0),
        (
            "one-node change",
            res["one_node"]["seconds"],
            res["one_node"]["pip_runs"],
            res["one_node"]["git_commands"],
        ),
    ]
    pip_secs = [
        res["legacy_cold"]["pip_seconds"],
        res["legacy_boot"]["pip_seconds"],
        res["cold"]["pip_seconds"],
        0.0,
        0.0,
        res["one_node"]["pip_seconds"],
    ]
    print(f"\n{'scenario':<44}{'seconds':>10}{'pip runs':>10}{'pip s':>8}{'git cmds':>10}")
    for (name, secs, pips, gits), psecs in zip(rows, pip_secs, strict=True):
        print(f"{name:<44}{secs:>10.3f}{pips:>10}{psecs:>8.1f}{gits:>10}")
    print()
    print(f"cold:  {ratios['cold_speedup_vs_legacy_cold']:.1f}x faster than the legacy cold install")
    print(
        f"warm:  {ratios['warm_speedup_vs_legacy_boot']:.0f}x faster than a legacy boot "
        f"({ratios['warm_cli_speedup_vs_legacy_boot']:.0f}x via the CLI)"
    )
    print(
        f"one-node change: {ratios['one_node_in_legacy_nodes']:.2f} legacy nodes' worth, "
        f"{100 * ratios['one_node_share_of_cold']:.0f}% of a cold sync"
    )
    for target, ok in targets.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {target}")
    out = HERE / "results" / "nodes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "nodes": n,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "results": res,
                "ratios": ratios,
                "targets": targets,
                "command": "python bench/bench_nodes.py",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out.relative_to(REPO)}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
