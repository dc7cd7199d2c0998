"""Small helpers shared by the bench scripts: medians with their spread, machine notes."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def spread(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, min, max and the raw values of repeated measurements."""
    vals = [float(v) for v in values]
    return {
        "median": round(statistics.median(vals), digits),
        "min": round(min(vals), digits),
        "max": round(max(vals), digits),
        "n": len(vals),
        "values": [round(v, digits) for v in vals],
    }


def fmt(s: dict[str, Any], unit: str = "s", digits: int = 2) -> str:
    """'1.23 s (1.10–1.40, n=3)'."""
    return f"{s['median']:.{digits}f} {unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f}, n={s['n']})"


def machine_note() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (shared machine)"


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    """Write a benchmark's results as indented JSON (creating bench/results/) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
