"""Real ComfyUI for tests and benchmarks: its venv (built once, cached outside the clone) and its code.

Starting one is ``support.ComfyServer(tree, base, python=ensure_python(), kind="real")``.

The venv lives at ``${COMFY_REAL_CACHE:-$HOME/.cache/comfy-orchestrator}/comfyui-venv-<hash>``, where
the hash covers the torch pins and ComfyUI's ``requirements.txt``. It is built in a temporary folder
next to it and renamed into place when complete, under a file lock, so two pytest-xdist workers (or
a test run and a benchmark) never build it twice. Where it cannot be built (no package index), callers
get :class:`RealUnavailable` with a one-line reason and skip.

Only ``VENV/bin/python`` is used (``python -m pip``): script shebangs name the temporary folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_TARBALL_NAME = "ComfyUI-0.3.64.tar.gz"


def _find_tarball() -> Path:
    """COMFY_REAL_TARBALL, else ``../shared/comfyui/`` beside the checkout (or beside the checkout
    it was cloned from: CI clones elsewhere), else the workplace's ``/work/shared/comfyui/``."""
    if os.environ.get("COMFY_REAL_TARBALL"):
        return Path(os.environ["COMFY_REAL_TARBALL"])
    candidates = [REPO.parent / "shared" / "comfyui" / _TARBALL_NAME]
    try:
        origin = subprocess.run(["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin.startswith("/") or origin.startswith("file://"):
        candidates.append(Path(origin.removeprefix("file://")).parent / "shared" / "comfyui" / _TARBALL_NAME)
    candidates.append(Path("/work/shared/comfyui") / _TARBALL_NAME)
    return next((c for c in candidates if c.is_file()), candidates[0])


TARBALL = _find_tarball()
TORCH_PINS = ("torch==2.11.0", "torchvision==0.26.0", "torchaudio==2.11.0")
EXTRA_PINS = ("requests",)  # imported by ComfyUI, missing from its requirements.txt
BUILD_TIMEOUT = float(os.environ.get("COMFY_REAL_BUILD_TIMEOUT", "1800"))
COMPLETE = ".comfy-venv-complete"
READY_LINE = "To see the GUI go to"
REAL_GROUP = "real-comfyui"  # xdist_group: every real test on one worker


class RealUnavailable(Exception):
    """Real ComfyUI cannot run here; the message is the one-line reason."""


def cache_dir() -> Path:
    return Path(os.environ.get("COMFY_REAL_CACHE") or Path.home() / ".cache" / "comfy-orchestrator")


def requirements_text(tarball: Path = TARBALL) -> str:
    if not tarball.is_file():
        raise RealUnavailable(f"real tier: ComfyUI source {tarball} is missing")
    with tarfile.open(tarball) as tf:
        member = tf.extractfile("ComfyUI/requirements.txt")
        if member is None:
            raise RealUnavailable(f"real tier: no ComfyUI/requirements.txt in {tarball}")
        return member.read().decode()


def pins_hash(requirements: str) -> str:
    text = "\n".join([*TORCH_PINS, "--", requirements.strip(), "--", *EXTRA_PINS])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def venv_path(requirements: str | None = None) -> Path:
    return cache_dir() / f"comfyui-venv-{pins_hash(requirements or requirements_text())}"


def existing_python() -> Path | None:
    """The cached venv's interpreter when the venv is complete, else None (never builds)."""
    try:
        venv = venv_path()
    except RealUnavailable:
        return None
    python = venv / "bin" / "python"
    return python if (venv / COMPLETE).is_file() and python.exists() else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pip(python: Path, *args: str, deadline: float) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q",
           "--retries", "2", "--timeout", "30", *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise RealUnavailable(f"real tier: `pip install {' '.join(args)}` did not finish in {BUILD_TIMEOUT:.0f}s") from None
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip() and not ln.startswith("WARNING")]
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        last = (errors or lines or [f"exit {r.returncode}"])[0 if errors else -1].strip()
        raise RealUnavailable(f"real tier: cannot build the ComfyUI venv (pip install {args[0]} …: {last[:200]})")


def _check_imports(python: Path) -> None:
    check = subprocess.run(
        [str(python), "-c", "import torch, torchvision, torchaudio, aiohttp, requests"],
        capture_output=True, text=True, timeout=300,
    )
    if check.returncode != 0:
        tail = (check.stderr.strip().splitlines() or ["?"])[-1]
        raise RealUnavailable(f"real tier: the ComfyUI venv does not import torch: {tail[:200]}")


_FAILED: dict[str, str] = {}  # per process: a build that failed is not retried for every test


def ensure_python(log: object = None) -> Path:
    """The ComfyUI venv's interpreter, building the venv first when needed.

    Raises:
        RealUnavailable: the tarball is missing or the venv cannot be built (reason in the message).
    """
    requirements = requirements_text()
    venv = venv_path(requirements)
    if str(venv) in _FAILED:
        raise RealUnavailable(_FAILED[str(venv)])
    python = venv / "bin" / "python"
    if (venv / COMPLETE).is_file():
        return python
    with _locked(venv.with_name(venv.name + ".lock")):
        if (venv / COMPLETE).is_file():  # another worker built it while we waited
            return python
        tmp = venv.with_name(f"{venv.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        deadline = time.monotonic() + BUILD_TIMEOUT
        if callable(log):
            log(f"building the ComfyUI venv at {venv} (~70 s and ~5.4 GB download, once)")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True, timeout=300)
            _pip(tmp / "bin" / "python", *TORCH_PINS, deadline=deadline)
            req = tmp / "comfyui-requirements.txt"
            req.write_text(requirements)
            _pip(tmp / "bin" / "python", "-r", str(req), *EXTRA_PINS, deadline=deadline)
            _check_imports(tmp / "bin" / "python")
            (tmp / COMPLETE).write_text("\n".join([*TORCH_PINS, *EXTRA_PINS, "+ requirements.txt"]) + "\n")
            if venv.exists():  # an incomplete leftover
                shutil.rmtree(venv)
            os.rename(tmp, venv)
        except (RealUnavailable, subprocess.SubprocessError, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = str(exc) if isinstance(exc, RealUnavailable) else f"real tier: cannot build the ComfyUI venv: {exc}"
            _FAILED[str(venv)] = reason
            raise RealUnavailable(reason) from None
    return python


def unpack_comfy(dest: Path, tarball: Path = TARBALL) -> Path:
    """Unpack the ComfyUI source under ``dest``; returns the ``ComfyUI`` folder."""
    if not tarball.is_file():
        raise RealUnavailable(f"real tier: ComfyUI source {tarball} is missing")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tf:
        try:
            tf.extractall(dest, filter="data")
        except TypeError:  # Python < 3.11.4 (Debian 12's 3.11.2) has no extraction filters
            tf.extractall(dest)  # noqa: S202 - our own tarball, from ../shared
    return dest / "ComfyUI"


def comfy_repo(dest: Path, branch: str = "main") -> str:
    """ComfyUI unpacked under ``dest`` and committed into a local git repo; returns its file:// URL."""
    from support import git  # tests/support.py: only the tests make repos

    src = unpack_comfy(dest)
    git(src, "init", "-q", "-b", branch)
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "ComfyUI 0.3.64")
    return f"file://{src}"


if __name__ == "__main__":  # .ci/run: build (or find) the venv before the tests, outside any test timeout
    try:
        print(f"ComfyUI venv: {ensure_python(print)}")
    except RealUnavailable as exc:
        print(f"ComfyUI venv unavailable, the real tier will skip: {exc}")
