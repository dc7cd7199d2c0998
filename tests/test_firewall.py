"""The dependency firewall (pure, with values), the installer choice, and the import check.

End to end: real git repos (file://), a local PEP 503 index served by ``python -m http.server``
with wheels built here (fake ``torch`` and OpenCV distributions), real uv and pip installing into
a throwaway venv, real child interpreters importing the nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import build_wheel, install_fake_dist, make_repo, package_index

from orchestrator.cli.nodes import cmd_nodes_sync
from orchestrator.core.errors import ProvisionError
from orchestrator.core.settings import load_settings
from orchestrator.provision.nodes import deps, firewall
from orchestrator.provision.nodes.imports import check_imports

INSTALLED = {"torch": "2.1.0", "numpy": "1.26.4", "opencv-contrib-python-headless": "4.10.0.84", "pillow": "10"}


# ---------------------------------------------------------------- pure decisions
def test_a_node_asking_for_another_torch_is_refused_by_name_and_the_others_pass() -> None:
    wall = firewall.decide(
        {"old": ["torch==1.13", "einops"], "fine": ["torch>=2.0", "einops>=0.6"], "free": ["tqdm"]},
        INSTALLED,
    )
    assert [r.line for r in wall.refused] == ["node old: refused: wants torch==1.13, torch 2.1.0 is kept"]
    assert set(wall.accepted) == {"fine", "free"}
    assert wall.lines == ("torch>=2.0", "einops>=0.6", "tqdm")
    assert "torch==2.1.0" in wall.constraints


def test_every_opencv_request_is_rewritten_to_the_one_installed() -> None:
    wall = firewall.decide(
        {"reactor": ["opencv-python"], "impact": ["opencv-python-headless>=4.7"], "same": ["opencv-contrib-python-headless"]},
        INSTALLED,
    )
    assert wall.opencv == "opencv-contrib-python-headless"
    assert [(r.node, r.installed_as) for r in wall.rewrites] == [
        ("reactor", "opencv-contrib-python-headless"),
        ("impact", "opencv-contrib-python-headless>=4.7"),
    ]
    assert wall.refused == ()
    assert "opencv-contrib-python-headless==4.10.0.84" in wall.constraints
    # one that the kept version cannot satisfy is refused, naming the kept distribution
    too_new = firewall.decide({"n": ["opencv-python>=5"]}, INSTALLED)
    assert too_new.refused[0].line == (
        "node n: refused: wants opencv-contrib-python-headless>=5, opencv-contrib-python-headless 4.10.0.84 is kept"
    )


def test_the_configured_opencv_wins_and_nothing_installed_means_the_headless_contrib() -> None:
    assert firewall.decide({"n": ["opencv-python"]}, INSTALLED, opencv="opencv-python").rewrites == ()
    bare = firewall.decide({"n": ["opencv-python==4.9"]}, {})
    assert bare.rewrites[0].installed_as == "opencv-contrib-python-headless==4.9"
    assert bare.refused == ()
    assert bare.constraints == ()


def test_numpy_is_held_to_its_major_version() -> None:
    wall = firewall.decide(
        {"two": ["numpy>=2"], "old": ["numpy<1"], "newer": ["numpy>=1.27"], "any": ["numpy"]}, INSTALLED
    )
    assert {r.node for r in wall.refused} == {"two", "old"}
    assert set(wall.accepted) == {"newer", "any"}
    assert "numpy>=1,<2" in wall.constraints


def test_markers_urls_and_options_are_read_not_guessed() -> None:
    lines = firewall.requirement_lines(
        "# comment\n\ntorch==1.0; sys_platform == 'win32'\n--extra-index-url https://x\n"
        "git+https://example.com/a.git  # a comment\nfoo \\\n  >=1.0\n"
    )
    assert lines == ["torch==1.0; sys_platform == 'win32'", "--extra-index-url https://x",
                     "git+https://example.com/a.git", "foo    >=1.0"]
    wall = firewall.decide({"n": lines}, INSTALLED)
    assert wall.refused == ()  # the torch pin is for Windows only
    assert wall.accepted["n"] == ('torch==1.0; sys_platform == "win32"', "git+https://example.com/a.git", "foo>=1.0")
    assert wall.warnings == ("node n: requirements option '--extra-index-url' ignored",)


def test_uv_is_found_beside_the_interpreter_then_on_path_else_pip(tmp_path: Path) -> None:
    own, on_path = tmp_path / "own", tmp_path / "path"
    for d in (own, on_path):
        d.mkdir()
    assert deps.find_installer("auto", {"PATH": str(on_path)}, own).kind == "pip"
    with pytest.raises(ProvisionError, match="NODES_INSTALLER=uv but no uv binary"):
        deps.find_installer("uv", {"PATH": str(on_path)}, own)
    (on_path / "uv").write_text("#!/bin/sh\n")
    (on_path / "uv").chmod(0o755)
    assert deps.find_installer("auto", {"PATH": str(on_path)}, own).how == "on PATH"
    (own / "uv").write_text("#!/bin/sh\n")
    (own / "uv").chmod(0o755)
    assert deps.find_installer("auto", {"PATH": str(on_path)}, own).path == str(own / "uv")
    assert deps.find_installer("pip", {"PATH": str(on_path)}, own).kind == "pip"


def test_uv_is_given_pips_index_settings() -> None:
    argv = deps.pip_command(
        "/py", [Path("/r.txt")], None, "/uv",
        {"PIP_INDEX_URL": "http://i/simple", "PIP_EXTRA_INDEX_URL": "http://e/simple", "PIP_FIND_LINKS": "/w"},
    )
    assert argv[:5] == ["/uv", "pip", "install", "--python", "/py"]
    assert argv[5:7] == ["--index-url", "http://i/simple"]
    assert "--extra-index-url" in argv
    assert "--find-links" in argv
    assert "--no-index" in deps.pip_command("/py", [], None, "/uv", {"PIP_NO_INDEX": "1"})
    assert "--index-url" not in deps.pip_command("/py", [], None, "/uv", {"PIP_INDEX_URL": "x", "UV_INDEX_URL": "y"})


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("index")
    wheels = base / "wheels"
    wheels.mkdir()
    for name, version, module in [
        ("torch", "1.13.0", "torch"), ("torch", "2.1.0", "torch"), ("opencv-python", "4.9.0.80", "cv2"),
        ("opencv-contrib-python-headless", "4.10.0.84", "cv2"), ("orchtest-alpha", "1.0", "orchtest_alpha"),
        ("opencv-python-headless", "4.9.0.80", "cv2"),
    ]:
        build_wheel(wheels, name, version, module)
    build_wheel(wheels, "orchtest-albu", "1.0", "orchtest_albu", requires=["opencv-python-headless"])
    with package_index(wheels, base / "served") as url:
        yield url


def node_repos(base: Path) -> dict[str, str]:
    mapping = "NODE_CLASS_MAPPINGS = {}\n"
    make_repo(base / "oldtorch", {"__init__.py": mapping, "requirements.txt": "torch==1.13\n"})
    make_repo(base / "reactor", {"__init__.py": "import cv2\n" + mapping, "requirements.txt": "opencv-python\n"})
    make_repo(base / "alpha", {"__init__.py": "import orchtest_alpha\n" + mapping, "requirements.txt": "orchtest-alpha\n"})
    make_repo(base / "broken", {"__init__.py": "raise RuntimeError('needs a GPU\\nsecond line')\n"})
    make_repo(base / "nomap", {"__init__.py": "X = 1\n"})
    make_repo(base / "albu", {"__init__.py": mapping, "requirements.txt": "orchtest-albu\n"})
    return {n: f"file://{base / n}" for n in ("oldtorch", "reactor", "alpha", "broken", "nomap", "albu")}


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_the_firewall_end_to_end_on_a_local_index(
    installer: str, index: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if installer == "uv" and not (Path(sys.executable).parent / "uv").exists():
        pytest.skip("uv is not installed beside this interpreter (pip install uv)")
    venv = tmp_path / "comfy-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    install_fake_dist(python, "torch", "2.1.0")
    install_fake_dist(python, "opencv-contrib-python-headless", "4.10.0.84", "cv2")
    urls = node_repos(tmp_path / "repos")
    config = tmp_path / "config_nodes.json"
    config.write_text(json.dumps({"custom_nodes": [
        {"name": n, "url": u, "requirements": True} for n, u in urls.items()]}))
    for key in [k for k in os.environ if k.startswith(("PIP_", "UV_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", index)
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    root = tmp_path / "root"
    settings = load_settings({"ROOT": str(root), "COMFY_PYTHON": str(python), "NODES_INSTALLER": installer,
                              "PIP_TIMEOUT": "300", "GIT_TIMEOUT": "30"})
    code = cmd_nodes_sync(settings, argparse.Namespace(dry_run=False, prune=False, file=config, json=True))
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    wall = report["pip"]["firewall"]
    assert report["pip"]["tool"] == installer
    assert wall["refused"] == [{"node": "oldtorch", "package": "torch", "wanted": "torch==1.13", "kept": "2.1.0"}]
    assert wall["rewritten"] == [
        {"node": "reactor", "requested": "opencv-python", "rewritten": "opencv-contrib-python-headless"}]
    assert report["failed"] == ["oldtorch"]
    show = "import importlib.metadata as m, torch, orchtest_alpha; print(m.version('torch'), orchtest_alpha.VERSION)"
    assert subprocess.run([python, "-c", show], capture_output=True, text=True, check=True).stdout.split() == ["2.1.0", "1.0"]
    missing = subprocess.run([python, "-c", "import importlib.metadata as m; m.version('opencv-python')"])
    assert missing.returncode != 0  # the rewritten request installed nothing over cv2/
    # a dependency (not a requirement line) that brings another OpenCV is named, not silent
    assert "firewall: opencv-python-headless 4.9.0.80 was installed by a dependency: it shares cv2/ with " \
        "opencv-contrib-python-headless" in report["warnings"]
    # the import check, before any instance: by name, first line of the error
    assert report["import_failed"] == {
        "broken": "RuntimeError: needs a GPU",
        "nomap": "no NODE_CLASS_MAPPINGS (nor comfy_entrypoint): ComfyUI skips it",
    }


def test_a_node_that_kills_the_interpreter_is_named_and_the_rest_are_checked(tmp_path: Path) -> None:
    nodes = tmp_path / "custom_nodes"
    for name, code in [("a_ok", "NODE_CLASS_MAPPINGS = {}\n"), ("b_dies", "import os\nos._exit(9)\n"),
                       ("c_exit", "import sys\nsys.exit(3)\n"), ("d_ok", "NODE_CLASS_MAPPINGS = {'X': object}\n")]:
        (nodes / name).mkdir(parents=True)
        (nodes / name / "__init__.py").write_text(code)
    failed = check_imports(sys.executable, tmp_path, sorted(nodes.iterdir()), deps.run_command, dict(os.environ), 60)
    assert failed == {"b_dies": "import crashed the interpreter (exit 9)", "c_exit": "SystemExit: 3"}


def test_import_failures_and_the_lock_hash_are_metrics(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from orchestrator.core.layout import Layout
    from orchestrator.machine.fs import write_json
    from orchestrator.monitor.collectors import ProvisioningCollector

    layout = Layout(tmp_path)
    write_json(layout.status_file, {"nodes": {"counts": {"installed": 2}, "import_failed": {"broken": "RuntimeError: x"}},
                                    "lock": {"hash": "0123456789abcdef"}})
    reg = CollectorRegistry()
    reg.register(ProvisioningCollector(layout))
    assert reg.get_sample_value("orchestrator_node_import_failed", {"node": "broken", "error": "RuntimeError: x"}) == 1
    text = "\n".join(f"{s.name}{s.labels}" for m in reg.collect() for s in m.samples if s.name == "orchestrator_build_info")
    assert "'lock_hash': '0123456789abcdef'" in text
