"""Small filesystem helpers: atomic writes, JSON state files.

Every file the product writes whole goes through :func:`atomic_write` (temp file + rename): a
kill mid-write leaves the old file or the new one, never a torn one. ``durable`` adds an fsync
before the rename, so that a power loss cannot lose the new contents either; it is on by default
and turned off only for files rewritten every second or that are hints (a download's status and
verified-files record: on ext4 each fsync waits for the writeback of whatever large file is being
downloaded at the time).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: str | bytes, *, mode: int = 0o644, durable: bool = True) -> bool:
    """Write ``data`` to ``path`` atomically (temp file + fsync when ``durable`` + rename).

    Returns:
        True when the file changed, False when it already held exactly ``data``.
    """
    raw = data.encode() if isinstance(data, str) else data
    try:
        if path.read_bytes() == raw:
            if (path.stat().st_mode & 0o777) != mode:
                path.chmod(mode)
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def write_json(path: Path, obj: Any, *, mode: int = 0o644, durable: bool = True) -> bool:
    """Atomically write ``obj`` as indented JSON (see :func:`atomic_write` for ``durable``)."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode=mode, durable=durable)


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON file; a missing or unreadable file gives ``default``."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default
