"""Where the simulator reads and writes, resolved from the flags the way ComfyUI's folder_paths does."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MODEL_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})
# ComfyUI's legacy folder names map onto the new ones.
FOLDER_ALIASES = {"clip": "text_encoders", "unet": "diffusion_models"}


@dataclasses.dataclass(frozen=True)
class SearchPath:
    key: str
    path: Path
    is_default: bool = False


@dataclasses.dataclass(frozen=True)
class Folders:
    comfy_dir: Path  # the code tree (main.py's folder)
    base_dir: Path  # --base-directory, else the code tree
    output: Path
    temp: Path  # --temp-directory + "/temp"
    input: Path
    user: Path
    database: Path | None  # sqlite file, None for :memory: or non-sqlite URLs
    extra: tuple[SearchPath, ...] = ()

    def directory_by_type(self, kind: str) -> Path | None:
        return {"output": self.output, "input": self.input, "temp": self.temp}.get(kind)

    def model_dirs(self, key: str) -> list[Path]:
        """Search folders for a model category: extra ``is_default`` ones, the built-in one, other extras."""
        canonical = FOLDER_ALIASES.get(key, key)
        keys = {key, canonical} | {k for k, v in FOLDER_ALIASES.items() if v == canonical}
        extra = [sp for sp in self.extra if sp.key in keys]
        first = [sp.path for sp in extra if sp.is_default]
        rest = [sp.path for sp in extra if not sp.is_default]
        return _dedupe([*first, self.base_dir / "models" / canonical, *rest])

    def custom_node_dirs(self) -> list[Path]:
        """Built-in custom_nodes (of the base directory) plus any from the extra paths config."""
        extra = [sp.path for sp in self.extra if sp.key == "custom_nodes"]
        return _dedupe([self.base_dir / "custom_nodes", *extra])


def _dedupe(paths: Iterable[Path]) -> list[Path]:
    seen: set[Path] = set()
    out = []
    for p in paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL; None for memory or other databases."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url.endswith(":memory:"):
        return None
    return Path(url[len(prefix) :])  # sqlite:////abs/path gives /abs/path, sqlite:///rel a relative one


def resolve(args: Any, comfy_dir: Path, extra: Iterable[SearchPath] = ()) -> Folders:
    """Folders from parsed flags; relative paths resolve against the current directory."""
    base = Path(os.path.abspath(args.base_directory)) if args.base_directory else comfy_dir
    output = Path(os.path.abspath(args.output_directory)) if args.output_directory else base / "output"
    temp_parent = Path(os.path.abspath(args.temp_directory)) if args.temp_directory else base
    inp = Path(os.path.abspath(args.input_directory)) if args.input_directory else base / "input"
    user = Path(os.path.abspath(args.user_directory)) if args.user_directory else base / "user"
    url = args.database_url or f"sqlite:///{comfy_dir / 'user' / 'comfyui.db'}"
    return Folders(
        comfy_dir=comfy_dir,
        base_dir=base,
        output=output,
        temp=temp_parent / "temp",
        input=inp,
        user=user,
        database=sqlite_path(url),
        extra=tuple(extra),
    )


def extra_search_paths(config: Any, yaml_dir: Path) -> list[SearchPath]:
    """The entries of one extra_model_paths YAML document, in file order.

    Each top-level section may set ``base_path`` (relative to the YAML's folder; ``~`` and
    ``$VARS`` expand) and ``is_default``; every other key maps to one folder per line.
    """
    out: list[SearchPath] = []
    if not isinstance(config, Mapping):
        return out
    for section in config.values():
        if not isinstance(section, Mapping):
            continue
        conf = dict(section)
        base: str | None = None
        if "base_path" in conf:
            base = os.path.expandvars(os.path.expanduser(str(conf.pop("base_path"))))
            if not os.path.isabs(base):
                base = os.path.abspath(os.path.join(yaml_dir, base))
        is_default = bool(conf.pop("is_default", False))
        for key, value in conf.items():
            if value is None:
                continue
            for line in str(value).split("\n"):
                if not line:
                    continue
                if base:
                    full = os.path.join(base, line)
                elif os.path.isabs(line):
                    full = line
                else:
                    full = os.path.abspath(os.path.join(yaml_dir, line))
                out.append(SearchPath(str(key), Path(os.path.normpath(full)), is_default))
    return out


def list_models(dirs: Iterable[Path]) -> list[str]:
    """Model files under ``dirs`` (recursively, following links), as sorted relative paths."""
    names: set[str] = set()
    for root in dirs:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if os.path.splitext(name)[1].lower() in MODEL_EXTENSIONS:
                    names.add(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(names)


def list_input_images(input_dir: Path) -> list[str]:
    """Files directly in the input folder, as ComfyUI's LoadImage lists them."""
    try:
        return sorted(p.name for p in input_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return []


def annotated(name: str) -> tuple[str, str | None]:
    """Split ``"file.png [output]"`` into the name and its folder type."""
    for kind in ("output", "input", "temp"):
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (made absolute, normalised) lies within ``root``."""
    root_abs = os.path.abspath(root)
    return os.path.commonpath((root_abs, os.path.abspath(path))) == root_abs


def expand_prefix(prefix: str, width: int, height: int, now: time.struct_time | None = None) -> str:
    """ComfyUI's ``%width%``/``%year%``/... substitutions in a filename prefix."""
    if "%" not in prefix:
        return prefix
    t = now or time.localtime()
    values = {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(t.tm_year),
        "%month%": f"{t.tm_mon:02}",
        "%day%": f"{t.tm_mday:02}",
        "%hour%": f"{t.tm_hour:02}",
        "%minute%": f"{t.tm_min:02}",
        "%second%": f"{t.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(key, value)
    return prefix


def next_counter(existing: Iterable[str], filename: str) -> int:
    """The next ``<filename>_<counter:05>_`` counter: one past the highest already there."""
    best = 0
    plen = len(filename)
    for name in existing:
        if name[:plen].lower() != filename.lower() or name[plen : plen + 1] != "_":
            continue
        digits = name[plen + 1 :].split("_")[0]
        if digits.isdigit():
            best = max(best, int(digits))
    return best + 1


def save_path(prefix: str, output_dir: Path, width: int, height: int) -> tuple[Path, str, int, str]:
    """Folder, file stem, first counter and subfolder for a SaveImage prefix like ``a/b/ComfyUI``.

    Raises:
        ValueError: the prefix points outside ``output_dir``.
    """
    prefix = expand_prefix(prefix, width, height)
    norm = os.path.normpath(prefix)
    subfolder = os.path.dirname(norm)
    filename = os.path.basename(norm)
    folder = Path(os.path.join(output_dir, subfolder))
    if not inside(output_dir, folder):
        raise ValueError(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(folder)}\n         output_dir: {output_dir}"
        )
    try:
        existing = os.listdir(folder)
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        existing = []
    return folder, filename, next_counter(existing, filename), subfolder
