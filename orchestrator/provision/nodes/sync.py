"""``sync_nodes``: make ``custom_nodes/`` match the config (see the package docstring)."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine.fs import read_json, write_json
from orchestrator.provision.git.client import GitClient
from orchestrator.provision.git.urls import redact_url
from orchestrator.provision.git.worktree import read_head, remove_partials
from orchestrator.provision.nodes.checkout import git_step
from orchestrator.provision.nodes.config import NodeSpec, default_config_file, load_config
from orchestrator.provision.nodes.deps import CommandRunner, run_command
from orchestrator.provision.nodes.engine import Outcome, RunState, remove_node
from orchestrator.provision.nodes.imports import check_imports
from orchestrator.provision.nodes.plan import Planned, observe, plan_actions
from orchestrator.provision.nodes.report import REPORT_FILE, STATE_NAMES, NodeResult, NodesReport
from orchestrator.provision.nodes.state import load_state
from orchestrator.provision.nodes.steps import env_step, pip_step, script_step
from orchestrator.provision.repos.targets import git_client

log = logging.getLogger(__name__)


def execute(run: RunState, plan: Sequence[Planned]) -> None:
    """Removals, then git in a bounded pool, then one pip, the .env files and the scripts."""
    run.dir.mkdir(parents=True, exist_ok=True)
    for gone in remove_partials(run.dir):
        log.warning("removed %s left by an interrupted run", gone.name)
    for item in plan:
        if item.action == "remove":
            remove_node(run, item)
    git_items = [
        p for p in plan if p.spec is not None and p.action in {"install", "update"} and p.needs_git
    ]
    if git_items:
        workers = max(1, min(run.settings.nodes_concurrency, len(git_items)))
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="node"
        ) as pool:
            futures = [pool.submit(git_step, run, item) for item in git_items]
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                future.result()
                run.progress(f"nodes: git {done}/{len(git_items)} ...")
    specs = [p.spec for p in plan if p.spec is not None]
    run.progress(f"nodes: pip, the requirements of {len(specs)} nodes in one install ...")
    pip_step(run, specs)
    for spec in specs:
        env_step(run, spec)
    for n, spec in enumerate(specs, 1):  # install order: a script may rely on an earlier node
        run.progress(f"nodes: install scripts {n}/{len(specs)} ...")
        script_step(run, spec)


IMPORTS_FILE = "node_imports.json"


def import_step(run: RunState, specs: Sequence[NodeSpec]) -> dict[str, str]:
    """Import every configured node folder in a child (``imports``); node -> first error line.

    Skipped (the last result kept) when no node's commit or requirements changed and nothing was
    installed since the last check; NODES_IMPORT_CHECK=false turns it off.
    """
    if not run.settings.nodes_import_check:
        return {}
    dirs = [run.dir / s.name for s in specs if read_head(run.dir / s.name) is not None]
    stamp = [[d.name, read_head(d)] for d in dirs]
    last = read_json(run.layout.state_dir / IMPORTS_FILE, {})
    if isinstance(last, dict) and last.get("stamp") == stamp and not run.pip.get("ran"):
        failed = last.get("failed")
        return {str(k): str(v) for k, v in failed.items()} if isinstance(failed, dict) else {}
    env = {**run.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    failed = check_imports(
        run.settings.python, run.layout.comfy_dir, dirs, run.runner, env, run.settings.node_timeout
    )
    write_json(run.layout.state_dir / IMPORTS_FILE, {"stamp": stamp, "failed": failed})
    return failed


def sync_nodes(
    settings: Settings,
    layout: Layout,
    *,
    dry_run: bool = False,
    prune: bool = False,
    config_file: Path | None = None,
    git: GitClient | None = None,
    runner: CommandRunner = run_command,
    environ: Mapping[str, str] | None = None,
    constraints: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> NodesReport:
    """Install, update and remove custom nodes so the folder matches the config.

    Args:
        dry_run: only plan; nothing is written.
        prune: also remove folders this orchestrator did not install.
        config_file: default config_nodes(_test).json from the shared repo, else the shipped one.
        git, runner, environ: seams for tests (git client, command runner, the environment
            that ``.env`` values and pip see).
        constraints: extra pins for the requirements install (``up --locked``: the lock's packages).
        progress: told a line as each step runs (``nodes: git 3/12 ...``, pip, scripts, imports).

    Raises:
        ConfigError: the config is invalid (before anything on disk changes).

    Callers that write hold the ROOT lock (:mod:`orchestrator.machine.lock`), as ``up`` and
    ``nodes sync`` do: two syncs at once would run two pips into one venv.
    """
    start = time.monotonic()
    path = config_file or default_config_file(settings, layout)
    config = load_config(path)
    for w in config.warnings:
        log.warning("%s: %s", path, w)
    state = load_state(layout)
    observed, unknown = observe(layout.custom_nodes_dir, config.nodes, state)
    plan = plan_actions(config.nodes, state, observed, unknown, prune=prune)
    warnings = list(config.warnings)
    if unknown and not prune:
        warnings.append(
            f"left alone (not installed by the orchestrator; --prune removes): {', '.join(unknown)}"
        )
    if dry_run:
        results = tuple(
            NodeResult(
                p.name, p.action, "skipped", reasons=p.reasons, url=redact_url(p.spec.url) if p.spec else ""
            )
            for p in plan
        )
        return NodesReport(path, results, True, tuple(warnings), {}, time.monotonic() - start)
    # The caller holds the ROOT lock (orchestrator.machine.lock): `up` and `nodes sync` take it.
    run = RunState(
        settings,
        layout,
        dict(state),
        git or git_client(settings, layout),
        runner,
        os.environ if environ is None else environ,
    )
    run.constraints = tuple(constraints)
    if progress is not None:
        run.progress = progress
    execute(run, plan)
    run.progress("nodes: import check ...")
    imports = import_step(run, [p.spec for p in plan if p.spec is not None])
    done: list[NodeResult] = []
    for p in plan:
        outcome = run.outcomes.get(p.name, Outcome())
        commit = "" if p.action == "remove" else (read_head(layout.custom_nodes_dir / p.name) or "")
        url = redact_url(p.spec.url) if p.spec else ""
        done.append(
            NodeResult(
                p.name, p.action, outcome.status, outcome.error, commit, outcome.seconds, p.reasons, url
            )
        )
    report = NodesReport(
        path, tuple(done), False, tuple(warnings + run.warnings), run.pip, time.monotonic() - start, imports
    )
    write_json(layout.state_dir / REPORT_FILE, report.to_dict())
    counts = report.counts
    log.info("custom nodes: %s in %.1fs", ", ".join(f"{counts[k]} {k}" for k in STATE_NAMES), report.seconds)
    return report
