"""The shared model tree: ``comfy_dir_config.yaml`` validated, rebased, created; static-model links.

``comfy_dir_config.yaml`` is ComfyUI's extra-model-paths format: one or more sections (``comfyui:``),
each with ``base_path``, optional ``is_default`` and ``category: relative/folder/`` lines; a ``|``
block value lists several folders, one per line.

Rebasing rule (the production file says ``base_path: /workspace/ComfyUI``):

* a base path under ``/workspace`` (the legacy ROOT) moves to the same relative place under
  ``$ROOT`` when ROOT is not ``/workspace`` (``/workspace/ComfyUI`` → ``$ROOT/ComfyUI``);
* a relative base path is taken relative to ``$ROOT`` (ComfyUI would resolve it against the
  YAML's folder, which for the rebased copy is the state folder: wrong);
* the result must lie under ``$ROOT`` (the orchestrator never writes outside it): an absolute
  base path elsewhere, or one that leaves ROOT with ``..``, is an error naming the key.

The rebased YAML is written to ``Layout.extra_model_paths`` and passed to every instance with
``--extra-model-paths-config``. Everything is validated before anything is written.

Static models (``static-models.json``): ``$ROOT/shared/sd_models/<source>`` is linked at the
target. A target whose first segment is a category of the tree (``checkpoints/x.safetensors``)
lands in that category's folder; any other target is taken relative to the default section's
base path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from orchestrator.core.configfile import load_json, load_yaml, read_config
from orchestrator.core.errors import ConfigError, ModelError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine.fs import atomic_write

log = logging.getLogger(__name__)

CONFIG_NAME = "comfy_dir_config.yaml"
STATIC_NAME = "static-models.json"
LEGACY_ROOT = Path("/workspace")
# Keys of a section that are settings, not folders.
_SECTION_SETTINGS = frozenset({"base_path", "is_default"})
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class LinkResult:
    """One static-models.json symlink and what was done with it."""

    source: Path
    target: Path
    action: str  # created | ok | replaced | kept_file | missing_source | planned
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": str(self.source), "target": str(self.target), "action": self.action,
                "message": self.message}


@dataclasses.dataclass(frozen=True)
class TreeResult:
    """The validated model tree and, after :func:`prepare`, what was written.

    ``categories`` maps each category to its folders (absolute, rebased), default section first.
    """

    config_file: Path
    extra_model_paths: Path
    base_path: Path  # the default section's base path, rebased
    categories: Mapping[str, tuple[Path, ...]]
    rebased_yaml: str
    applied: bool = False
    created: tuple[Path, ...] = ()
    links: tuple[LinkResult, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def folders(self) -> tuple[Path, ...]:
        seen: dict[Path, None] = {}
        for paths in self.categories.values():
            for p in paths:
                seen.setdefault(p, None)
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_file": str(self.config_file),
            "extra_model_paths": str(self.extra_model_paths),
            "base_path": str(self.base_path),
            "categories": {k: [str(p) for p in v] for k, v in self.categories.items()},
            "applied": self.applied,
            "created": [str(p) for p in self.created],
            "links": [link.to_dict() for link in self.links],
            "warnings": list(self.warnings),
        }


@dataclasses.dataclass(frozen=True)
class StaticLink:
    source: str  # relative to $ROOT/shared/sd_models
    target: str  # category/… or relative to the base path
    description: str = ""


# ---------------------------------------------------------------- pure parts
def rebase(base_path: str, root: Path) -> Path:
    """Where ``base_path`` lives on this machine (see the module docstring for the rule).

    Raises:
        ValueError: the result would not be under ``root``.
    """
    path = Path(os.path.normpath(base_path.strip()))
    if not path.is_absolute():
        path = root / path
    elif root != LEGACY_ROOT and (path == LEGACY_ROOT or LEGACY_ROOT in path.parents):
        path = root / path.relative_to(LEGACY_ROOT)
    path = Path(os.path.normpath(path))
    norm_root = Path(os.path.normpath(root))
    if path != norm_root and norm_root not in path.parents:
        raise ValueError(f"{base_path.strip()!r} is outside ROOT ({root}); use a folder under it")
    return path


def _relative_folder(value: str) -> str | None:
    """None when ``value`` is a safe relative folder, else the reason it is not."""
    if "\\" in value or "\0" in value:
        return "expected a folder relative to base_path, with / separators"
    if value.startswith(("/", "~")):
        return f"{value!r} is absolute; expected a folder relative to base_path such as models/checkpoints/"
    if ".." in PurePosixPath(value).parts:
        return f"{value!r} leaves base_path ('..'); expected a folder inside it"
    if any(len(part.encode()) > 255 for part in PurePosixPath(value).parts) or len(value) > 1024:
        return "folder name too long (255 bytes per name at most)"
    return None


def parse_config(
    text: str, root: Path, *, name: str = CONFIG_NAME
) -> tuple[Path, dict[str, tuple[Path, ...]], str]:
    """Validate ``comfy_dir_config.yaml`` and rebase it.

    Returns:
        (default base path, category → folders, the rebased YAML text).

    Raises:
        ConfigError: naming the key that is wrong: ``invalid comfy_dir_config.yaml: key 'x': …``.
    """
    data = load_yaml(text, name=name, hint="fix the file in the shared repo")
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"invalid {name}: expected a section such as 'comfyui:' holding base_path and "
            "category: folder lines"
        )
    multi = len(data) > 1

    def bad(section: str, key: str, why: str) -> ConfigError:
        shown = f"{section}.{key}" if multi else key
        return ConfigError(f"invalid {name}: key {shown!r}: {why}")

    sections: list[tuple[bool, Path, dict[str, tuple[Path, ...]]]] = []
    rebased: dict[str, Any] = {}
    for section, body in data.items():
        section = str(section)
        if not isinstance(body, dict):
            raise ConfigError(
                f"invalid {name}: key {section!r}: expected a mapping with base_path and "
                "category: folder lines"
            )
        base_raw = body.get("base_path")
        if base_raw is None:
            raise bad(section, "base_path", "missing; set it to the folder the model folders are relative to")
        if not isinstance(base_raw, str) or not base_raw.strip():
            raise bad(section, "base_path", "expected a folder path such as /workspace/ComfyUI")
        is_default = body.get("is_default", False)
        if not isinstance(is_default, bool):
            raise bad(section, "is_default", "expected true or false")
        try:
            base = rebase(base_raw, root)
        except ValueError as exc:
            raise bad(section, "base_path", str(exc)) from None
        cats: dict[str, tuple[Path, ...]] = {}
        out: dict[str, Any] = {"base_path": str(base)}
        if "is_default" in body:
            out["is_default"] = is_default
        for key, value in body.items():
            key = str(key)
            if key in _SECTION_SETTINGS:
                continue
            if not _KEY.match(key):
                raise bad(section, key, "expected a category name such as checkpoints")
            if not isinstance(value, str):
                raise bad(section, key, "expected a folder relative to base_path such as models/checkpoints/")
            lines = [line.strip() for line in value.splitlines() if line.strip()]
            if not lines:
                raise bad(section, key, "empty; expected a folder relative to base_path such as models/x/")
            folders: list[Path] = []
            for line in lines:
                why = _relative_folder(line)
                if why:
                    raise bad(section, key, why)
                folders.append(base / line.rstrip("/"))
            cats[key] = tuple(folders)
            out[key] = value
        sections.append((is_default, base, cats))
        rebased[section] = out
    # The default section (is_default: true, else the first) is searched first, as ComfyUI does.
    sections.sort(key=lambda s: not s[0])
    merged: dict[str, tuple[Path, ...]] = {}
    for _, _, section_cats in sections:
        for key, paths in section_cats.items():
            have = merged.get(key, ())
            merged[key] = have + tuple(f for f in paths if f not in have)
    header = f"# Rebased copy of {name} for this machine; written by the orchestrator, do not edit.\n"
    return sections[0][1], merged, header + yaml.safe_dump(rebased, sort_keys=False, default_flow_style=False)


def parse_static(text: str, *, name: str = STATIC_NAME) -> tuple[StaticLink, ...]:
    """Validate static-models.json; only ``symlinks`` matters here (``no_index`` is for the nodes)."""
    data = load_json(text, name=name, hint="fix it in the shared repo")
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {name}: expected an object with a 'symlinks' list")
    items = data.get("symlinks", [])
    if not isinstance(items, list):
        raise ConfigError(f"invalid {name}: symlinks: expected a list of {{source, target}} objects")
    links = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"invalid {name}: symlinks[{i}]: expected an object with source and target")
        for field in ("source", "target"):
            value = item.get(field)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"invalid {name}: symlinks[{i}].{field}: expected a relative path")
            why = _relative_folder(value.strip())
            if why:
                why = why.replace("base_path", "its folder")
                raise ConfigError(f"invalid {name}: symlinks[{i}].{field}: {why}")
        links.append(StaticLink(item["source"].strip(), item["target"].strip().rstrip("/"),
                                str(item.get("description", ""))))
    return tuple(links)


def category_dir(tree: TreeResult, category: str) -> Path:
    """The first folder of ``category`` (where downloads go).

    Raises:
        ConfigError: the tree has no such category; the message lists the ones it has.
    """
    folders = tree.categories.get(category)
    if not folders:
        known = ", ".join(sorted(tree.categories)) or "none"
        raise ConfigError(
            f"unknown model category {category!r}: {tree.config_file.name} defines {known}"
        )
    return folders[0]


def resolve_dest(tree: TreeResult, dest: str) -> Path:
    """``checkpoints/SD15`` → the checkpoints folder / SD15 (the category must exist)."""
    parts = PurePosixPath(dest.strip().strip("/")).parts
    if not parts:
        raise ConfigError("empty model destination; expected a category such as checkpoints")
    return category_dir(tree, parts[0]).joinpath(*parts[1:])


def link_path(tree: TreeResult, target: str) -> Path:
    parts = PurePosixPath(target).parts
    if len(parts) > 1 and parts[0] in tree.categories:
        return category_dir(tree, parts[0]).joinpath(*parts[1:])
    return tree.base_path.joinpath(*parts)


# ---------------------------------------------------------------- effects
def _read(path: Path) -> str | None:
    try:
        return read_config(path)
    except FileNotFoundError:
        return None


def load_tree(settings: Settings, layout: Layout) -> TreeResult:
    """Read and validate comfy_dir_config.yaml without writing anything.

    Raises:
        ConfigError: the file is missing or invalid.
    """
    config = layout.shared_dir / CONFIG_NAME
    text = _read(config)
    if text is None:
        raise ConfigError(
            f"missing {config}: the shared repo must provide {CONFIG_NAME} (check SHARED_REPO_URL)"
        )
    base, categories, rebased = parse_config(text, settings.root)
    return TreeResult(
        config_file=config,
        extra_model_paths=layout.extra_model_paths,
        base_path=base,
        categories=categories,
        rebased_yaml=rebased,
    )


def empty_tree(layout: Layout) -> TreeResult:
    """The tree when the shared repo has no comfy_dir_config.yaml (reported as a warning)."""
    config = layout.shared_dir / CONFIG_NAME
    return TreeResult(
        config_file=config, extra_model_paths=layout.extra_model_paths, base_path=layout.comfy_dir,
        categories={}, rebased_yaml="", warnings=(f"no {config}: the model tree was not prepared",),
    )


def apply_link(source: Path, target: Path) -> LinkResult:
    """Link ``target`` → ``source`` idempotently; never overwrite a regular file."""
    if not source.exists():
        msg = f"static model source {source} is missing; link {target} not created"
        return LinkResult(source, target, "missing_source", msg)
    if target.is_symlink():
        if os.readlink(target) == str(source):
            return LinkResult(source, target, "ok")
        action = "replaced"
    elif target.exists():
        msg = f"{target} is a regular file or folder; static model link to {source} not created"
        return LinkResult(source, target, "kept_file", msg)
    else:
        action = "created"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.link-tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(source, tmp)
    os.replace(tmp, target)  # atomic: the old (wrong) link is swapped, never missing
    return LinkResult(source, target, action)


def prepare(settings: Settings, layout: Layout) -> TreeResult:
    """Validate, write the rebased config, create every folder, apply static-models.json.

    Raises:
        ConfigError: comfy_dir_config.yaml or static-models.json is invalid (nothing written).
        ModelError: a folder cannot be created.
    """
    tree = load_tree(settings, layout)
    static_text = _read(layout.static_models)
    static = parse_static(static_text) if static_text is not None else ()
    link_targets = [(lnk, link_path(tree, lnk.target)) for lnk in static]
    # Everything is valid: now write.
    atomic_write(layout.extra_model_paths, tree.rebased_yaml)
    created = []
    for folder in tree.folders:
        if folder.is_dir():
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelError(f"cannot create model folder {folder}: {exc.strerror}") from None
        created.append(folder)
    sd_models = layout.shared_dir / "sd_models"
    links = []
    warnings = []
    for lnk, target in link_targets:
        try:
            result = apply_link(sd_models / lnk.source, target)
        except OSError as exc:
            msg = f"cannot link {target}: {exc.strerror}"
            result = LinkResult(sd_models / lnk.source, target, "failed", msg)
        if result.message:
            log.warning("%s", result.message)
            warnings.append(result.message)
        elif result.action != "ok":
            log.info("static model %s: %s", target, result.action)
        links.append(result)
    if created:
        log.info("created %d model folders under %s", len(created), tree.base_path)
    return dataclasses.replace(
        tree, applied=True, created=tuple(created), links=tuple(links), warnings=tuple(warnings)
    )
