"""Reading config files safely: bounded size, regular files only, alias-free YAML, JSON, and
one-line errors whose quoted values and problem lists are bounded too."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.core.errors import ConfigError

MAX_BYTES = 16 * 1024 * 1024  # config files are a few KB; refuse anything absurd before parsing
MAX_PROBLEMS = 10


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: walking a "billion laughs" alias bomb is exponential."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # unannotated in types-PyYAML
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)


def clip(value: object, limit: int = 80) -> str:
    """``repr(value)``, shortened so an error line stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "…" + text[-4:]


def join_problems(problems: Sequence[str], limit: int = MAX_PROBLEMS) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def read_config(path: Path, *, what: str | None = None) -> str:
    """The text of a config file: a regular file of at most MAX_BYTES, UTF-8.

    Raises:
        FileNotFoundError: the file does not exist (callers decide whether that is fine).
        ConfigError: anything else wrong with it, in one line.
    """
    label = what or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read {label}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"cannot read {label}: not a regular file")
        raw = fh.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"invalid {label}: larger than {MAX_BYTES // 2**20} MiB; a config file is a few KB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"invalid {label}: not UTF-8 text (byte {exc.start})") from None


def load_yaml(text: str, *, name: str, hint: str = "") -> Any:
    """Parse ``text`` (from the file called ``name``).

    Raises:
        ConfigError: ``invalid NAME line N: not valid YAML (problem)[; hint]``.
    """
    suffix = f"; {hint}" if hint else ""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"invalid {name}: {len(text) // 1024} KiB is too large for a config file{suffix}")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        detail = f" ({problem})" if problem else ""
        raise ConfigError(f"invalid {name}{where}: not valid YAML{detail}{suffix}") from None
    except RecursionError:
        raise ConfigError(f"invalid {name}: nested too deeply{suffix}") from None


def load_json(text: str, *, name: str, hint: str = "") -> Any:
    """Parse JSON text with the same one-line errors as :func:`load_yaml`."""
    suffix = f"; {hint}" if hint else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"invalid {name}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}){suffix}"
        ) from None
    except RecursionError:
        raise ConfigError(f"invalid {name}: nested too deeply{suffix}") from None
