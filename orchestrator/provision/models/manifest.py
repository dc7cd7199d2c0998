"""The model manifest: ``models.yaml`` and the RunPod-style env lists → :class:`ModelEntry` values.

``models.yaml`` (from the shared repo, or ``MODELS_MANIFEST``) holds a top-level ``models:`` list::

    models:
      - url: https://example.com/x.safetensors   # or
        hf: owner/repo/path/in/repo               # (revision: main), or hf: owner/repo = whole repo
        civitai: 128713                           # a model *version* id
        dest: checkpoints/SD15                    # a category of the model tree, subfolders allowed
        filename: x.safetensors                   # optional (default: from the URL or the server)
        sha256: <64 hex>                          # optional, checked while streaming
        size: 2132625894                          # optional, in bytes
        optional: false                           # a failed optional model does not fail the sync
        when: before_start                        # or background (default before_start)

Env lists: ``CIVITAI_MODELS`` / ``CIVITAI_LORAS`` / ``CIVITAI_VAES`` / ``CIVITAI_FLUX`` hold version
ids (→ checkpoints, loras, vae, diffusion_models); ``HUGGINGFACE_MODELS`` holds
``owner/repo/path/file`` (→ checkpoints) or ``owner/repo`` (a whole repo → diffusers/<repo>), each
optionally followed by ``:dest`` (``owner/repo/x.safetensors:loras``). Env entries are before_start.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jsonschema

from orchestrator.core.configfile import clip, load_yaml, read_config
from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings

TIERS = ("before_start", "background")
KINDS = ("url", "hf", "civitai")

_HF = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(/[^/\s][^\s]*)?$"

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "models.yaml: models to place in the shared model tree",
    "type": "object",
    "properties": {
        "models": {"type": "array", "items": {"$ref": "#/$defs/entry"}},
    },
    "required": ["models"],
    "additionalProperties": False,
    "$defs": {
        "entry": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "url": {"type": "string", "pattern": r"^https?://[^\s/]+"},
                "hf": {"type": "string", "pattern": _HF},
                "revision": {"type": "string", "pattern": r"^[^\s/][^\s]*$"},
                "civitai": {
                    "oneOf": [
                        {"type": "integer", "minimum": 1},
                        {"type": "string", "pattern": r"^[0-9]+$"},
                    ]
                },
                "dest": {"type": "string", "minLength": 1},
                "filename": {"type": "string", "minLength": 1, "maxLength": 255},
                "sha256": {"type": "string", "pattern": r"^[0-9a-fA-F]{64}$"},
                "size": {"type": "integer", "minimum": 0},
                "optional": {"type": "boolean"},
                "when": {"enum": list(TIERS)},
            },
            "required": ["dest"],
            "additionalProperties": False,
            "oneOf": [{"required": [k]} for k in KINDS],
        }
    },
}

_HINTS = {
    "url": "expected an http(s):// URL",
    "hf": "expected owner/repo (a whole repo) or owner/repo/path/in/repo",
    "revision": "expected a branch, tag or commit",
    "civitai": "expected a CivitAI model version id (digits)",
    "dest": "expected a category of the model tree such as checkpoints or loras/style",
    "filename": "expected a file name (no folders)",
    "sha256": "expected 64 hex digits",
    "size": "expected a size in bytes",
    "optional": "expected true or false",
    "when": "expected before_start or background",
    "name": "expected a non-empty string",
}

ENV_CIVITAI = {
    "CIVITAI_MODELS": "checkpoints",
    "CIVITAI_LORAS": "loras",
    "CIVITAI_VAES": "vae",
    "CIVITAI_FLUX": "diffusion_models",
}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One manifest line. ``source``: the URL, ``owner/repo[/path]`` or the CivitAI version id."""

    kind: str  # url | hf | civitai
    source: str
    dest: str  # category[/sub/folders]
    origin: str  # "models.yaml models[3]" or "CIVITAI_LORAS"
    filename: str | None = None
    sha256: str | None = None
    size: int | None = None
    optional: bool = False
    when: str = "before_start"
    revision: str | None = None
    label: str | None = None

    @property
    def category(self) -> str:
        return PurePosixPath(self.dest).parts[0]

    @property
    def is_hf_repo(self) -> bool:
        return self.kind == "hf" and self.source.count("/") == 1

    @property
    def hf_repo(self) -> str:
        return "/".join(self.source.split("/")[:2])

    @property
    def hf_path(self) -> str:
        return "/".join(self.source.split("/")[2:])

    @property
    def display_source(self) -> str:
        """The source without credentials or query string (safe to log)."""
        if self.kind == "url":
            return safe_url(self.source)
        if self.kind == "hf":
            return f"hf:{self.source}" + (f"@{self.revision}" if self.revision else "")
        return f"civitai:{self.source}"

    @property
    def name(self) -> str:
        """What errors and status call this model."""
        if self.label:
            return self.label
        if self.filename:
            return self.filename
        if self.kind == "url":
            tail = PurePosixPath(urlsplit(self.source).path).name
            return tail or safe_url(self.source)
        if self.kind == "hf":
            return self.source if self.is_hf_repo else PurePosixPath(self.source).name
        return f"civitai:{self.source}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.display_source,
            "dest": self.dest,
            "filename": self.filename,
            "sha256": self.sha256,
            "size": self.size,
            "optional": self.optional,
            "when": self.when,
            "origin": self.origin,
        }


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment: the form that may appear in logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_relative(value: str) -> str | None:
    """None when ``value`` is a safe relative folder path, else the reason."""
    if not value.strip() or value.startswith(("/", "~")) or "\\" in value or "\0" in value:
        return "expected a relative folder such as checkpoints/SD15"
    if any(part in ("..", ".") for part in value.split("/")):
        return "'..' and '.' are not allowed"
    return None


def check_filename(value: str) -> str | None:
    """None when ``value`` is a plain file name, else the reason (no traversal, no folders)."""
    if value in ("", ".", "..") or "/" in value or "\\" in value:
        return "expected a plain file name without folders or '..'"
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        return "control characters are not allowed"
    if len(value.encode()) > 255:
        return "longer than 255 bytes"
    return None


def _schema_message(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    where = path or "top level"
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        return f"{where}: needs exactly one source: url, hf or civitai"
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"{where}: unknown key {extra[0]!r}" if extra else f"{where}: {error.message}"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else "a key"
        hint = f" ({_HINTS[missing]})" if missing in _HINTS else ""
        return f"{where}: missing {missing}{hint}"
    field = next((str(p) for p in reversed(error.absolute_path) if isinstance(p, str)), "")
    hint = _HINTS.get(field, error.message)
    return f"{where}: {hint} (got {clip(error.instance)})"


def parse_manifest(text: str, *, name: str = "models.yaml") -> tuple[ModelEntry, ...]:
    """Validate a manifest's text against :data:`MANIFEST_SCHEMA` and build the entries.

    Raises:
        ConfigError: ``invalid models.yaml: models[2].sha256: expected 64 hex digits …``.
    """
    data = load_yaml(text, name=name)
    if data is None:
        return ()
    validator = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        best = jsonschema.exceptions.best_match(errors) or errors[0]
        # best_match descends into oneOf branches; the entry-level message is clearer.
        for err in errors:
            if err.validator == "oneOf" and isinstance(err.instance, dict):
                best = err
                break
        raise ConfigError(f"invalid {name}: {_schema_message(best)}")
    entries = []
    for i, item in enumerate(data["models"]):
        where = f"models[{i}]"
        kind = next(k for k in KINDS if k in item)
        dest = str(item["dest"]).strip().rstrip("/")
        why = check_relative(dest)
        if why:
            raise ConfigError(f"invalid {name}: {where}.dest: {why} (got {item['dest']!r})")
        filename = item.get("filename")
        if filename is not None:
            why = check_filename(filename)
            if why:
                raise ConfigError(f"invalid {name}: {where}.filename: {why} (got {filename!r})")
        if "revision" in item and kind != "hf":
            raise ConfigError(f"invalid {name}: {where}.revision: only hf sources have a revision")
        source = str(item[kind]).strip()
        if kind == "hf":
            if ".." in source.split("/"):
                raise ConfigError(f"invalid {name}: {where}.hf: '..' is not allowed (got {source!r})")
            if source.count("/") == 1 and filename:
                raise ConfigError(
                    f"invalid {name}: {where}.filename: a whole repo (hf: owner/repo) has no filename"
                )
        entries.append(
            ModelEntry(
                kind=kind,
                source=source,
                dest=dest,
                origin=f"{name} {where}",
                filename=filename,
                sha256=item["sha256"].lower() if "sha256" in item else None,
                size=item.get("size"),
                optional=bool(item.get("optional", False)),
                when=item.get("when", "before_start"),
                revision=item.get("revision"),
                label=item.get("name"),
            )
        )
    return tuple(entries)


def manifest_path(settings: Settings, layout: Layout) -> Path:
    return settings.models_manifest or layout.shared_dir / "models.yaml"


def load_manifest(settings: Settings, layout: Layout) -> tuple[ModelEntry, ...]:
    """The manifest's entries; the default file may be missing (no entries), MODELS_MANIFEST may not.

    Raises:
        ConfigError: the file is invalid, or MODELS_MANIFEST names a file that does not exist.
    """
    path = manifest_path(settings, layout)
    try:
        text = read_config(path, what=f"model manifest {path}")
    except FileNotFoundError:
        if settings.models_manifest is not None:
            raise ConfigError(f"invalid MODELS_MANIFEST={str(path)!r}: no such file") from None
        return ()
    return parse_manifest(text, name=str(path) if settings.models_manifest else path.name)


def entries_from_env(settings: Settings) -> tuple[ModelEntry, ...]:
    """Entries from CIVITAI_MODELS/LORAS/VAES/FLUX and HUGGINGFACE_MODELS.

    Raises:
        ConfigError: an item is malformed; the message names the variable.
    """
    entries: list[ModelEntry] = []
    for var, dest in ENV_CIVITAI.items():
        for item in getattr(settings, var.lower()):
            if not re.fullmatch(r"[0-9]+", item):
                raise ConfigError(
                    f"invalid {var}: {item!r} is not a CivitAI model version id (digits, e.g. 128713)"
                )
            entries.append(ModelEntry(kind="civitai", source=item, dest=dest, origin=var))
    for item in settings.huggingface_models:
        spec, sep, dest = item.partition(":")
        spec = spec.strip().strip("/")
        if not re.fullmatch(_HF, spec) or ".." in spec.split("/"):
            raise ConfigError(
                f"invalid HUGGINGFACE_MODELS: {item!r}: expected owner/repo or owner/repo/path/file, "
                "optionally followed by :category"
            )
        default = f"diffusers/{spec.split('/')[1]}" if spec.count("/") == 1 else "checkpoints"
        dest = dest.strip().rstrip("/") if sep else default
        why = check_relative(dest)
        if why:
            raise ConfigError(f"invalid HUGGINGFACE_MODELS: {item!r}: destination {why}")
        entries.append(ModelEntry(kind="hf", source=spec, dest=dest, origin="HUGGINGFACE_MODELS"))
    return tuple(entries)


def load_entries(settings: Settings, layout: Layout) -> tuple[ModelEntry, ...]:
    """Manifest entries then env entries, duplicates (same source, destination, file name) dropped."""
    seen: set[tuple[str, str, str, str, str | None]] = set()
    out = []
    for entry in (*load_manifest(settings, layout), *entries_from_env(settings)):
        key = (entry.kind, entry.source, entry.revision or "", entry.dest, entry.filename)
        if key in seen:
            continue
        seen.add(key)
        out.append(entry)
    return tuple(out)
