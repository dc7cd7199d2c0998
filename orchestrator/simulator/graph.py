"""Prompt graphs: validation with ComfyUI's error shapes, execution order, cache signatures. Pure."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, TypeGuard

from orchestrator.simulator.nodedefs import ANY, Files, Input, NodeDef

Prompt = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Validation:
    ok: bool
    error: dict[str, Any] | None
    outputs: list[str]
    node_errors: dict[str, Any]


def _error(kind: str, message: str, details: str = "") -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def _reason(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def sort_ids(ids: list[str]) -> list[str]:
    """Node ids in ComfyUI's usual order: numeric ids numerically, others after, by text."""
    return sorted(ids, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))


def node_inputs(node: Any) -> Mapping[str, Any]:
    """A node's ``inputs``; anything but an object counts as no inputs."""
    inputs = node.get("inputs") if isinstance(node, Mapping) else None
    return inputs if isinstance(inputs, Mapping) else {}


def is_link(value: Any) -> TypeGuard[list[Any]]:
    return isinstance(value, list)


def _input_config(spec: Input) -> list[Any] | None:
    """The input's declaration as ComfyUI echoes it in errors: ``[type, options]`` (options when any)."""
    if isinstance(spec.type, Files):
        return None
    kind: Any = list(spec.type) if isinstance(spec.type, tuple) else spec.type
    return [kind, dict(spec.options)] if spec.options else [kind]


def _check_constant(spec: Input, value: Any, input_images: list[str] | None) -> list[dict[str, Any]]:
    extra = {
        "input_name": spec.name,
        "input_config": _input_config(spec),
        "received_value": value,
    }
    kind = spec.type
    if kind in ("INT", "FLOAT"):
        try:
            number: float = int(value) if kind == "INT" else float(value)
        except (TypeError, ValueError, OverflowError) as exc:
            return [
                _reason(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {kind} value",
                    f"{spec.name}, {value}, {exc}",
                    **extra,
                )
            ]
        lo, hi = spec.options.get("min"), spec.options.get("max")
        if lo is not None and number < lo:
            return [
                _reason(
                    "value_smaller_than_min", f"Value {number} smaller than min of {lo}", spec.name, **extra
                )
            ]
        if hi is not None and number > hi:
            return [
                _reason(
                    "value_bigger_than_max", f"Value {number} bigger than max of {hi}", spec.name, **extra
                )
            ]
    elif isinstance(kind, tuple) and value not in kind:
        return [
            _reason(
                "value_not_in_list",
                "Value not in list",
                f"{spec.name}: '{value}' not in {list(kind)}",
                **extra,
            )
        ]
    elif (
        isinstance(kind, Files)
        and kind.folder == "input"
        and input_images is not None
        and value not in input_images
    ):
        return [
            _reason(
                "custom_validation_failed",
                "Custom validation failed for node",
                f"{spec.name} - Invalid image file: {value}",
                **extra,
            )
        ]
    # Model file lists are not checked: tests and the demo run without model files.
    return []


def validate(
    prompt: Any,
    defs: Mapping[str, NodeDef],
    partial: list[str] | None = None,
    input_images: list[str] | None = None,
) -> Validation:
    """ComfyUI's ``validate_prompt``: class check, output check, then per-output input validation.

    Args:
        prompt: the ``prompt`` field of a POST /prompt body.
        defs: known node classes.
        partial: ``partial_execution_targets``, when given.
        input_images: files in the input folder (LoadImage's choices); None skips that check.
    """
    if not isinstance(prompt, Mapping):
        return Validation(
            False,
            _error(
                "invalid_prompt",
                "Cannot execute because the prompt is not an object.",
                f"got {type(prompt).__name__}",
            ),
            [],
            {},
        )
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, Mapping) or "class_type" not in node:
            return Validation(
                False,
                _error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                ),
                [],
                {},
            )
        cls = defs.get(str(node["class_type"]))
        if cls is None:
            return Validation(
                False,
                _error(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                ),
                [],
                {},
            )
        if cls.output_node and (partial is None or node_id in partial):
            outputs.append(str(node_id))
    if not outputs:
        return Validation(False, _error("prompt_no_outputs", "Prompt has no outputs"), [], {})

    validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
    visiting: set[str] = set()

    def check(node_id: str) -> bool:
        if node_id in validated:
            return validated[node_id][0]
        if node_id in visiting:
            validated[node_id] = (False, [_reason("dependency_cycle", "Dependency cycle detected", node_id)])
            return False
        visiting.add(node_id)
        node = prompt[node_id]
        cls = defs[str(node["class_type"])]
        inputs = node_inputs(node)
        reasons: list[dict[str, Any]] = []
        valid = True
        for spec in cls.inputs():
            required = spec in cls.required
            if spec.name not in inputs:
                if required:
                    reasons.append(
                        _reason(
                            "required_input_missing",
                            "Required input is missing",
                            spec.name,
                            input_name=spec.name,
                        )
                    )
                continue
            value = inputs[spec.name]
            if not is_link(value):
                reasons += _check_constant(spec, value, input_images)
                continue
            if len(value) != 2:
                reasons.append(
                    _reason(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        spec.name,
                        input_name=spec.name,
                        received_value=value,
                    )
                )
                continue
            source, slot = str(value[0]), value[1]
            source_node = prompt.get(source)
            source_cls = (
                defs.get(str(source_node.get("class_type"))) if isinstance(source_node, Mapping) else None
            )
            if source_cls is None or not isinstance(slot, int) or not 0 <= slot < len(source_cls.outputs):
                why = (
                    f"node '{source}' does not exist"
                    if source_cls is None
                    else f"output slot {slot} out of range"
                )
                reasons.append(
                    _reason(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        why,
                        input_name=spec.name,
                        linked_node=value,
                    )
                )
                continue
            received = source_cls.outputs[slot]
            expected = spec.type if isinstance(spec.type, str) else "COMBO"
            if ANY not in (received, expected) and received != expected:
                reasons.append(
                    _reason(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        f"{spec.name}, received_type({received}) mismatch input_type({expected})",
                        input_name=spec.name,
                        received_type=received,
                        linked_node=value,
                    )
                )
                continue
            if not check(source):
                valid = False
        visiting.discard(node_id)
        ok = valid and not reasons
        if node_id not in validated:
            validated[node_id] = (ok, reasons)
        return validated[node_id][0]

    good: list[str] = []
    node_errors: dict[str, Any] = {}
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    for out in sort_ids(outputs):
        if check(out):
            good.append(out)
            continue
        failed.append((out, validated[out][1]))
        for node_id, (ok, reasons) in validated.items():
            if ok or not reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {
                    "errors": reasons,
                    "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"],
                },
            )
            entry["dependent_outputs"].append(out)
    if not good:
        details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
        return Validation(
            False,
            _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
            [],
            node_errors,
        )
    return Validation(True, None, good, node_errors)


def execution_order(prompt: Prompt, outputs: list[str]) -> list[str]:
    """Nodes needed by ``outputs``, dependencies first (depth-first from each output, in id order)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen or node_id not in prompt:
            return
        seen.add(node_id)
        inputs = node_inputs(prompt[node_id])
        for value in inputs.values():
            if is_link(value) and len(value) == 2:
                visit(str(value[0]))
        order.append(node_id)

    for out in sort_ids(list(outputs)):
        visit(out)
    return order


def signatures(prompt: Prompt) -> dict[str, str]:
    """A cache key per node: its class and constant inputs plus its inputs' keys, recursively."""
    memo: dict[str, str] = {}

    def sig(node_id: str, stack: frozenset[str]) -> str:
        if node_id in memo:
            return memo[node_id]
        node = prompt.get(node_id)
        if not isinstance(node, Mapping) or node_id in stack:
            return f"missing:{node_id}"
        parts: dict[str, Any] = {}
        for name, value in sorted(node_inputs(node).items()):
            if is_link(value) and len(value) == 2:
                parts[name] = ["link", sig(str(value[0]), stack | {node_id}), value[1]]
            else:
                parts[name] = value
        text = json.dumps([node.get("class_type"), parts], sort_keys=True, default=str)
        memo[node_id] = hashlib.sha256(text.encode()).hexdigest()
        return memo[node_id]

    return {node_id: sig(node_id, frozenset()) for node_id in prompt}
