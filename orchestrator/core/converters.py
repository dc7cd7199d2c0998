"""Pure converters from the text of a setting (environment, file or flag) to its typed value.

Each raises ``ValueError`` saying what it expected; :func:`orchestrator.core.settings.load_settings`
turns that into a one-line error naming the variable and the value.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable
from pathlib import Path


def to_str(raw: str) -> str:
    return raw.strip()


def to_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false (1/0, yes/no, on/off)")


def to_port(raw: str) -> int:
    try:
        port = int(raw.strip())
    except ValueError:
        raise ValueError("expected a port number 1-65535") from None
    if not 1 <= port <= 65535:
        raise ValueError("expected a port number 1-65535")
    return port


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        expected = f"expected an integer >= {lo}" if hi is None else f"expected an integer {lo}-{hi}"
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(expected) from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(expected)
        return value

    return convert


def to_optional_count(raw: str) -> int | None:
    if not raw.strip():
        return None
    return int_in(1, 1024)(raw)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def to_duration(raw: str) -> float:
    """Seconds; accepts ``30``, ``2.5s``, ``15m``, ``1h``, ``500ms``."""
    match = _DURATION.match(raw)
    if not match:
        raise ValueError("expected a duration such as 30, 30s, 15m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def to_positive_duration(raw: str) -> float:
    value = to_duration(raw)
    if value <= 0:
        raise ValueError("expected a duration greater than 0 such as 5s")
    return value


def to_mock_gpu(raw: str) -> str:
    value = raw.strip().lower()
    if value in {"auto"}:
        return "auto"
    try:
        return "1" if to_bool(value) else "0"
    except ValueError:
        raise ValueError("expected 1 (mock GPUs), 0 (real GPUs) or auto") from None


def to_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def to_args(raw: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise ValueError(f"expected shell-style arguments ({exc})") from None


def choice(*choices: str) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value

    return convert


def _expand(value: str) -> Path:
    try:
        return Path(value).expanduser()
    except RuntimeError:
        raise ValueError("expected a path (the user after ~ does not exist)") from None


def to_path(raw: str) -> Path:
    value = raw.strip()
    if not value:
        raise ValueError("expected a path")
    return _expand(value)


def to_optional_path(raw: str) -> Path | None:
    return _expand(raw.strip()) if raw.strip() else None


def to_listen(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[0-9A-Za-z.:\-\[\]]+", value):
        raise ValueError("expected an IP address or host name such as 127.0.0.1")
    return value


def to_comfy_listen(raw: str) -> str:
    """Where the instances listen: a loopback address, or every interface (0.0.0.0, ::, 0.0.0.0,::).

    Another single address is refused: the monitor and the job API reach each instance on
    127.0.0.1, which an instance bound to one other interface would not answer.
    """
    value = raw.strip()
    if value in {"0.0.0.0", "::", "0.0.0.0,::"} or value == "localhost":  # noqa: S104 - a comparison, not a bind
        return value
    try:
        if ipaddress.ip_address(value).is_loopback:
            return value
    except ValueError:
        pass
    raise ValueError(
        "expected 127.0.0.1 (this machine only) or 0.0.0.0 / :: (every interface; the monitor reaches "
        "instances on 127.0.0.1, so one other address would not work)"
    )


def to_umask(raw: str) -> int:
    """An octal umask such as ``077`` or ``022`` that leaves the owner's own bits alone."""
    value = raw.strip()
    if not re.fullmatch(r"0?[0-7]{1,3}", value) or int(value, 8) & 0o700:
        raise ValueError("expected an octal umask that keeps the owner's access, such as 077 (private) or 022")
    return int(value, 8)


def to_s3_url(raw: str) -> str:
    """Empty, or ``s3://bucket[/prefix]`` (the prefix without its trailing slash)."""
    if not raw:
        return ""
    if not raw.startswith("s3://"):
        raise ValueError("expected s3://bucket/prefix (e.g. s3://my-outputs/comfy)")
    bucket, _, prefix = raw[5:].partition("/")
    if not bucket or any(c in bucket for c in " \\?#") or ".." in prefix.split("/"):
        raise ValueError("expected s3://bucket/prefix with a bucket name and no '..' in the prefix")
    return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ("bucket", "a/b")."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix
