"""models.yaml (JSON Schema) and the RunPod-style env lists → manifest entries."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import load_settings
from orchestrator.provision.models import manifest
from orchestrator.provision.models.manifest import ModelEntry, parse_manifest

SHA = "a" * 64

ALL_KINDS = f"""
models:
  - url: https://example.com/files/sd15.safetensors?download=true
    dest: checkpoints/SD15
    sha256: {SHA.upper()}
    size: 1234
  - hf: stabilityai/sdxl-vae/sdxl_vae.safetensors
    revision: v1.0
    dest: vae
    when: background
  - civitai: 128713
    dest: loras
    filename: detail.safetensors
    optional: true
  - hf: owner/whole-repo
    dest: diffusers/whole
"""


def test_all_three_source_kinds_parse_with_defaults() -> None:
    url, hf, civ, repo = parse_manifest(ALL_KINDS)
    assert (url.kind, url.dest, url.sha256, url.size, url.when) == (
        "url",
        "checkpoints/SD15",
        SHA,
        1234,
        "before_start",
    )
    assert url.name == "sd15.safetensors"
    assert url.display_source == "https://example.com/files/sd15.safetensors"
    assert (hf.hf_repo, hf.hf_path, hf.revision, hf.when) == (
        "stabilityai/sdxl-vae",
        "sdxl_vae.safetensors",
        "v1.0",
        "background",
    )
    assert not hf.is_hf_repo
    assert repo.is_hf_repo
    assert (civ.kind, civ.source, civ.optional, civ.name) == ("civitai", "128713", True, "detail.safetensors")
    assert civ.category == "loras"
    assert url.category == "checkpoints"
    assert civ.origin == "models.yaml models[2]"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "models:\n  - url: https://x/a\n    dest: vae\n    sha256: abc\n",
            r"models\[0\]\.sha256: expected 64 hex digits",
        ),
        (
            "models:\n  - url: https://x/a\n    civitai: 1\n    dest: vae\n",
            r"models\[0\]: needs exactly one source: url, hf or civitai",
        ),
        ("models:\n  - dest: vae\n", r"models\[0\]: needs exactly one source"),
        ("models:\n  - url: https://x/a\n", r"models\[0\]: missing dest"),
        (
            "models:\n  - url: https://x/a\n    dest: vae\n    colour: red\n",
            r"models\[0\]: unknown key 'colour'",
        ),
        (
            "models:\n  - url: https://x/a\n    dest: vae\n    when: later\n",
            r"models\[0\]\.when: expected before_start or background",
        ),
        ("models:\n  - url: ftp://x/a\n    dest: vae\n", r"models\[0\]\.url: expected an http\(s\):// URL"),
        (
            "models:\n  - civitai: abc\n    dest: vae\n",
            r"models\[0\]\.civitai: expected a CivitAI model version id",
        ),
        ("models:\n  - hf: justone\n    dest: vae\n", r"models\[0\]\.hf: expected owner/repo"),
        (
            "models:\n  - url: https://x/a\n    dest: ../../etc\n",
            r"models\[0\]\.dest: '\.\.' and '\.' are not allowed",
        ),
        ("models:\n  - url: https://x/a\n    dest: /abs\n", r"models\[0\]\.dest: expected a relative folder"),
        (
            "models:\n  - url: https://x/a\n    dest: vae\n    filename: ../../evil.sh\n",
            r"models\[0\]\.filename: expected a plain file name",
        ),
        (
            "models:\n  - url: https://x/a\n    dest: vae\n    revision: main\n",
            r"only hf sources have a revision",
        ),
        ("models:\n  - hf: a/b\n    dest: vae\n    filename: x\n", r"a whole repo .* has no filename"),
        ("models: {}\n", r"^invalid models.yaml: models:"),
        ("entries: []\n", r"unknown key 'entries'"),
        ("models: [\n", r"invalid models.yaml line \d+: not valid YAML"),
    ],
)
def test_invalid_manifests_are_rejected_with_the_entry_and_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_manifest(text)


def test_the_schema_is_a_valid_json_schema_and_the_shipped_manifest_passes() -> None:
    jsonschema.Draft202012Validator.check_schema(manifest.MANIFEST_SCHEMA)
    shipped = Path(__file__).resolve().parents[1] / "shared" / "models.yaml"
    if shipped.exists():
        jsonschema.validate(yaml.safe_load(shipped.read_text()), manifest.MANIFEST_SCHEMA)
        assert parse_manifest(shipped.read_text()) == ()
    assert parse_manifest("") == ()


def test_env_lists_map_to_their_categories() -> None:
    settings = load_settings(
        {
            "CIVITAI_MODELS": "1,2",
            "CIVITAI_LORAS": "3",
            "CIVITAI_VAES": "4",
            "CIVITAI_FLUX": "5",
            "HUGGINGFACE_MODELS": "a/b/c/file.safetensors, owner/repo, x/y/z.bin:loras/style",
        }
    )
    entries = manifest.entries_from_env(settings)
    assert [(e.kind, e.source, e.dest, e.origin) for e in entries] == [
        ("civitai", "1", "checkpoints", "CIVITAI_MODELS"),
        ("civitai", "2", "checkpoints", "CIVITAI_MODELS"),
        ("civitai", "3", "loras", "CIVITAI_LORAS"),
        ("civitai", "4", "vae", "CIVITAI_VAES"),
        ("civitai", "5", "diffusion_models", "CIVITAI_FLUX"),
        ("hf", "a/b/c/file.safetensors", "checkpoints", "HUGGINGFACE_MODELS"),
        ("hf", "owner/repo", "diffusers/repo", "HUGGINGFACE_MODELS"),
        ("hf", "x/y/z.bin", "loras/style", "HUGGINGFACE_MODELS"),
    ]
    assert all(e.when == "before_start" for e in entries)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CIVITAI_LORAS": "12,abc"}, "invalid CIVITAI_LORAS: 'abc' is not a CivitAI model version id"),
        ({"HUGGINGFACE_MODELS": "noslash"}, "invalid HUGGINGFACE_MODELS: 'noslash'"),
        ({"HUGGINGFACE_MODELS": "a/b/../../x"}, "invalid HUGGINGFACE_MODELS"),
        (
            {"HUGGINGFACE_MODELS": "a/b/c.bin:../up"},
            "invalid HUGGINGFACE_MODELS: 'a/b/c.bin:../up': destination",
        ),
    ],
)
def test_bad_env_list_items_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        manifest.entries_from_env(load_settings(env))


def test_a_missing_default_manifest_means_no_entries_but_a_missing_explicit_one_is_an_error(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    assert manifest.load_manifest(load_settings({"ROOT": str(tmp_path)}), layout) == ()
    explicit = load_settings({"ROOT": str(tmp_path), "MODELS_MANIFEST": str(tmp_path / "nope.yaml")})
    with pytest.raises(ConfigError, match=r"invalid MODELS_MANIFEST=.*nope.yaml.*no such file"):
        manifest.load_manifest(explicit, layout)


def test_manifest_and_env_entries_are_combined_without_duplicates(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.shared_dir.mkdir()
    (layout.shared_dir / "models.yaml").write_text("models:\n  - civitai: 3\n    dest: loras\n")
    settings = load_settings({"ROOT": str(tmp_path), "CIVITAI_LORAS": "3,4"})
    entries = manifest.load_entries(settings, layout)
    assert [(e.source, e.origin) for e in entries] == [("3", "models.yaml models[0]"), ("4", "CIVITAI_LORAS")]


def test_urls_are_shown_without_credentials_or_query() -> None:
    assert manifest.safe_url("https://user:pw@host:8443/a/b.bin?token=x#f") == "https://host:8443/a/b.bin"
    entry = ModelEntry(kind="url", source="https://h/x?token=secret", dest="vae", origin="t")
    assert "secret" not in str(entry.to_dict())


def test_file_names_with_traversal_or_separators_are_rejected() -> None:
    for bad in ("..", ".", "", "a/b", "a\\b", "x\x00y", "x\ny", "a" * 256):
        assert manifest.check_filename(bad) is not None, bad
    for good in ("model.safetensors", "my lora (v2).safetensors", ".gitattributes", "\u2713.bin"):
        assert manifest.check_filename(good) is None, good
