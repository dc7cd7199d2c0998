"""The machine plan: a pure function of settings + GPUs (+ the flags ComfyUI supports)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.core.errors import PlanError
from orchestrator.core.gpus import Gpu
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings

# Flags the plan owns; COMFY_ARGS may not set them (they would be doubled or contradict).
OWNED_FLAGS = frozenset(
    {
        "--listen",
        "--port",
        "--cuda-device",
        "--output-directory",
        "--temp-directory",
        "--input-directory",
        "--user-directory",
        "--database-url",
        "--base-directory",
    }
)

# Used when the code tree is not there yet (`plan` before the first `up`): the flags of the
# pinned release v0.3.33, which predates --database-url.
BASELINE_FLAGS = frozenset(
    {
        "--listen", "--port", "--cpu", "--cuda-device", "--extra-model-paths-config",
        "--output-directory", "--temp-directory", "--input-directory", "--user-directory",
    }
)

_ADD_ARGUMENT = re.compile(r"""add_argument\(\s*["'](--[A-Za-z0-9][\w-]*)["']""")


def supported_flags(comfy_dir: Path) -> frozenset[str] | None:
    """The long flags ComfyUI's ``comfy/cli_args.py`` declares, read as text (never imported)."""
    try:
        text = (comfy_dir / "comfy" / "cli_args.py").read_text(errors="replace")
    except OSError:
        return None
    return frozenset(_ADD_ARGUMENT.findall(text))


@dataclasses.dataclass(frozen=True)
class Instance:
    gpu: Gpu
    name: str  # supervisord program name, comfyui_gpu{N}
    port: int
    directory: Path  # $ROOT/comfyui_gpu{N}
    output_dir: Path
    temp_dir: Path
    input_dir: Path
    user_dir: Path
    logs_dir: Path
    log_file: Path
    argv: tuple[str, ...]
    env: Mapping[str, str]

    @property
    def index(self) -> int:
        return self.gpu.index

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.to_dict(),
            "name": self.name,
            "port": self.port,
            "directory": str(self.directory),
            "output_dir": str(self.output_dir),
            "temp_dir": str(self.temp_dir),
            "input_dir": str(self.input_dir),
            "user_dir": str(self.user_dir),
            "logs_dir": str(self.logs_dir),
            "log_file": str(self.log_file),
            "argv": list(self.argv),
            "env": dict(self.env),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Instance:
        return cls(
            gpu=Gpu(**data["gpu"]),
            name=data["name"],
            port=int(data["port"]),
            directory=Path(data["directory"]),
            output_dir=Path(data["output_dir"]),
            temp_dir=Path(data["temp_dir"]),
            input_dir=Path(data["input_dir"]),
            user_dir=Path(data["user_dir"]),
            logs_dir=Path(data["logs_dir"]),
            log_file=Path(data["log_file"]),
            argv=tuple(data["argv"]),
            env=dict(data["env"]),
        )


@dataclasses.dataclass(frozen=True)
class MachinePlan:
    root: Path
    comfy_dir: Path
    mock: bool
    instances: tuple[Instance, ...]

    def instance(self, gpu: int) -> Instance:
        for inst in self.instances:
            if inst.index == gpu:
                return inst
        known = ", ".join(str(i.index) for i in self.instances) or "none"
        raise PlanError(f"unknown GPU {gpu}: this machine runs GPUs {known}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "comfy_dir": str(self.comfy_dir),
            "mock": self.mock,
            "instances": [i.to_dict() for i in self.instances],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MachinePlan:
        return cls(
            root=Path(data["root"]),
            comfy_dir=Path(data["comfy_dir"]),
            mock=bool(data["mock"]),
            instances=tuple(Instance.from_dict(i) for i in data["instances"]),
        )


def _check_comfy_args(args: Sequence[str]) -> None:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise PlanError(
                f"invalid COMFY_ARGS: {flag} is set by the orchestrator for each instance; "
                "remove it (ports come from WORKER_BASE_COMFYUI_PORT, directories from ROOT)"
            )


def build_plan(
    settings: Settings, gpus: Sequence[Gpu], comfy_flags: frozenset[str] | None = None
) -> MachinePlan:
    """Per instance: its GPU, port (base + GPU index), directories, argv and environment.

    Raises:
        PlanError: COMFY_ARGS sets a flag the plan owns, or a port falls outside 1-65535.
    """
    layout = Layout(settings.root)
    flags = comfy_flags if comfy_flags is not None else BASELINE_FLAGS
    _check_comfy_args(settings.comfy_args)
    extra = [a for a in settings.comfy_args if not (settings.mock and a == "--cpu")]
    instances = []
    for gpu in gpus:
        port = settings.worker_base_comfyui_port + gpu.index
        if port > 65535:
            raise PlanError(
                f"invalid WORKER_BASE_COMFYUI_PORT={settings.worker_base_comfyui_port}: "
                f"GPU {gpu.index} would listen on {port} > 65535"
            )
        base = layout.instance_dir(gpu.index)
        user_dir = base / "user"
        argv = [
            settings.python,
            "main.py",
            "--listen", settings.comfy_listen,
            "--port", str(port),
            "--extra-model-paths-config", str(layout.extra_model_paths),
            "--output-directory", str(base / "output"),
            "--temp-directory", str(base / "temp"),
            "--input-directory", str(base / "input"),
            "--user-directory", str(user_dir),
        ]
        if "--database-url" in flags:
            argv += ["--database-url", f"sqlite:///{user_dir / 'comfyui.db'}"]
        if settings.mock:
            argv.append("--cpu")
        argv += extra
        env = {
            "PYTHONUNBUFFERED": "1",
            "STATIC_MODELS": str(layout.static_models),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            # Pin by UUID: NVML's index order and CUDA's default order can differ.
            "CUDA_VISIBLE_DEVICES": "" if settings.mock else gpu.uuid,
        }
        instances.append(
            Instance(
                gpu=gpu,
                name=f"comfyui_gpu{gpu.index}",
                port=port,
                directory=base,
                output_dir=base / "output",
                temp_dir=base / "temp",
                input_dir=base / "input",
                user_dir=user_dir,
                logs_dir=base / "logs",
                log_file=layout.instance_log(gpu.index),
                argv=tuple(argv),
                env=env,
            )
        )
    return MachinePlan(
        root=settings.root, comfy_dir=layout.comfy_dir, mock=settings.mock, instances=tuple(instances)
    )
