"""The one place output is written: tables for people, ``--json`` for programs, one error line.

Commands build frozen values in the service layer and hand them here; nothing else prints.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
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


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, file: TextIO | None = None) -> None:
    """Left-aligned columns under an upper-case header; missing cells print as ``-``."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    out = file or sys.stdout
    print("  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True)).rstrip(), file=out)
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)
