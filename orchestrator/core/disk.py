"""Byte sizes and the free-space floor, as settings read them (pure).

``MODELS_MAX_BYTES=200G`` and ``MIN_FREE_DISK=5G,5%`` are parsed here; the download engine
asks :meth:`DiskFloor.bytes_for` how much of a filesystem of a given size must stay free.
"""

from __future__ import annotations

import dataclasses
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.I)
_FACTOR = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_size(raw: str) -> int:
    """Bytes; ``1048576``, ``500M``, ``5G``, ``5GiB``, ``1.5T`` (binary units: 1G = 2**30 bytes)."""
    match = _SIZE.match(raw)
    if not match:
        raise ValueError("expected a size such as 500M, 5G or 200G (or a number of bytes)")
    return int(float(match.group(1)) * _FACTOR[match.group(2).lower()])


def to_size(raw: str) -> int:
    """A size greater than 0 (see :func:`parse_size`)."""
    value = parse_size(raw)
    if value <= 0:
        raise ValueError("expected a size greater than 0 such as 200G")
    return value


@dataclasses.dataclass(frozen=True)
class DiskFloor:
    """Space no download may take: the smallest of some absolute sizes and filesystem percentages."""

    sizes: tuple[int, ...] = ()  # bytes
    percents: tuple[float, ...] = ()  # of the filesystem's size
    text: str = ""  # as written, for messages

    def bytes_for(self, fs_size: int) -> int:
        """The floor in bytes on a filesystem of ``fs_size`` bytes (0: no floor)."""
        candidates = [*self.sizes, *(int(fs_size * p / 100) for p in self.percents)]
        return max(0, min(candidates)) if candidates else 0

    def __str__(self) -> str:
        return self.text


def to_disk_floor(raw: str) -> DiskFloor:
    """``5G``, ``5%``, or a comma list meaning the smallest of them (``5G,5%``); ``0`` turns it off."""
    sizes: list[int] = []
    percents: list[float] = []
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    for part in parts:
        match = _PERCENT.match(part)
        if match:
            value = float(match.group(1))
            if value > 100:
                raise ValueError("expected a percentage between 0% and 100%")
            percents.append(value)
            continue
        try:
            sizes.append(parse_size(part))
        except ValueError:
            raise ValueError("expected a size or a percentage such as 5G, 500M, 5% or 5G,5% (the smaller)") from None
    return DiskFloor(tuple(sizes), tuple(percents), ",".join(parts) or "0")
