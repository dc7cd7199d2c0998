"""API-format workflow validation, overrides and the serverless seed's shorthand."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from support import seed_below_min_node_errors

from orchestrator.core.workflow import (
    Override,
    Shorthand,
    WorkflowError,
    apply_override,
    first_node_error,
    format_node_errors,
    parse_overrides,
    prepare_workflow,
    shorthand_overrides,
    validate_workflow,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "workflow.json"


@pytest.fixture
def wf() -> dict[str, Any]:
    return json.loads(EXAMPLE.read_text())["workflow"]


def flux() -> dict[str, Any]:
    """The shape of the serverless seed's Flux graph (its default node ids 6, 25, 27)."""
    return {
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["11", 0]}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "a", "clip_name2": "b"}},
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["27", 0]}},
    }


def test_the_shipped_example_is_a_valid_api_workflow(wf: dict[str, Any]) -> None:
    assert validate_workflow(wf) is wf
    assert {n["class_type"] for n in wf.values()} >= {"KSampler", "SaveImage", "CLIPTextEncode"}


@pytest.mark.parametrize(
    ("workflow", "needle"),
    [
        ([], "expected an object"),
        ({}, "is empty"),
        ({"nodes": [], "links": []}, "UI format"),
        ({"3": "KSampler"}, "node 3: expected an object"),
        ({"3": {"inputs": {}}}, "node 3: class_type is missing"),
        ({"3": {"class_type": "KSampler", "inputs": []}}, r"node 3 \(KSampler\): inputs must be an object"),
        ({"3": {"class_type": "KSampler", "inputs": {"model": ["4", 0]}}}, "input 'model' links to node 4"),
    ],
)
def test_invalid_workflows_are_refused_naming_the_node_and_field(workflow: Any, needle: str) -> None:
    with pytest.raises(WorkflowError, match=needle):
        validate_workflow(workflow)


def test_a_dangling_link_error_carries_the_node_and_field() -> None:
    with pytest.raises(WorkflowError) as info:
        validate_workflow({"3": {"class_type": "KSampler", "inputs": {"model": ["4", 0]}}})
    assert (info.value.node_id, info.value.field) == ("3", "inputs.model")


def test_an_override_sets_the_dotted_path_on_a_copy_and_leaves_the_input_alone(wf: dict[str, Any]) -> None:
    before = copy.deepcopy(wf)
    out = prepare_workflow(wf, [Override("6", "inputs.text", "a red fox")])
    assert out["6"]["inputs"]["text"] == "a red fox"
    assert wf == before


def test_an_override_on_a_missing_node_is_an_error_listing_the_nodes(wf: dict[str, Any]) -> None:
    with pytest.raises(WorkflowError, match=r"node 42 is not in the workflow \(nodes: 3, 4, 5") as info:
        prepare_workflow(wf, [Override("42", "inputs.text", "x")])
    assert info.value.node_id == "42"
    assert info.value.field == "inputs.text"


def test_an_override_through_a_missing_object_is_an_error(wf: dict[str, Any]) -> None:
    with pytest.raises(WorkflowError, match="node 6 \\(CLIPTextEncode\\): has no object at 'widgets'"):
        apply_override(wf, Override("6", "widgets.text", "x"))


def test_an_override_may_add_an_input_the_export_left_out(wf: dict[str, Any]) -> None:
    out = prepare_workflow(wf, [Override("3", "inputs.extra", 3)])
    assert out["3"]["inputs"]["extra"] == 3


def test_an_override_that_creates_a_dangling_link_is_caught(wf: dict[str, Any]) -> None:
    with pytest.raises(WorkflowError, match="links to node 99"):
        prepare_workflow(wf, [Override("8", "inputs.vae", ["99", 0])])


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("x", "expected a list"),
        ([1], r"overrides\[0\]: expected an object"),
        ([{"field": "inputs.text", "value": 1}], "node_id is missing"),
        ([{"node_id": "6", "value": 1}], "field is missing"),
        ([{"node_id": "6", "field": "inputs.text"}], "value is missing"),
    ],
)
def test_malformed_overrides_are_refused(raw: Any, needle: str) -> None:
    with pytest.raises(WorkflowError, match=needle):
        parse_overrides(raw)


def test_override_node_ids_may_be_numbers() -> None:
    assert parse_overrides([{"node_id": 6, "field": "inputs.text", "value": None}]) == [
        Override("6", "inputs.text", None)
    ]


def test_the_shorthand_uses_the_seeds_default_node_ids_when_they_exist() -> None:
    out = prepare_workflow(flux(), shorthand=Shorthand(prompt="sunset", seed=7, width=768, height=512))
    assert out["6"]["inputs"]["text"] == "sunset"
    assert out["25"]["inputs"]["noise_seed"] == 7
    assert (out["27"]["inputs"]["width"], out["27"]["inputs"]["height"]) == (768, 512)


def test_the_shorthand_finds_the_only_node_that_can_take_a_value(wf: dict[str, Any]) -> None:
    # The txt2img example has no node 25 or 27: the seed goes to the KSampler, the size to the latent.
    out = prepare_workflow(wf, shorthand=Shorthand(seed=5, width=640))
    assert out["3"]["inputs"]["seed"] == 5
    assert out["5"]["inputs"]["width"] == 640
    assert out["5"]["inputs"]["height"] == 512


def test_the_shorthand_prompt_defaults_to_node_6(wf: dict[str, Any]) -> None:
    out = prepare_workflow(wf, shorthand=Shorthand(prompt="a boat"))
    assert out["6"]["inputs"]["text"] == "a boat"
    assert out["7"]["inputs"]["text"] == "blurry, low quality, watermark"


def test_an_explicit_shorthand_node_id_must_exist(wf: dict[str, Any]) -> None:
    with pytest.raises(WorkflowError, match="seed_node_id: node 25 is not in the workflow"):
        prepare_workflow(wf, shorthand=Shorthand(seed=1, seed_node_id="25"))


def test_an_explicit_shorthand_node_without_the_input_is_named() -> None:
    with pytest.raises(WorkflowError, match=r"node 9 \(SaveImage\) has no input seed or noise_seed") as info:
        prepare_workflow(flux(), shorthand=Shorthand(seed=1, seed_node_id="9"))
    assert info.value.node_id == "9"


def test_an_ambiguous_shorthand_asks_for_the_node_id() -> None:
    wf = flux()
    del wf["6"]
    wf["7"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a"}}
    wf["8"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "b"}}
    with pytest.raises(WorkflowError, match=r"several nodes could take it \(7, 8\); set prompt_node_id"):
        prepare_workflow(wf, shorthand=Shorthand(prompt="x"))


def test_a_flux_text_node_gets_the_prompt_in_both_encoders() -> None:
    wf = {"6": {"class_type": "CLIPTextEncodeFlux", "inputs": {"t5xxl": "", "clip_l": "", "guidance": 3.5}}}
    out = shorthand_overrides(wf, Shorthand(prompt="p"))
    assert out == [Override("6", "inputs.t5xxl", "p"), Override("6", "inputs.clip_l", "p")]


def test_explicit_overrides_win_over_the_shorthand(wf: dict[str, Any]) -> None:
    out = prepare_workflow(wf, [Override("6", "inputs.text", "explicit")], Shorthand(prompt="short"))
    assert out["6"]["inputs"]["text"] == "explicit"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"seed": "1"}, "seed: expected an integer"),
        ({"seed": True}, "seed: expected an integer"),
        ({"prompt": 3}, "prompt: expected a string"),
        ({"size_node_id": [1]}, "size_node_id: expected a node id"),
    ],
)
def test_shorthand_types_are_checked(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(WorkflowError, match=needle):
        Shorthand.from_mapping(data)


def test_shorthand_ranges_are_checked(wf: dict[str, Any]) -> None:
    with pytest.raises(WorkflowError, match="width: 8 is out of range"):
        prepare_workflow(wf, shorthand=Shorthand(width=8))
    with pytest.raises(WorkflowError, match="seed: -1 is out of range"):
        prepare_workflow(wf, shorthand=Shorthand(seed=-1))


def test_comfyui_node_errors_become_one_line_naming_node_and_input() -> None:
    node_errors = seed_below_min_node_errors()
    line = format_node_errors(node_errors)
    assert line == "node 3 (KSampler) input 'seed': Value -1 smaller than min of 0 (seed)"
    assert first_node_error(node_errors) == ("3", "inputs.seed")
    assert first_node_error({}) == (None, None)
