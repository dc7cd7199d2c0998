"""The model tree from comfy_dir_config.yaml (the production file) and static-models.json links."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings, load_settings
from orchestrator.provision.models import tree as modeltree

FIXTURES = Path("/work/shared/fixtures/emprops_shared")
PRODUCTION_CONFIG = (
    FIXTURES / "comfy_dir_config.yaml"
    if (FIXTURES / "comfy_dir_config.yaml").exists()
    else Path(__file__).resolve().parents[1] / "shared" / "comfy_dir_config.yaml"
)


def setup(root: Path, config: str | None = None, static: object | None = None) -> tuple[Settings, Layout]:
    layout = Layout(root)
    layout.shared_dir.mkdir(parents=True, exist_ok=True)
    text = PRODUCTION_CONFIG.read_text() if config is None else config
    (layout.shared_dir / "comfy_dir_config.yaml").write_text(text)
    if static is not None:
        layout.static_models.write_text(json.dumps(static))
    return load_settings({"ROOT": str(root)}), layout


def comfyui_paths(yaml_file: Path) -> dict[str, list[str]]:
    """What ComfyUI's load_extra_path_config would register from the written file."""
    config = yaml.safe_load(yaml_file.read_text())
    out: dict[str, list[str]] = {}
    for conf in config.values():
        base = os.path.expandvars(os.path.expanduser(conf.pop("base_path")))
        conf.pop("is_default", None)
        for category, value in conf.items():
            for line in value.split("\n"):
                if line.strip():
                    out.setdefault(category, []).append(os.path.normpath(os.path.join(base, line)))
    return out


def test_the_production_file_is_rebased_under_root_and_every_folder_is_created(root: Path) -> None:
    settings, layout = setup(root)
    tree = modeltree.prepare(settings, layout)
    assert tree.base_path == root / "ComfyUI"
    assert modeltree.category_dir(tree, "checkpoints") == root / "ComfyUI" / "models" / "checkpoints"
    expected = set(yaml.safe_load(PRODUCTION_CONFIG.read_text())["comfyui"]) - {"base_path", "is_default"}
    assert set(tree.categories) == expected
    assert len(expected) == 26
    for folders in tree.categories.values():
        assert all(f.is_dir() for f in folders)
    registered = comfyui_paths(layout.extra_model_paths)
    assert registered["loras"] == [str(root / "ComfyUI" / "models" / "loras")]
    assert all(p.startswith(str(root)) for paths in registered.values() for p in paths)
    assert "/workspace" not in layout.extra_model_paths.read_text().replace(str(root), "")


def test_prepare_is_idempotent_and_creates_nothing_the_second_time(root: Path) -> None:
    settings, layout = setup(root)
    first = modeltree.prepare(settings, layout)
    second = modeltree.prepare(settings, layout)
    assert len(first.created) == 26
    assert second.created == ()
    assert second.rebased_yaml == first.rebased_yaml


def test_nested_and_multi_line_folders_all_exist(root: Path) -> None:
    config = (
        "comfyui:\n"
        "  base_path: /workspace/ComfyUI\n"
        "  checkpoints: |\n"
        "    models/checkpoints/\n"
        "    models/checkpoints/SD15/LCM/v2/\n"
        "  loras: models/loras/style/anime/\n"
    )
    settings, layout = setup(root, config)
    tree = modeltree.prepare(settings, layout)
    base = root / "ComfyUI" / "models"
    assert tree.categories["checkpoints"] == (
        base / "checkpoints",
        base / "checkpoints" / "SD15" / "LCM" / "v2",
    )
    assert (base / "checkpoints" / "SD15" / "LCM" / "v2").is_dir()
    assert (base / "loras" / "style" / "anime").is_dir()
    assert comfyui_paths(layout.extra_model_paths)["checkpoints"] == [
        str(p) for p in tree.categories["checkpoints"]
    ]
    assert modeltree.resolve_dest(tree, "checkpoints/SD15") == base / "checkpoints" / "SD15"


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("comfyui:\n  checkpoints: models/checkpoints/\n", "base_path"),
        ("comfyui:\n  base_path: /workspace/x\n  checkpoints: 42\n", "checkpoints"),
        ("comfyui:\n  base_path: /workspace/x\n  loras: /abs/loras\n", "loras"),
        ("comfyui:\n  base_path: /workspace/x\n  vae: ../../etc\n", "vae"),
        ("comfyui:\n  base_path: /workspace/x\n  vae: ''\n", "vae"),
        ("comfyui:\n  base_path: /workspace/x\n  is_default: maybe\n", "is_default"),
        ("comfyui:\n  base_path: [1]\n", "base_path"),
        ("comfyui: models/\n", "comfyui"),
    ],
)
def test_validation_errors_name_the_key_and_nothing_is_written(root: Path, config: str, key: str) -> None:
    settings, layout = setup(root, config)
    with pytest.raises(ConfigError, match=rf"^invalid comfy_dir_config.yaml: key '{key}': "):
        modeltree.prepare(settings, layout)
    assert not layout.extra_model_paths.exists()
    assert sorted(p.name for p in root.iterdir()) == ["shared"]


def test_unparsable_yaml_and_a_missing_file_are_clear_errors(root: Path) -> None:
    settings, layout = setup(root, "comfyui:\n  base_path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid comfy_dir_config.yaml line \d+: not valid YAML"):
        modeltree.prepare(settings, layout)
    (layout.shared_dir / "comfy_dir_config.yaml").unlink()
    with pytest.raises(ConfigError, match="missing .*comfy_dir_config.yaml.*SHARED_REPO_URL"):
        modeltree.prepare(settings, layout)


def test_base_paths_are_rebased_by_the_documented_rule(tmp_path: Path) -> None:
    root = tmp_path / "r"
    assert modeltree.rebase("/workspace/ComfyUI", root) == root / "ComfyUI"
    assert modeltree.rebase("/workspace", root) == root
    assert modeltree.rebase("ComfyUI", root) == root / "ComfyUI"
    assert modeltree.rebase("ComfyUI/../models", root) == root / "models"
    # Never outside ROOT: other absolute paths, look-alike prefixes and climbs out are refused.
    for outside in ("/opt/models", "/workspacefoo/x", "../x", "/workspace/../etc"):
        with pytest.raises(ValueError, match="outside ROOT"):
            modeltree.rebase(outside, root)
    assert modeltree.rebase("/workspace/ComfyUI", Path("/workspace")) == Path("/workspace/ComfyUI")


def test_several_sections_put_the_default_first(root: Path) -> None:
    config = (
        "a111:\n  base_path: /workspace/a111\n  checkpoints: models/Stable-diffusion\n"
        "comfyui:\n  base_path: /workspace/ComfyUI\n  is_default: true\n  checkpoints: models/checkpoints/\n"
    )
    settings, layout = setup(root, config)
    tree = modeltree.prepare(settings, layout)
    assert tree.categories["checkpoints"] == (
        root / "ComfyUI" / "models" / "checkpoints",
        root / "a111" / "models" / "Stable-diffusion",
    )
    with pytest.raises(ConfigError, match="key 'comfyui.vae'"):
        modeltree.parse_config(config + "  vae: 3\n", root)
    bad = config.replace("checkpoints: models/Stable-diffusion", "checkpoints: /abs")
    with pytest.raises(ConfigError, match="key 'a111.checkpoints'"):
        modeltree.parse_config(bad, root)


def test_an_unknown_category_lists_the_known_ones(root: Path) -> None:
    settings, layout = setup(root)
    tree = modeltree.load_tree(settings, layout)
    with pytest.raises(ConfigError, match="unknown model category 'lora'.*loras"):
        modeltree.category_dir(tree, "lora")


# ---------------------------------------------------------------- static-models.json
def production_static() -> dict[str, object]:
    path = FIXTURES / "static-models.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    return {
        "symlinks": [
            {
                "source": "Stable-diffusion/v1-5-pruned.safetensors",
                "target": "checkpoints/v1-5-pruned.safetensors",
            }
        ]
    }


def test_static_links_are_created_idempotently_and_missing_sources_warn(root: Path) -> None:
    static = production_static()
    settings, layout = setup(root, static=static)
    links = static["symlinks"]
    assert isinstance(links, list)
    present = links[0]["source"]
    src = layout.shared_dir / "sd_models" / present
    src.parent.mkdir(parents=True)
    src.write_bytes(b"weights")
    tree = modeltree.prepare(settings, layout)
    target = root / "ComfyUI" / "models" / links[0]["target"]
    assert target.is_symlink()
    assert target.read_bytes() == b"weights"
    assert [lnk.action for lnk in tree.links] == ["created"] + ["missing_source"] * (len(links) - 1)
    assert len(tree.warnings) == len(links) - 1
    assert all("missing" in w for w in tree.warnings)
    inode = target.lstat().st_ino
    again = modeltree.prepare(settings, layout)
    assert again.links[0].action == "ok"
    assert target.lstat().st_ino == inode  # untouched


def test_a_wrong_link_is_replaced_and_a_regular_file_is_never_overwritten(root: Path) -> None:
    static = {
        "symlinks": [
            {"source": "a.safetensors", "target": "checkpoints/a.safetensors"},
            {"source": "b.safetensors", "target": "checkpoints/b.safetensors"},
        ]
    }
    settings, layout = setup(root, static=static)
    sd = layout.shared_dir / "sd_models"
    sd.mkdir()
    (sd / "a.safetensors").write_bytes(b"A")
    (sd / "b.safetensors").write_bytes(b"B")
    ckpt = root / "ComfyUI" / "models" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "a.safetensors").symlink_to(root / "elsewhere")
    (ckpt / "b.safetensors").write_bytes(b"user's own file")
    tree = modeltree.prepare(settings, layout)
    assert [lnk.action for lnk in tree.links] == ["replaced", "kept_file"]
    assert os.readlink(ckpt / "a.safetensors") == str(sd / "a.safetensors")
    assert (ckpt / "b.safetensors").read_bytes() == b"user's own file"
    assert any("regular file" in w for w in tree.warnings)


def test_an_invalid_static_models_file_stops_before_anything_is_written(root: Path) -> None:
    settings, layout = setup(
        root, static={"symlinks": [{"source": "../../etc/passwd", "target": "checkpoints/x"}]}
    )
    with pytest.raises(ConfigError, match=r"invalid static-models.json: symlinks\[0\].source"):
        modeltree.prepare(settings, layout)
    assert not layout.extra_model_paths.exists()
    layout.static_models.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid static-models.json: not valid JSON"):
        modeltree.prepare(settings, layout)


def test_the_shipped_defaults_match_the_production_inputs() -> None:
    shipped = Path(__file__).resolve().parents[1] / "shared"
    if not (shipped / "comfy_dir_config.yaml").exists() or not FIXTURES.exists():
        pytest.skip("no shipped defaults or fixtures here")
    base, cats, _ = modeltree.parse_config((shipped / "comfy_dir_config.yaml").read_text(), Path("/r"))
    assert base == Path("/r/ComfyUI")
    assert "checkpoints" in cats
    assert modeltree.parse_static((shipped / "static-models.json").read_text())
