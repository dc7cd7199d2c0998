"""The steps after git: ONE pip install for every changed requirements.txt, ``.env`` files,
and each node's custom_script (in install order)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from orchestrator.core.errors import ProvisionError
from orchestrator.machine.fs import atomic_write
from orchestrator.provision.git.worktree import read_head
from orchestrator.provision.nodes import firewall
from orchestrator.provision.nodes.config import NodeSpec
from orchestrator.provision.nodes.deps import (
    TORCH_QUERY,
    constraints_text,
    find_installer,
    pip_command,
    render_env,
)
from orchestrator.provision.nodes.engine import Outcome, RunState
from orchestrator.provision.nodes.state import env_marker, requirements_marker, script_marker

log = logging.getLogger(__name__)


def pip_step(run: RunState, specs: Sequence[NodeSpec]) -> None:
    """Every node's requirements through the firewall, then ONE install of the accepted set
    (uv or pip, see :func:`find_installer`); node by node only to find a culprit."""
    pending: list[tuple[NodeSpec, str]] = []
    enabled: list[NodeSpec] = []
    for spec in specs:
        rec = run.records.get(spec.name)
        if rec is None or not run.ok(spec.name):
            continue
        marker = requirements_marker(spec, run.dir / spec.name)
        if marker not in {"off", "absent"}:
            enabled.append(spec)
        if rec.requirements == marker:
            continue
        if marker in {"off", "absent"}:
            run.update_record(spec.name, requirements=marker)
        else:
            pending.append((spec, marker))
    if not pending:
        return
    env = {**run.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    try:
        installer = find_installer(run.settings.nodes_installer, env, Path(sys.executable).parent)
    except ProvisionError as exc:
        for spec, _ in pending:
            run.fail(spec.name, str(exc))
        return
    wall = firewall.decide(_requested(run, enabled), _protected(run, env), opencv=run.settings.opencv_package)
    for line in (*(r.line for r in wall.rewrites), *wall.warnings):
        log.info("firewall: %s", line)
    for node, refusals in wall.refused_nodes.items():
        run.fail(node, "; ".join(r.line.removeprefix(f"node {node}: ") for r in refusals))
    text = constraints_text(wall.protected) + "".join(
        f"{pin}\n" for pin in run.constraints if pin.split("==")[0] not in wall.protected
    )
    constraints = _write(run, "pip-constraints.txt", text) if wall.protected or run.constraints else None
    pending = [(s, m) for s, m in pending if s.name in wall.accepted]
    run.pip = {
        "ran": False,
        "tool": installer.kind,
        "installer": installer.to_dict(),
        "firewall": wall.to_dict(),
        "constraints": str(constraints) if constraints else None,
    }
    if not pending:
        return
    combined = _write(run, "node-requirements.txt", _text(wall.lines))
    names = [s.name for s, _ in pending]
    log.info(
        "%s: installing the requirements of %d node(s) in one go (%d changed: %s)",
        installer.kind, len(wall.accepted), len(pending), ", ".join(names),
    )
    result = run.runner(
        pip_command(run.settings.python, [combined], constraints, installer.path, env),
        cwd=run.dir,
        env=env,
        timeout=run.settings.pip_timeout,
    )
    run.pip.update(
        {"ran": True, "nodes": names, "ok": result.ok, "seconds": round(result.seconds, 3), "per_node": False}
    )
    run.log_output(installer.kind, result)
    if result.ok:
        for spec, marker in pending:
            run.update_record(spec.name, requirements=marker)
        _after(run, env, wall)
        return
    log.warning(
        "%s: the combined install failed (%s); installing node by node to find the culprit(s)",
        installer.kind, run.clean(result.tail(1)),
    )
    run.pip["per_node"] = True
    culprits: list[str] = []
    for spec, marker in pending:
        own = _write(run, f"node-requirements-{spec.name}.txt", _text(wall.accepted[spec.name]))
        one = run.runner(
            pip_command(run.settings.python, [own], constraints, installer.path, env),
            cwd=run.dir / spec.name,
            env=env,
            timeout=run.settings.pip_timeout,
        )
        run.outcomes.setdefault(spec.name, Outcome()).seconds += one.seconds
        run.log_output(f"{installer.kind} {spec.name}", one)
        if one.ok:
            run.update_record(spec.name, requirements=marker)
        else:
            culprits.append(spec.name)
            why = "timed out (PIP_TIMEOUT)" if one.timed_out else one.tail(2)
            run.fail(spec.name, f"pip install -r requirements.txt failed: {why}")
    run.pip["culprits"] = culprits
    _after(run, env, wall)
    if not culprits:
        w = "pip: the combined install failed, yet each node's requirements install alone (conflict?)"
        run.warnings.append(w)
        log.warning("%s", w)


def _after(run: RunState, env: Mapping[str, str], wall: firewall.Firewall) -> None:
    """What a dependency (not a requirement line) did to the protected packages: another OpenCV
    wheel over ``cv2/``, or a protected version moved. Warned by name, never silent."""
    after = _protected(run, env)
    lines = [
        f"firewall: {name} {after[name]} was installed by a dependency: it shares cv2/ with {wall.opencv}"
        for name in firewall.OPENCV
        if name in after and name != wall.opencv and name not in wall.protected
    ]
    lines += [
        f"firewall: {name} moved from {kept} to {after.get(name, 'nothing')} during the install"
        for name, kept in wall.protected.items()
        if after.get(name) != kept
    ]
    for line in lines:
        run.warnings.append(line)
        log.warning("%s", line)


def _text(lines: Sequence[str]) -> str:
    return "# Written by orchestrator from the nodes' requirements.txt, through the firewall.\n" + "".join(
        f"{line}\n" for line in lines
    )


def _write(run: RunState, name: str, text: str) -> Path:
    path = run.layout.state_dir / name
    atomic_write(path, text)
    return path


def _requested(run: RunState, specs: Sequence[NodeSpec]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs:
        try:
            text = (run.dir / spec.name / "requirements.txt").read_text(errors="replace")
        except OSError:
            continue
        out[spec.name] = firewall.requirement_lines(text)
    return out


def _protected(run: RunState, env: Mapping[str, str]) -> dict[str, str]:
    """The installed versions of the protected packages in COMFY_PYTHON (empty when unreadable)."""
    result = run.runner([run.settings.python, "-c", TORCH_QUERY], cwd=None, env=env, timeout=60.0)
    versions: dict[str, str] = {}
    if result.ok:
        with contextlib.suppress(ValueError, IndexError):
            parsed = json.loads(result.output.strip().splitlines()[-1])
            versions = {str(k): str(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {}
    else:
        log.warning(
            "cannot read the installed torch version from %s: %s", run.settings.python, result.tail(1)
        )
    if versions:
        log.info("protecting %s", ", ".join(f"{k}=={v}" for k, v in sorted(versions.items())))
    return versions


def env_step(run: RunState, spec: NodeSpec) -> None:
    """Write (or remove) the node's .env from its config template."""
    rec = run.records.get(spec.name)
    if rec is None or read_head(run.dir / spec.name) is None:
        return  # written even when pip failed: the folder is there and the values are known
    path = run.dir / spec.name / ".env"
    marker = env_marker(spec)
    try:
        if spec.env:
            text, unset = render_env(spec.env, run.environ)
            if unset:
                names = ", ".join(sorted(set(unset)))
                w = f"node {spec.name}: .env: unset variable(s) written empty: {names}"
                run.warnings.append(w)
                log.warning("%s", w)
            if atomic_write(path, text, mode=0o600):
                log.info("node %s: wrote .env (%d variables)", spec.name, len(spec.env))
        elif rec.env not in (None, "none") and path.exists():
            path.unlink()  # we wrote it; the config no longer asks for one
    except OSError as exc:
        run.fail(spec.name, f"cannot write {path}: {exc.strerror or exc}")
        return
    if rec.env != marker:
        run.update_record(spec.name, env=marker)


def script_step(run: RunState, spec: NodeSpec) -> None:
    """Run the node's custom_script with bash when it changed since it last succeeded."""
    rec = run.records.get(spec.name)
    if rec is None or not run.ok(spec.name) or not spec.custom_script:
        return
    marker = script_marker(spec)
    if rec.script == marker:
        return
    env = {
        **run.environ,
        "COMFY_PYTHON": run.settings.python,
        "COMFYUI_DIR": str(run.layout.comfy_dir),
        "NODE_DIR": str(run.dir / spec.name),
    }
    log.info("node %s: running custom_script", spec.name)
    result = run.runner(
        ["bash", "-c", spec.custom_script],
        cwd=run.dir / spec.name,
        env=env,
        timeout=run.settings.node_timeout,
    )
    run.outcomes.setdefault(spec.name, Outcome()).seconds += result.seconds
    for line in result.output.splitlines()[-200:]:
        if line.strip():
            log.info("node %s: script: %s", spec.name, run.clean(line.rstrip()))
    if result.ok:
        run.update_record(spec.name, script=marker)
    elif result.timed_out:
        run.fail(
            spec.name, f"custom_script timed out after {run.settings.node_timeout:g}s (NODE_TIMEOUT)"
        )
    else:
        run.fail(spec.name, f"custom_script failed (exit {result.returncode}): {result.tail(2)}")
