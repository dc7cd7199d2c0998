"""`up` validates every input before its first side effect: a bad comfy_dir_config.yaml, models
manifest, config_nodes.json, COMFY_ARGS flag or port makes it exit 2 with one line naming the full
path of the file (or the variables), and nothing is created under ROOT: no folder, no clone, no pip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import clean_env, free_port

from orchestrator.core.errors import ConfigError
from orchestrator.core.settings import load_settings
from orchestrator.monitor.preflight import check_ports, unknown_flags


def up(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`orchestrator up` on a mock machine whose repos point nowhere: anything past validation fails
    differently (and would leave folders behind)."""
    full = clean_env(
        ROOT=str(root), MOCK_GPU="1", NUM_GPUS="2", WORKER_BASE_COMFYUI_PORT=str(free_port()),
        ORCHESTRATOR_PORT=str(free_port()), COMFY_REPO_URL=f"file://{root.parent}/no-comfy",
        COMFY_FALLBACK_URL=f"file://{root.parent}/no-comfy", SHARED_REPO_URL="",
    )
    full.update(env)
    return subprocess.run([sys.executable, "-m", "orchestrator", "up", *args], env=full, capture_output=True,
                          text=True, timeout=120)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def tree(root: Path) -> list[str]:
    """Everything under ROOT but the CLI's own log file (logs/orchestrator.log, opened first)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.relative_to(root).parts[0] != "logs")


def test_a_bad_comfy_dir_config_stops_up_before_anything_with_its_full_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = root / "shared" / "comfy_dir_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("comfyui:\n  base_path: /etc\n  checkpoints: models/checkpoints/\n")
    before = tree(root)
    line = one_line(up(root))
    assert str(config) in line
    assert "base_path" in line
    assert tree(root) == before  # no state or log folder, no ComfyUI clone, no custom_nodes (no pip)


def test_a_bad_models_manifest_stops_up_with_its_full_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    manifest = tmp_path / "conf" / "models.yaml"
    manifest.parent.mkdir()
    manifest.write_text("models:\n  - url: https://example.com/a.safetensors\n    dest: ../../etc\n")
    line = one_line(up(root, MODELS_MANIFEST=str(manifest)))
    assert str(manifest) in line
    assert tree(root) == []


def test_a_bad_config_nodes_json_stops_up_with_its_full_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    nodes = root / "shared" / "config_nodes.json"
    nodes.parent.mkdir(parents=True)
    nodes.write_text('{"custom_nodes": [{"name": "../escape", "url": "https://example.com/x.git"}]}')
    line = one_line(up(root))
    assert str(nodes) in line
    assert tree(root) == ["shared", "shared/config_nodes.json"]


def test_an_unknown_comfy_flag_is_refused_naming_the_checked_out_cli_args(tmp_path: Path) -> None:
    from orchestrator.simulator.tree import write_code_tree

    root = tmp_path / "root"
    write_code_tree(root / "ComfyUI")
    before = tree(root)
    line = one_line(up(root, "--skip-provision", COMFY_ARGS="--lowvram-typo --preview-method auto"))
    assert "--lowvram-typo" in line
    assert "--preview-method" not in line  # declared by that tree: fine
    assert str(root / "ComfyUI" / "comfy" / "cli_args.py") in line
    assert tree(root) == before


def test_unknown_flags_are_the_long_flags_a_cli_args_does_not_declare() -> None:
    known = frozenset({"--cpu", "--preview-method"})
    assert unknown_flags(["--cpu", "--preview-method=auto", "auto", "--nope", "-x"], known) == ["--nope"]


def test_an_instance_port_on_the_monitor_port_is_refused_before_provisioning(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    base = free_port()
    line = one_line(up(root, WORKER_BASE_COMFYUI_PORT=str(base), ORCHESTRATOR_PORT=str(base + 1)))
    assert f"ORCHESTRATOR_PORT={base + 1}" in line
    assert "GPU 1" in line
    assert not (root / "ComfyUI").exists()  # nothing cloned
    settings = load_settings({"ROOT": str(root), "WORKER_BASE_COMFYUI_PORT": "65530", "ORCHESTRATOR_PORT": "9090"})
    check_ports(settings, [0, 5])
    with pytest.raises(ConfigError, match=r"GPU 6 would listen on 65536 > 65535"):
        check_ports(settings, [0, 6])
