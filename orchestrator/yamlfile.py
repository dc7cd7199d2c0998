"""One YAML loader for every config file: safe, alias-free, size-bounded, one-line errors."""

from __future__ import annotations

from typing import Any

import yaml

from orchestrator.errors import ConfigError

MAX_BYTES = 8 * 1024 * 1024  # config files are a few KB; refuse anything absurd before parsing


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: walking a "billion laughs" alias bomb is exponential."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)


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
