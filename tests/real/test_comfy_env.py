"""The real tier's venv cache: keyed by the pins, built once under a lock, renamed into place.

pip is replaced by a stub here (no download): these tests run everywhere, real venv or not.
"""

from __future__ import annotations

import sysconfig
import threading
from pathlib import Path

import pytest

from . import comfy_env
from .comfy_env import RealUnavailable


def _site(venv: Path) -> Path:
    rel = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    return venv / rel


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not comfy_env.TARBALL.is_file():
        pytest.skip(f"real tier: ComfyUI source {comfy_env.TARBALL} is missing")
    monkeypatch.setenv("COMFY_REAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(comfy_env, "_FAILED", {})
    return tmp_path / "cache"


def test_the_venv_path_is_keyed_by_the_pins_and_requirements(cache: Path) -> None:
    req = comfy_env.requirements_text()
    assert "torch" in req
    path = comfy_env.venv_path(req)
    assert path.parent == cache
    assert path.name == f"comfyui-venv-{comfy_env.pins_hash(req)}"
    assert comfy_env.pins_hash(req) != comfy_env.pins_hash(req + "\nnumpy<2\n")
    assert comfy_env.existing_python() is None


def test_two_concurrent_builders_build_once_and_rename_into_place(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_pip(python: Path, *args: str, deadline: float) -> None:
        calls.append(args)
        site = _site(python.parent.parent)
        for mod in ("torch", "torchvision", "torchaudio", "aiohttp", "requests"):
            (site / f"{mod}.py").write_text("")

    monkeypatch.setattr(comfy_env, "_pip", fake_pip)
    got: list[Path] = []
    workers = [threading.Thread(target=lambda: got.append(comfy_env.ensure_python())) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    venv = comfy_env.venv_path()
    assert got == [venv / "bin" / "python"] * 2
    assert len(calls) == 2
    assert calls[0] == comfy_env.TORCH_PINS
    assert (venv / comfy_env.COMPLETE).is_file()
    assert sorted(p.name for p in cache.iterdir()) == [venv.name, f"{venv.name}.lock"]  # no temp folder left
    assert comfy_env.existing_python() == venv / "bin" / "python"


def test_a_failed_build_leaves_nothing_and_gives_one_reason(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(python: Path, *args: str, deadline: float) -> None:
        raise RealUnavailable("real tier: cannot build the ComfyUI venv (pip install torch==2.11.0 …: ERROR: no index)")

    monkeypatch.setattr(comfy_env, "_pip", failing_pip)
    with pytest.raises(RealUnavailable, match="^real tier: cannot build the ComfyUI venv"):
        comfy_env.ensure_python()
    with pytest.raises(RealUnavailable):  # not retried within the same run
        comfy_env.ensure_python()
    assert [p.name for p in cache.iterdir()] == [f"{comfy_env.venv_path().name}.lock"]
