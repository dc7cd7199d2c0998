"""pytest plugin used by bench/chaos_report.py: keeps the chaos test's figures in a file.

The chaos test computes its figures, prints them (``print_figures``) and returns them
(``chaos_run``) without writing anything under bench/; this plugin wraps both in the collected
test module so that the figures land in $BENCH_CHAOS_OUT (the first of the two wins; the
printed copy is written even when one of the test's assertions fails afterwards).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _write(figures: Any) -> None:
    out = os.environ.get("BENCH_CHAOS_OUT")
    if out and isinstance(figures, dict):
        Path(out).write_text(json.dumps(figures, indent=2) + "\n")


def _wrap(fn: Callable[..., Any], after: bool) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not after and args:
            _write(args[0])
        result = fn(*args, **kwargs)
        if after:
            _write(result)
        return result

    wrapped.__dict__["_bench_wrapped"] = True
    return wrapped


@pytest.hookimpl
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        for name, after in (("print_figures", False), ("chaos_run", True)):
            fn = getattr(module, name, None)
            if callable(fn) and not getattr(fn, "_bench_wrapped", False):
                setattr(module, name, _wrap(fn, after))
