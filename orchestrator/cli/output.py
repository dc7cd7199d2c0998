"""The one place output is written: tables for people, ``--json`` for programs, one error line.

Commands build frozen values in the service layer and hand them here; nothing else prints.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def print_json(obj: Any, *, file: TextIO | None = None) -> None:
    """Pretty JSON of ``obj`` (values that JSON cannot hold are written with ``str``)."""
    print(json.dumps(obj, indent=2, default=str), file=file or sys.stdout)


def print_json_line(obj: Any, *, file: TextIO | None = None) -> None:
    """One compact JSON value on one line, flushed (JSON Lines, for streams such as ``logs --json``)."""
    print(json.dumps(obj, default=str), file=file or sys.stdout, flush=True)


def print_line(text: str = "", *, file: TextIO | None = None, flush: bool = False) -> None:
    """One line of human output (stdout unless ``file`` says otherwise)."""
    print(text, file=file or sys.stdout, flush=flush)


def note(text: str) -> None:
    """A remark for the person at the terminal, on stderr so that stdout stays data."""
    print(text, file=sys.stderr, flush=True)


def error(text: str) -> None:
    """The one-line ``error: ...`` every failing command ends with."""
    print(f"error: {text}", file=sys.stderr, flush=True)


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Left-aligned columns, two spaces apart, under ``header``; trailing spaces trimmed."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )
