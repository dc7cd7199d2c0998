"""ComfyUI API-format workflows: validation and overrides. Pure: no I/O.

A workflow in API format ("Save (API Format)") maps node ids to nodes::

    {"6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}}}

An input is a literal or a link ``[source_node_id, output_index]``. Overrides set one value by
a dotted path (``{"node_id": "6", "field": "inputs.text", "value": "a dog"}``, the format of
the fleet's RunPod worker); the serverless seed's shorthand (``prompt``/``prompt_node_id``,
``seed``/``seed_node_id``, ``width``/``height``/``size_node_id``) becomes such overrides.

Every error is a :class:`WorkflowError` whose message names the node and the field.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from orchestrator.core.errors import JobError

Workflow = dict[str, dict[str, Any]]

# The serverless seed's defaults (a Flux graph); used only when the node exists.
DEFAULT_PROMPT_NODE = "6"
DEFAULT_SEED_NODE = "25"
DEFAULT_SIZE_NODE = "27"

# Input names that hold a seed (KSampler: seed; KSamplerAdvanced/RandomNoise: noise_seed).
SEED_FIELDS = ("seed", "noise_seed")
# Input names that hold the prompt text (CLIPTextEncode: text; CLIPTextEncodeFlux: t5xxl + clip_l).
PROMPT_FIELDS = ("text",)
FLUX_PROMPT_FIELDS = ("t5xxl", "clip_l")
MAX_SIDE = 16384


class WorkflowError(JobError):
    """The workflow or an override is invalid; ``node_id`` and ``field`` say where."""

    exit_code = 2

    def __init__(self, message: str, *, node_id: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.field = field


@dataclasses.dataclass(frozen=True)
class Override:
    """Set ``workflow[node_id]`` at the dotted ``field`` path (e.g. ``inputs.text``) to ``value``."""

    node_id: str
    field: str
    value: Any


@dataclasses.dataclass(frozen=True)
class Shorthand:
    """The serverless seed's shorthand fields; ``None`` means not given."""

    prompt: str | None = None
    prompt_node_id: str | None = None
    seed: int | None = None
    seed_node_id: str | None = None
    width: int | None = None
    height: int | None = None
    size_node_id: str | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Shorthand:
        """Pick the shorthand keys out of a request body, checking their types."""
        prompt = data.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise WorkflowError("prompt: expected a string", field="prompt")
        values: dict[str, Any] = {"prompt": prompt}
        for key in ("seed", "width", "height"):
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise WorkflowError(f"{key}: expected an integer, got {value!r}", field=key)
            values[key] = value
        for key in ("prompt_node_id", "seed_node_id", "size_node_id"):
            value = data.get(key)
            if value is not None and not isinstance(value, str | int):
                raise WorkflowError(f'{key}: expected a node id such as "6", got {value!r}', field=key)
            values[key] = None if value is None else str(value)
        return cls(**values)

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))


# ---------------------------------------------------------------- validation
def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def validate_workflow(workflow: Any) -> Workflow:
    """Check that ``workflow`` is an API-format graph; return it (not copied).

    Checks: a non-empty object of node id → ``{"class_type": str, "inputs": object}``, and
    every link ``[node_id, output]`` points at a node of the workflow.

    Raises:
        WorkflowError: naming the node and the field at fault.
    """
    if not isinstance(workflow, dict):
        raise WorkflowError(
            f"workflow: expected an object of node id → node (API format), got {type(workflow).__name__}",
            field="workflow",
        )
    if "nodes" in workflow and "links" in workflow:
        raise WorkflowError(
            'workflow: this is the UI format (nodes/links); export it with "Save (API Format)"',
            field="workflow",
        )
    if not workflow:
        raise WorkflowError("workflow: is empty; it needs at least one output node", field="workflow")
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            raise WorkflowError(
                f"node {node_id}: expected an object with class_type and inputs, got {type(node).__name__}",
                node_id=node_id,
            )
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type.strip():
            raise WorkflowError(
                f"node {node_id}: class_type is missing or not a string", node_id=node_id, field="class_type"
            )
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(
                f"node {node_id} ({class_type}): inputs must be an object", node_id=node_id, field="inputs"
            )
        for name, value in inputs.items():
            if _is_link(value) and str(value[0]) not in workflow:
                raise WorkflowError(
                    f"node {node_id} ({class_type}) input {name!r} links to node {value[0]}, "
                    "which is not in the workflow",
                    node_id=node_id,
                    field=f"inputs.{name}",
                )
    return workflow


# ---------------------------------------------------------------- overrides
def parse_overrides(raw: Any) -> list[Override]:
    """Overrides from a request: a list of ``{"node_id", "field", "value"}`` objects."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise WorkflowError("overrides: expected a list of {node_id, field, value}", field="overrides")
    out: list[Override] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise WorkflowError(f"overrides[{i}]: expected an object {{node_id, field, value}}", field="overrides")
        node_id, field = item.get("node_id"), item.get("field")
        if not isinstance(node_id, str | int) or isinstance(node_id, bool) or str(node_id) == "":
            raise WorkflowError(f"overrides[{i}]: node_id is missing", field="overrides")
        if not isinstance(field, str) or not field:
            raise WorkflowError(
                f"overrides[{i}] (node {node_id}): field is missing; use a path such as inputs.text",
                node_id=str(node_id),
                field="overrides",
            )
        if "value" not in item:
            raise WorkflowError(
                f"overrides[{i}] (node {node_id} {field}): value is missing",
                node_id=str(node_id),
                field=field,
            )
        out.append(Override(str(node_id), field, item["value"]))
    return out


def apply_override(workflow: Workflow, override: Override) -> None:
    """Set one value in place. Every step of the path but the last must exist.

    Raises:
        WorkflowError: the node is not in the workflow, or the path does not lead anywhere.
    """
    node = workflow.get(override.node_id)
    if node is None:
        known = ", ".join(sorted(workflow, key=_node_sort_key))
        raise WorkflowError(
            f"override {override.field}: node {override.node_id} is not in the workflow (nodes: {known})",
            node_id=override.node_id,
            field=override.field,
        )
    parts = override.field.split(".")
    if any(not p for p in parts):
        raise WorkflowError(
            f"node {override.node_id}: invalid field path {override.field!r}; use a path such as inputs.text",
            node_id=override.node_id,
            field=override.field,
        )
    if parts[0] == "class_type" and not isinstance(override.value, str):
        raise WorkflowError(
            f"node {override.node_id}: class_type must be a string",
            node_id=override.node_id,
            field="class_type",
        )
    target: Any = node
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(target, dict) or part not in target or not isinstance(target[part], dict):
            where = ".".join(parts[: depth + 1])
            raise WorkflowError(
                f"node {override.node_id} ({node.get('class_type')}): has no object at {where!r} "
                f"for override {override.field!r}",
                node_id=override.node_id,
                field=override.field,
            )
        target = target[part]
    target[parts[-1]] = override.value


def _node_sort_key(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)


def _nodes_with_input(workflow: Workflow, names: Sequence[str]) -> list[str]:
    return [
        nid
        for nid, node in workflow.items()
        if any(n in node.get("inputs", {}) and not _is_link(node["inputs"][n]) for n in names)
    ]


def _pick_node(
    workflow: Workflow, explicit: str | None, default: str, names: Sequence[str], what: str, key: str
) -> str:
    """The node a shorthand value goes to: the explicit id, else the seed's default when it exists
    and has the input, else the only node that has such an input."""
    if explicit is not None:
        if explicit not in workflow:
            raise WorkflowError(f"{key}: node {explicit} is not in the workflow", node_id=explicit, field=key)
        return explicit
    if default in workflow and any(n in workflow[default].get("inputs", {}) for n in names):
        return default
    candidates = _nodes_with_input(workflow, names)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WorkflowError(f"{what}: no node has an input {' or '.join(names)}; set {key}", field=key)
    shown = ", ".join(sorted(candidates, key=_node_sort_key))
    raise WorkflowError(f"{what}: several nodes could take it ({shown}); set {key}", field=key)


def _require_input(workflow: Workflow, node_id: str, names: Sequence[str], key: str) -> str:
    inputs = workflow[node_id].get("inputs", {})
    for name in names:
        if name in inputs:
            return name
    class_type = workflow[node_id].get("class_type")
    raise WorkflowError(
        f"{key}: node {node_id} ({class_type}) has no input {' or '.join(names)}",
        node_id=node_id,
        field=f"inputs.{names[0]}",
    )


def shorthand_overrides(workflow: Workflow, shorthand: Shorthand) -> list[Override]:
    """Turn the seed's shorthand into overrides against ``workflow``.

    Raises:
        WorkflowError: a value is out of range, or no (single) node can take it.
    """
    out: list[Override] = []
    if shorthand.prompt is not None:
        nid = _pick_node(
            workflow,
            shorthand.prompt_node_id,
            DEFAULT_PROMPT_NODE,
            PROMPT_FIELDS + FLUX_PROMPT_FIELDS,
            "prompt",
            "prompt_node_id",
        )
        inputs = workflow[nid].get("inputs", {})
        if "text" in inputs:
            fields: Iterable[str] = ("text",)
        else:
            fields = [f for f in FLUX_PROMPT_FIELDS if f in inputs]
            if not fields:
                _require_input(workflow, nid, PROMPT_FIELDS, "prompt_node_id")
        out += [Override(nid, f"inputs.{f}", shorthand.prompt) for f in fields]
    if shorthand.seed is not None:
        if not 0 <= shorthand.seed < 2**64:
            raise WorkflowError(f"seed: {shorthand.seed} is out of range 0..2^64-1", field="seed")
        nid = _pick_node(workflow, shorthand.seed_node_id, DEFAULT_SEED_NODE, SEED_FIELDS, "seed", "seed_node_id")
        name = _require_input(workflow, nid, SEED_FIELDS, "seed_node_id")
        out.append(Override(nid, f"inputs.{name}", shorthand.seed))
    if shorthand.width is not None or shorthand.height is not None:
        for key in ("width", "height"):
            value = getattr(shorthand, key)
            if value is not None and not 16 <= value <= MAX_SIDE:
                raise WorkflowError(f"{key}: {value} is out of range 16..{MAX_SIDE}", field=key)
        nid = _pick_node(
            workflow,
            shorthand.size_node_id,
            DEFAULT_SIZE_NODE,
            ("width", "height"),
            "width/height",
            "size_node_id",
        )
        for key in ("width", "height"):
            value = getattr(shorthand, key)
            if value is not None:
                _require_input(workflow, nid, (key,), "size_node_id")
                out.append(Override(nid, f"inputs.{key}", value))
    return out


def prepare_workflow(workflow: Any, overrides: Sequence[Override] = (), shorthand: Shorthand | None = None) -> Workflow:
    """Validate, then return a patched deep copy (the caller's workflow is left alone).

    The shorthand is applied first, then ``overrides`` in order (so an explicit override wins).

    Raises:
        WorkflowError: naming the node and field at fault.
    """
    patched = copy.deepcopy(validate_workflow(workflow))
    todo = list(shorthand_overrides(patched, shorthand)) if shorthand and not shorthand.empty else []
    todo += list(overrides)
    for override in todo:
        apply_override(patched, override)
    # An override may have replaced a link or a node; check the result once more.
    return validate_workflow(patched)


def format_node_errors(node_errors: Mapping[str, Any], workflow: Mapping[str, Any] | None = None) -> str:
    """One line from ComfyUI's ``node_errors`` (``{node: {"errors": [...], "class_type"}}``)."""
    parts: list[str] = []
    for node_id, entry in node_errors.items():
        if not isinstance(entry, dict):
            continue
        class_type = entry.get("class_type") or (workflow or {}).get(node_id, {}).get("class_type", "?")
        for err in entry.get("errors", []) or []:
            if not isinstance(err, dict):
                continue
            extra = err.get("extra_info") or {}
            field = extra.get("input_name") if isinstance(extra, dict) else None
            where = f"node {node_id} ({class_type})" + (f" input {field!r}" if field else "")
            detail = err.get("details") or ""
            message = err.get("message") or err.get("type") or "invalid"
            parts.append(f"{where}: {message}" + (f" ({detail})" if detail else ""))
    return "; ".join(parts)


def first_node_error(node_errors: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The (node id, input name) of the first entry in ComfyUI's ``node_errors``."""
    for node_id, entry in node_errors.items():
        if not isinstance(entry, dict):
            continue
        for err in entry.get("errors", []) or []:
            extra = err.get("extra_info") if isinstance(err, dict) else None
            name = extra.get("input_name") if isinstance(extra, dict) else None
            return str(node_id), (f"inputs.{name}" if name else None)
        return str(node_id), None
    return None, None
