"""Fault injection for the simulator: environment variables plus a live JSON file.

Environment (read once at start)        File ``<user-directory>/simulator_faults.json``
SIM_START_DELAY   seconds of "init"     start_delay    (read at start only)
SIM_CRASH_AFTER   exit 1 N s after ready crash_after
SIM_HANG_AFTER    block the event loop  hang_after     (remove it from the file to un-hang)
SIM_OOM           print a CUDA OOM       oom            (repeat interval; 0 = once per write of the file)
SIM_IMPORT_FAILED custom nodes that fail import_failed  (comma string or list; start only)
SIM_EXEC_TIME     seconds per prompt    exec_time
SIM_GPU_NAME      device name           gpu_name
SIM_GPU_VRAM      device VRAM in bytes  gpu_vram
SIM_IGNORE_SIGTERM  ignore SIGTERM      ignore_sigterm (only SIGKILL stops it then)
SIM_SPEED         relative GPU speed    speed          (> 0; 0.5 = prompts take twice SIM_EXEC_TIME)
SIM_MODEL_LOAD_SECONDS  seconds a model loader node takes when it runs (not cached): model_load_seconds
SIM_LEAK_PER_PROMPT bytes kept per prompt leak_per_prompt (RSS grows by that much per prompt run)

The file is re-read every 0.5 s while the simulator runs; its keys override the environment,
and a key that disappears falls back to the environment's value. Times after "ready" are
measured from the moment the port was bound.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

FAULTS_FILE = "simulator_faults.json"
DEFAULT_GPU_NAME = "NVIDIA Simulated GPU"
DEFAULT_GPU_VRAM = 24 * 1024**3  # bytes
DEFAULT_EXEC_TIME = 0.05  # seconds per prompt


@dataclasses.dataclass(frozen=True)
class Faults:
    start_delay: float = 0.0  # seconds
    crash_after: float | None = None  # seconds after ready
    hang_after: float | None = None  # seconds after ready
    oom: float | None = None  # repeat interval in seconds; 0 = once
    import_failed: tuple[str, ...] = ()
    exec_time: float = DEFAULT_EXEC_TIME  # seconds per prompt
    gpu_name: str = DEFAULT_GPU_NAME
    gpu_vram: int = DEFAULT_GPU_VRAM  # bytes
    ignore_sigterm: bool = False
    speed: float = 1.0  # relative speed: a prompt takes exec_time / speed
    model_load_seconds: float = 0.0  # extra seconds per model loader node that runs (not cached)
    leak_per_prompt: int = 0  # bytes allocated, written and kept after each prompt (a leak)


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(f"expected seconds, got {value!r}")
    number = float(value)
    if number < 0 or number != number:
        raise ValueError(f"expected seconds >= 0, got {value!r}")
    return number


def _bytes(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"expected a byte count, got {value!r}")
    number = int(float(value))
    if number <= 0:
        raise ValueError(f"expected a byte count > 0, got {value!r}")
    return number


def _speed(value: Any) -> float:
    number = _seconds(value)
    if number <= 0:
        raise ValueError(f"expected a speed > 0, got {value!r}")
    return number


def _byte_count(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"expected a byte count, got {value!r}")
    number = int(float(value))
    if number < 0:
        raise ValueError(f"expected a byte count >= 0, got {value!r}")
    return number


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list):
        items = [str(v) for v in value]
    else:
        raise TypeError(f"expected a comma list of names, got {value!r}")
    return tuple(s.strip() for s in items if s.strip())


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "start_delay": _seconds,
    "crash_after": _seconds,
    "hang_after": _seconds,
    "oom": _seconds,
    "import_failed": _names,
    "exec_time": _seconds,
    "gpu_name": _text,
    "gpu_vram": _bytes,
    "ignore_sigterm": _flag,
    "speed": _speed,
    "model_load_seconds": _seconds,
    "leak_per_prompt": _byte_count,
}


def overlay(base: Faults, values: Mapping[str, Any], source: str) -> tuple[Faults, list[str]]:
    """``base`` with ``values`` (keys as in the file) applied; bad values become warnings.

    A ``None`` value (JSON null) resets the key to ``base``'s value.
    """
    changes: dict[str, Any] = {}
    warnings: list[str] = []
    for key, raw in values.items():
        convert = _CONVERTERS.get(key)
        if convert is None:
            warnings.append(f"simulator: ignoring unknown fault {key!r} in {source}")
            continue
        if raw is None:
            continue
        try:
            changes[key] = convert(raw)
        except (TypeError, ValueError) as exc:
            warnings.append(f"simulator: ignoring fault {key}={raw!r} in {source}: {exc}")
    return dataclasses.replace(base, **changes), warnings


def from_env(env: Mapping[str, str]) -> tuple[Faults, list[str]]:
    """Faults from ``SIM_*`` variables; empty variables count as unset."""
    values = {
        key: env[f"SIM_{key.upper()}"] for key in _CONVERTERS if env.get(f"SIM_{key.upper()}", "").strip()
    }
    return overlay(Faults(), values, "the environment")


def read_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The fault file's keys; a missing file is empty, a broken one is empty plus a warning."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, []
    except OSError as exc:
        return {}, [f"simulator: cannot read {path}: {exc.strerror}"]
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        return {}, [f"simulator: ignoring {path}: not valid JSON ({exc})"]
    if not isinstance(data, dict):
        return {}, [f"simulator: ignoring {path}: expected a JSON object"]
    return data, []


@dataclasses.dataclass(frozen=True)
class FaultDue:
    """What the fault clock says should happen now."""

    crash: bool = False
    hang: bool = False
    oom: bool = False


def due(faults: Faults, since_ready: float, last_oom: float | None) -> FaultDue:
    """Pure decision: which faults fire ``since_ready`` seconds after ready.

    Args:
        faults: the effective faults.
        since_ready: seconds since the port was bound.
        last_oom: ``since_ready`` when the OOM message was last printed, or None.
    """
    crash = faults.crash_after is not None and since_ready >= faults.crash_after
    hang = faults.hang_after is not None and since_ready >= faults.hang_after
    oom = False
    if faults.oom is not None:
        if last_oom is None:
            oom = True
        elif faults.oom > 0:
            oom = since_ready - last_oom >= faults.oom
    return FaultDue(crash=crash, hang=hang, oom=oom)
