"""How a simulated node fails: ComfyUI's exception shapes, tracebacks and CUDA out-of-memory text."""

from __future__ import annotations

import dataclasses
from pathlib import Path


class Interrupted(Exception):
    """POST /interrupt reached the running prompt."""


@dataclasses.dataclass
class NodeFailure(Exception):
    exception_type: str
    message: str
    traceback: list[str]

    def __str__(self) -> str:
        return self.message



def oom_message(total_bytes: int) -> str:
    total = total_bytes / 1024**3
    return (
        f"CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of {total:.2f} GiB of "
        f"which {min(1.02, total):.2f} GiB is free. Including non-PyTorch memory, this process has "
        f"{max(total - 1.02, 0):.2f} GiB memory in use. Of the allocated memory "
        f"{max(total - 3.5, 0):.2f} GiB is allocated by PyTorch, and 1.98 GiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  "
        "See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html"
        "#environment-variables)"
    )


def fake_traceback(comfy_dir: Path, node_file: str, func: str, line: str) -> list[str]:
    """Traceback frames in ComfyUI's shape (``traceback.format_tb`` strings)."""
    ex = comfy_dir / "execution.py"
    return [
        f'  File "{ex}", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = '
        "await get_output_data(prompt_id, unique_id, obj, input_data_all, "
        "execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
        "hidden_inputs=hidden_inputs)\n",
        f'  File "{ex}", line 315, in get_output_data\n    return_values = await _async_map_node_over_list('
        "prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, "
        "execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
        "hidden_inputs=hidden_inputs)\n",
        f'  File "{ex}", line 289, in _async_map_node_over_list\n    await process_inputs(input_dict, i)\n',
        f'  File "{ex}", line 277, in process_inputs\n    result = f(**inputs)\n',
        f'  File "{comfy_dir / node_file}", line 1525, in {func}\n    {line}\n',
    ]


def format_exception(failure: NodeFailure) -> str:
    return (
        "Traceback (most recent call last):\n"
        + "".join(failure.traceback)
        + (f"{failure.exception_type}: {failure.message}")
    )


def oom_failure(comfy_dir: Path, total_bytes: int) -> NodeFailure:
    return NodeFailure(
        "torch.OutOfMemoryError",
        oom_message(total_bytes),
        fake_traceback(
            comfy_dir,
            "nodes.py",
            "sample",
            "return common_ksampler(model, seed, steps, cfg, "
            "sampler_name, scheduler, positive, negative, latent_image, denoise=denoise)",
        ),
    )

