"""The shared config shipped with the package, and copying it into ``$ROOT/shared``."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from orchestrator.machine.fs import atomic_write
from orchestrator.provision.git.worktree import read_head


def shipped_shared_dir() -> Path:
    """The shared config shipped with the package (installed data files, else the source tree)."""
    installed = Path(sys.prefix) / "share/orchestrator/shared"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[3] / "shared"


def has_shared_config(path: Path) -> bool:
    """True when ``path`` is a shared checkout or holds any of the shared config files."""
    if read_head(path):
        return True
    try:
        names = [p.name for p in shipped_shared_dir().iterdir() if p.is_file()]
    except OSError:
        names = []
    return any((path / name).is_file() for name in names)


def sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def install_shipped_defaults(dest: Path, record: dict[str, str], src: Path | None = None) -> list[str]:
    """Copy the shipped shared files into ``dest``; return the relative paths written.

    A file is written when it is missing, or when it still holds what an earlier copy put
    there (``record``: relative path → sha256, updated in place) and the shipped one changed.
    Files edited locally are never overwritten.
    """
    src = src or shipped_shared_dir()
    written: list[str] = []
    for file in sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = file.relative_to(src).as_posix()
        target = dest / rel
        data = file.read_bytes()
        new = hashlib.sha256(data).hexdigest()
        current = sha256_file(target)
        if current == new:
            record[rel] = new
            continue
        if current is None or current == record.get(rel):
            atomic_write(target, data)
            record[rel] = new
            written.append(rel)
    return written
