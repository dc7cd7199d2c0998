"""Minimal PNG writer (zlib + struct; no numpy, no PIL)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bytes(width: int, height: int, seed: int = 0, text: Mapping[str, str] | None = None) -> bytes:
    """An RGB PNG of ``width`` x ``height``: a vertical gradient whose colours come from ``seed``.

    ``text`` becomes tEXt chunks (ComfyUI stores ``prompt`` and ``workflow`` JSON there).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    r0, g0, b0 = seed & 0xFF, (seed >> 8) & 0xFF, (seed >> 16) & 0xFF
    comp = zlib.compressobj(6)
    body = []
    for y in range(height):
        shade = (y * 255) // max(1, height - 1)
        pixel = bytes(((r0 + shade) & 0xFF, (g0 + shade // 2) & 0xFF, (b0 + 255 - shade) & 0xFF))
        body.append(comp.compress(b"\x00" + pixel * width))
    body.append(comp.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    chunks = [_chunk(b"IHDR", header)]
    for key, value in (text or {}).items():
        chunks.append(
            _chunk(b"tEXt", key.encode("latin-1", "replace") + b"\x00" + value.encode("latin-1", "replace"))
        )
    chunks.append(_chunk(b"IDAT", b"".join(body)))
    chunks.append(_chunk(b"IEND", b""))
    return SIGNATURE + b"".join(chunks)


def png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR, or None if ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)
