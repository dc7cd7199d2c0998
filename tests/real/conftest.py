"""The real tier: upstream ComfyUI 0.3.64 on CPU, from its own cached venv.

Every test here is marked ``real`` and kept on one pytest-xdist worker (``xdist_group``), so at most
one set of real instances runs at a time. Without a venv (and no package index to build one) the
tests skip with one reason line, printed in the run's summary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .comfy_env import REAL_GROUP, RealUnavailable, comfy_repo, ensure_python


def real_marks(timeout: int = 600) -> list[pytest.MarkDecorator]:
    """Marks for a real-tier module: the venv build on a fresh machine alone takes ~70 s."""
    return [pytest.mark.real, pytest.mark.integration, pytest.mark.xdist_group(REAL_GROUP), pytest.mark.timeout(timeout)]


@pytest.fixture(scope="session")
def real_python() -> Path:
    """The ComfyUI venv's interpreter (built once per pins, outside the clone); skips with the reason."""
    try:
        return ensure_python()
    except RealUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def comfy_src(tmp_path_factory: pytest.TempPathFactory, real_python: Path) -> tuple[str, Path]:
    """ComfyUI 0.3.64 unpacked and committed to a local repo: (file:// URL, folder)."""
    try:
        url = comfy_repo(tmp_path_factory.mktemp("comfy-src"))
    except RealUnavailable as exc:
        pytest.skip(str(exc))
    return url, Path(url.removeprefix("file://"))
