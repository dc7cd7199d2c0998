"""How the simulator declares a node class, and how ``/object_info`` renders one in ComfyUI's shape.

Inputs whose choices are files (checkpoints, LoRAs, input images, ...) are declared as
``Files("<folder key>")`` and listed from disk when rendered, like ComfyUI's
``folder_paths.get_filename_list``. The classes themselves are in ``nodes.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

ANY = "*"


@dataclasses.dataclass(frozen=True)
class Files:
    """A combo input whose choices are the files of one folder key (``input`` = the input folder)."""

    folder: str


InputType = str | tuple[str, ...] | Files


@dataclasses.dataclass(frozen=True)
class Input:
    name: str
    type: InputType
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class NodeDef:
    name: str
    display_name: str
    category: str
    description: str = ""
    required: tuple[Input, ...] = ()
    optional: tuple[Input, ...] = ()
    hidden: Mapping[str, str] = dataclasses.field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    output_node: bool = False
    python_module: str = "nodes"

    def inputs(self) -> tuple[Input, ...]:
        return self.required + self.optional

    def input(self, name: str) -> Input | None:
        for spec in self.inputs():
            if spec.name == name:
                return spec
        return None

    def to_info(self, list_files: Callable[[str], list[str]]) -> dict[str, Any]:
        """This class as one ``/object_info`` entry."""

        def render(spec: Input) -> list[Any]:
            if isinstance(spec.type, Files):
                return [list_files(spec.type.folder), dict(spec.options)]
            if isinstance(spec.type, tuple):  # a combo: ComfyUI omits an empty options dict
                return [list(spec.type), dict(spec.options)] if spec.options else [list(spec.type)]
            return [spec.type, dict(spec.options)] if spec.options else [spec.type]

        inp: dict[str, Any] = {"required": {s.name: render(s) for s in self.required}}
        order: dict[str, list[str]] = {"required": [s.name for s in self.required]}
        if self.optional:
            inp["optional"] = {s.name: render(s) for s in self.optional}
            order["optional"] = [s.name for s in self.optional]
        if self.hidden:
            inp["hidden"] = dict(self.hidden)
            order["hidden"] = list(self.hidden)
        return {
            "input": inp,
            "input_order": order,
            "output": list(self.outputs),
            "output_is_list": [False] * len(self.outputs),
            "output_name": list(self.output_names or self.outputs),
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
            "deprecated": False,
            "experimental": False,
            "api_node": False,
        }

