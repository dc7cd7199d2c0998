"""One server fixture, two servers: the simulator always, real ComfyUI 0.3.64 where its venv exists.

The real parameter is marked ``real`` and kept on one xdist worker with the rest of the real tier;
without a venv (and no package index to build one) it skips with the reason.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from real.comfy_env import REAL_GROUP, RealUnavailable, ensure_python, unpack_comfy
from support import ComfyServer

from orchestrator.machine.ports import free_port_block

BROKEN_NODE = "conformance_broken"
BROKEN_CODE = 'import os\n\nraise RuntimeError("broken on purpose")\n\nNODE_CLASS_MAPPINGS = {}\n'

KINDS = [
    pytest.param("simulator", id="simulator"),
    pytest.param(
        "real", id="real",
        marks=[pytest.mark.real, pytest.mark.xdist_group(REAL_GROUP), pytest.mark.timeout(600)],
    ),
]


def make_tree(kind: str, dest: Path) -> tuple[Path, Path]:
    """(interpreter, ComfyUI tree) for ``kind``, with a custom node that raises at import."""
    if kind == "real":
        try:
            python = ensure_python()
            tree = unpack_comfy(dest)
        except RealUnavailable as exc:
            pytest.skip(str(exc))
    else:
        from orchestrator.simulator.tree import write_code_tree

        python, tree = Path(sys.executable), dest / "ComfyUI"
        write_code_tree(tree)
    broken = tree / "custom_nodes" / BROKEN_NODE
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "__init__.py").write_text(BROKEN_CODE)
    return python, tree


@pytest.fixture(scope="module", params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def tree(kind: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tree(kind, tmp_path_factory.mktemp(f"tree-{kind}"))


@pytest.fixture(scope="module")
def server(kind: str, tree: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """One instance shared by the tests that only read or add their own prompts."""
    python, code = tree
    srv = ComfyServer(code, tmp_path_factory.mktemp(f"inst-{kind}"), free_port_block(1), python=python, kind=kind)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def fresh_server(kind: str, tree: tuple[Path, Path], tmp_path: Path) -> Iterator[ComfyServer]:
    """An instance of its own (for tests that stop it); started, not yet waited for."""
    python, code = tree
    srv = ComfyServer(code, tmp_path / "inst", free_port_block(1), python=python, kind=kind)
    try:
        yield srv
    finally:
        srv.stop()
