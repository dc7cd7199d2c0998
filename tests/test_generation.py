"""Generations: the fingerprint of what an instance sees at start (pure), and reading it off the disk."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from support import commit_file, make_repo, wait_for

from orchestrator.core.generation import GenerationInputs, differences, digest, fingerprint
from orchestrator.core.layout import Layout
from orchestrator.core.plan import build_plan
from orchestrator.core.settings import load_settings
from orchestrator.lifecycle import generation as gens
from orchestrator.machine.generation import CurrentGeneration, current_id, process_generation
from orchestrator.machine.gpu import MockBackend

BASE = GenerationInputs(
    comfy_commit="a" * 40,
    nodes={"n1": "d1", "n2": "d2"},
    requirements="r1",
    model_paths="m1",
    static_links="s1",
    argv=("python", "main.py", "--cpu"),
    env={"PYTHONUNBUFFERED": digest("1")},
)


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"comfy_commit": "b" * 40}, "ComfyUI commit aaaaaaaaaaaa -> bbbbbbbbbbbb"),
        ({"nodes": {"n1": "d1", "n2": "d2", "n3": "d3"}}, "custom nodes +n3"),
        ({"nodes": {"n1": "d1"}}, "custom nodes -n2"),
        ({"nodes": {"n1": "changed", "n2": "d2"}}, "custom nodes ~n1"),
        ({"requirements": "r2"}, "installed packages changed"),
        ({"model_paths": "m2"}, "extra_model_paths changed"),
        ({"static_links": "s2"}, "static model links changed"),
        ({"argv": ("python", "main.py", "--cpu", "--lowvram")}, "flags +--lowvram"),
        ({"env": {"PYTHONUNBUFFERED": digest("1"), "MY_VAR": digest("x")}}, "environment +MY_VAR"),
    ],
)
def test_every_input_changes_the_generation_and_says_what_changed(change: dict[str, object], phrase: str) -> None:
    new = dataclasses.replace(BASE, **change)  # type: ignore[arg-type]
    assert fingerprint(new) != fingerprint(BASE)
    assert differences(BASE.components(), new.components()) == [phrase]


def test_the_same_inputs_give_the_same_generation_whatever_the_order() -> None:
    shuffled = dataclasses.replace(BASE, nodes={"n2": "d2", "n1": "d1"})
    assert fingerprint(shuffled) == fingerprint(BASE)
    assert len(fingerprint(BASE)) == 12
    assert differences(BASE.components(), shuffled.components()) == []
    assert differences(None, BASE.components()) == ["no earlier generation recorded"]


def test_an_environment_value_is_kept_only_as_a_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings({"ROOT": str(tmp_path), "MOCK_GPU": "1", "NUM_GPUS": "2"})
    plan = build_plan(settings, MockBackend(2, 2**30).list_gpus())
    layout = Layout(tmp_path)
    gen = gens.compute(settings, layout, plan, {"MY_APP_URL": "https://user:VALUE-MARKER@host"})
    other = gens.compute(settings, layout, plan, {"MY_APP_URL": "https://user:OTHER@host"})
    assert "VALUE-MARKER" not in repr(gen.components)
    assert gen.id != other.id
    # each instance's own port, folders and GPU do not make generations differ between instances
    assert "--port" not in gen.components["argv"]
    assert "CUDA_VISIBLE_DEVICES" not in gen.components["env"]


def test_gather_reads_the_code_commit_each_node_and_its_env_file(tmp_path: Path) -> None:
    settings = load_settings({"ROOT": str(tmp_path), "MOCK_GPU": "1", "NUM_GPUS": "1"})
    plan = build_plan(settings, MockBackend(1, 2**30).list_gpus())
    layout = Layout(tmp_path)
    first = make_repo(layout.comfy_dir, {"main.py": "print('hi')\n"})
    nodes = layout.custom_nodes_dir
    make_repo(nodes / "git-node", {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n"})
    (nodes / "plain-node").mkdir()
    (nodes / "plain-node" / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    (nodes / "single.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    (nodes / "off.disabled").mkdir()
    before = gens.gather(settings, layout, plan, {})
    assert before.comfy_commit == first
    assert set(before.nodes) == {"git-node", "plain-node", "single.py"}

    (nodes / "git-node" / ".env").write_text("KEY=1\n")
    after_env = gens.gather(settings, layout, plan, {})
    assert after_env.nodes["git-node"] != before.nodes["git-node"]
    commit_file(nodes / "git-node", "nodes.py", "x = 1\n")
    after_commit = gens.gather(settings, layout, plan, {})
    assert after_commit.nodes["git-node"] != after_env.nodes["git-node"]
    assert after_commit.nodes["plain-node"] == before.nodes["plain-node"]
    second = commit_file(layout.comfy_dir, "main.py", "print('new')\n")
    assert gens.gather(settings, layout, plan, {}).comfy_commit == second


def test_installed_packages_read_in_process_match_what_the_interpreter_itself_lists() -> None:
    out = subprocess.run([sys.executable, "-I", "-c", gens._PACKAGES], capture_output=True, check=True).stdout
    assert out.strip()
    assert gens.installed_packages(sys.executable) == digest(out)


def test_the_recorded_generation_and_a_process_generation_are_read_back(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.state_dir.mkdir(parents=True)
    assert current_id(layout) is None
    watcher = CurrentGeneration(layout)
    assert watcher.get() is None
    first = gens.Generation("abc123abc123", BASE.components())
    gens.record(layout, first, None)
    assert current_id(layout) == "abc123abc123"
    assert watcher.get() == "abc123abc123"
    second = gens.Generation("def456def456", {**BASE.components(), "requirements": "r9"})
    gens.record(layout, second, gens.recorded(layout))
    assert watcher.get() == "def456def456"
    assert gens.recorded(layout) == second
    code = "import time; time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], env={"ORCHESTRATOR_GENERATION": "def456def456"})
    try:
        # Readable once the new program runs (on one busy core, a moment after Popen returns).
        assert wait_for(lambda: process_generation(proc.pid), 30, 0.05, what="its environment") == "def456def456"
    finally:
        proc.kill()
        proc.wait()
    assert process_generation(None) is None
