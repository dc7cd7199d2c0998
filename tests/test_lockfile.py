"""orchestrator.lock: the value (pure), and `lock` on one ROOT, `up --locked` on a second, `drift`.

End to end: real git repos (file://) for ComfyUI (the simulator's tree), the shared config and
the nodes; a local PEP 503 index (``python -m http.server``) with wheels built here; uv
installing into a throwaway venv per machine; real supervisord and monitor through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from support import (
    Machine,
    build_wheel,
    commit_file,
    git,
    install_fake_dist,
    make_repo,
    package_index,
    simple_index,
    wait_for,
)

from orchestrator.core.errors import ConfigError
from orchestrator.provision.lock.model import Lock, diff, parse_lock
from orchestrator.simulator.tree import write_code_tree


def a_lock(**changes: object) -> Lock:
    base = {
        "comfy": {"url": "file:///c", "commit": "c" * 40},
        "nodes": {"alpha": {"url": "file:///a", "commit": "a" * 40}},
        "packages": {"orchtest-alpha": "1.0", "torch": "2.1.0"},
        "protected": {"torch": "2.1.0"},
        "models": {"models/checkpoints/x.safetensors": {"sha256": "f" * 64, "size": 10}},
    }
    base.update(changes)
    return Lock(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------- pure
def test_a_lock_round_trips_and_equal_machines_have_equal_hashes(tmp_path: Path) -> None:
    lock = a_lock()
    again = parse_lock(lock.render(), tmp_path / "x.lock")
    assert again == lock
    assert again.digest == lock.digest
    assert a_lock(packages={"orchtest-alpha": "1.1", "torch": "2.1.0"}).digest != lock.digest
    assert lock.render().count("\n") > 10  # one fact a line: human-diffable


def test_diff_names_every_difference() -> None:
    here = a_lock(
        nodes={"alpha": {"url": "file:///a", "commit": "b" * 40}, "extra": {"url": "u", "commit": "e" * 40}},
        packages={"torch": "2.1.0", "tqdm": "4"},
        models={},
    )
    lines = [d.line for d in diff(a_lock(), here)]
    assert lines == [
        f"node alpha: {'a' * 40} in the lock, {'b' * 40} here",
        f"node extra: absent in the lock, {'e' * 40} here",
        "package orchtest-alpha: 1.0 in the lock, absent here",
        "package tqdm: absent in the lock, 4 here",
        f"model models/checkpoints/x.safetensors: sha256:{'f' * 64} size:10 in the lock, absent here",
    ]
    assert diff(a_lock(), a_lock()) == []


def test_a_bad_lock_names_the_file_and_each_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.lock"
    with pytest.raises(ConfigError, match="bad.lock: not a lock file"):
        parse_lock("{", path)
    data = json.loads(a_lock().render())
    data["nodes"]["alpha"] = {"url": "x"}
    data["packages"] = {"foo": 1}
    with pytest.raises(ConfigError) as err:
        parse_lock(json.dumps(data), path)
    assert "nodes.alpha.commit: missing" in str(err.value)
    assert "packages.foo: expected a string" in str(err.value)


# ---------------------------------------------------------------- end to end
def comfy_venv(path: Path) -> Path:
    """A throwaway interpreter for ComfyUI that also sees this venv's packages (the simulator,
    its dependencies) behind its own site-packages: installs land in it, not in the test venv."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = next((path / "lib").glob("python3*/site-packages"))
    (site / "_test_venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return path / "bin" / "python"


def installed_version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def monitor_status(m: Machine) -> dict[str, object] | None:
    try:
        data = requests.get(f"{m.monitor_url}/status", timeout=5).json()
    except requests.RequestException:
        return None
    return data if isinstance(data, dict) else None


@pytest.mark.skipif(not (Path(sys.executable).parent / "uv").exists(), reason="uv is not installed (pip install uv)")
def test_lock_then_up_locked_on_a_fresh_root_has_no_drift_and_a_moved_node_is_named(
    machine: Callable[..., Machine], tmp_path: Path
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "orchtest-alpha", "1.0", "orchtest_alpha")
    comfy = tmp_path / "comfy"
    write_code_tree(comfy)
    git(comfy, "init", "-q", "-b", "master")
    git(comfy, "add", "-A")
    git(comfy, "commit", "-q", "-m", "simulated ComfyUI")
    comfy_commit = git(comfy, "rev-parse", "HEAD")
    mapping = "import orchtest_alpha\nNODE_CLASS_MAPPINGS = {}\n"
    make_repo(tmp_path / "alpha", {"__init__.py": mapping, "requirements.txt": "orchtest-alpha\n"})
    second = commit_file(tmp_path / "alpha", "v.txt", "2\n")
    make_repo(tmp_path / "beta", {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n"})
    make_repo(tmp_path / "broken", {"__init__.py": "raise ImportError('no module named cuda_ext')\n"})
    nodes = [{"name": n, "url": f"file://{tmp_path / n}", "requirements": True} for n in ("alpha", "beta", "broken")]
    make_repo(tmp_path / "shared", {"config_nodes.json": json.dumps({"custom_nodes": nodes}), "models.yaml": "models: []\n"})
    lockfile = tmp_path / "fleet.lock"
    with package_index(wheels, tmp_path / "served") as index:
        def fleet_machine(name: str) -> Machine:
            m = machine(
                1, COMFY_REPO_URL=f"file://{comfy}", COMFY_COMMIT=comfy_commit, SHARED_REPO_URL=f"file://{tmp_path / 'shared'}",
                SHARED_BRANCH="main", COMFY_PYTHON=str(comfy_venv(tmp_path / f"venv-{name}")), PIP_INDEX_URL=index,
                PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="", UV_CACHE_DIR=str(tmp_path / f"uv-cache-{name}"),
            )
            shutil.rmtree(m.root / "ComfyUI")
            return m

        a = fleet_machine("a")
        up = a.run("up", check=True, timeout=300)
        # the node that raises at import is named before any instance starts, and afterwards
        assert "custom node broken fails at import (checked before start): ImportError: no module named cuda_ext" in up.stdout
        assert "custom node broken fails at import: ImportError" in a.run("status").stdout
        assert installed_version(Path(a.env["COMFY_PYTHON"]), "orchtest-alpha") == "1.0"
        made = json.loads(a.run("lock", "-o", str(lockfile), "--json", check=True).stdout)
        assert made["nodes"]["alpha"]["commit"] == second
        assert made["comfy"]["commit"] == comfy_commit
        assert made["packages"]["orchtest-alpha"] == "1.0"
        # the running generation's lock hash, in /status and orchestrator_build_info
        status = wait_for(lambda: monitor_status(a), timeout=60, what="the monitor's /status")
        assert status["lock_hash"] == made["hash"]
        assert status["node_import_failed"] == {"broken": "ImportError: no module named cuda_ext"}
        instances = requests.get(f"{a.monitor_url}/instances", timeout=5).json()
        assert instances["node_import_failed"] == {"broken": "ImportError: no module named cuda_ext"}
        assert f'lock_hash="{made["hash"]}"' in requests.get(f"{a.monitor_url}/metrics", timeout=5).text

        build_wheel(wheels, "orchtest-alpha", "1.1", "orchtest_alpha")  # published after the lock
        simple_index(wheels, tmp_path / "served")

        # a lock that would replace a protected package fails before any change
        bad = tmp_path / "bad.lock"
        bad.write_text(json.dumps({**json.loads(lockfile.read_text()), "protected": {"torch": "9.9"}}))
        c = fleet_machine("c")
        install_fake_dist(Path(c.env["COMFY_PYTHON"]), "torch", "2.1.0")
        refused = c.run("up", "--locked", str(bad), timeout=300)
        assert refused.returncode != 0
        assert "torch 9.9 is locked but 2.1.0 is installed" in refused.stderr
        assert not (c.root / "ComfyUI").exists()
        # and one whose packages the index does not have
        bad.write_text(json.dumps({**json.loads(lockfile.read_text()), "packages": {"orchtest-gone": "3.0"}}))
        refused = c.run("up", "--locked", str(bad), timeout=300)
        assert "the locked packages cannot be installed (nothing changed)" in refused.stderr
        assert refused.returncode != 0
        assert not (c.root / "ComfyUI").exists()

        b = fleet_machine("b")
        b.run("up", "--locked", str(lockfile), check=True, timeout=300)
        assert installed_version(Path(b.env["COMFY_PYTHON"]), "orchtest-alpha") == "1.0"  # not the newer 1.1
        drift = b.run("drift", "--json")
        assert drift.stdout.strip(), drift.stderr
        assert json.loads(drift.stdout)["differences"] == [], drift.stdout
        assert drift.returncode == 0
        moved_to = commit_file(b.root / "ComfyUI" / "custom_nodes" / "alpha", "local.txt", "a hotfix by hand\n")
        moved = b.run("drift", "--json")
        assert moved.returncode == 1
        assert json.loads(moved.stdout)["differences"] == [
            {"kind": "node", "name": "alpha", "locked": second, "actual": moved_to}
        ]
        assert f"node alpha: {second} in the lock, {moved_to} here" in b.run("drift").stdout


def test_the_comfy_tree_is_pinned_to_the_locked_commit_even_when_it_follows_a_branch(tmp_path: Path) -> None:
    from orchestrator.core.layout import Layout
    from orchestrator.core.settings import load_settings
    from orchestrator.provision.lock.locked import LockedRun

    first = make_repo(tmp_path / "fork", {"main.py": "# 1\n"})
    commit_file(tmp_path / "fork", "main.py", "# 2\n")
    root = tmp_path / "root"
    root.mkdir()
    git(root, "clone", "-q", f"file://{tmp_path / 'fork'}", "ComfyUI")
    settings = load_settings({"ROOT": str(root), "GIT_TIMEOUT": "30"})
    run = LockedRun(a_lock(comfy={"url": "", "commit": first}), tmp_path / "x.lock", settings)
    run.pin_comfy(Layout(root))
    assert git(root / "ComfyUI", "rev-parse", "HEAD") == first
    run.pin_comfy(Layout(root))  # already there: nothing to do
    assert git(root / "ComfyUI", "rev-parse", "HEAD") == first
