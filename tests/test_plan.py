from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.core.errors import PlanError
from orchestrator.core.gpus import Gpu
from orchestrator.core.plan import build_plan, supported_flags
from orchestrator.core.settings import load_settings
from orchestrator.machine.gpu import MockBackend
from orchestrator.machine.ports import check_ports
from orchestrator.machine.state import create_instance_dirs


def gpus(n: int, mock: bool = True) -> list[Gpu]:
    return MockBackend(n, 2**30).list_gpus() if mock else [
        Gpu(i, f"GPU-{i}", f"0000:{i}", "NVIDIA H100", 80 * 2**30, "550") for i in range(n)
    ]


def test_mock_plan_has_one_instance_per_gpu_on_base_plus_index() -> None:
    s = load_settings({"MOCK_GPU": "1", "NUM_GPUS": "4", "ROOT": "/r"})
    plan = build_plan(s, gpus(4))
    assert [i.port for i in plan.instances] == [8188, 8189, 8190, 8191]
    assert len({i.output_dir for i in plan.instances}) == 4
    assert len({i.temp_dir for i in plan.instances}) == 4
    assert all(i.argv.count("--cpu") == 1 for i in plan.instances)
    assert plan.instances[2].output_dir == Path("/r/comfyui_gpu2/output")
    argv = plan.instances[1].argv
    assert argv[1] == "main.py"
    assert argv[argv.index("--listen") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "8189"
    assert argv[argv.index("--user-directory") + 1] == "/r/comfyui_gpu1/user"


def test_subset_keeps_the_port_arithmetic() -> None:
    s = load_settings({"GPUS": "0,2", "WORKER_BASE_COMFYUI_PORT": "9000"})
    from orchestrator.machine.gpu import select_gpus

    plan = build_plan(s, select_gpus(gpus(4, mock=False), s))
    assert [(i.index, i.port) for i in plan.instances] == [(0, 9000), (2, 9002)]


def test_real_gpus_are_pinned_by_uuid_with_pci_order_and_no_cpu_flag() -> None:
    plan = build_plan(load_settings({}), gpus(2, mock=False))
    inst = plan.instances[1]
    assert inst.env["CUDA_VISIBLE_DEVICES"] == "GPU-1"
    assert inst.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "--cpu" not in inst.argv


def test_cpu_appears_once_even_when_comfy_args_has_it() -> None:
    s = load_settings({"MOCK_GPU": "1", "COMFY_ARGS": "--cpu --lowvram"})
    argv = build_plan(s, gpus(1)).instances[0].argv
    assert argv.count("--cpu") == 1
    assert argv[-1] == "--lowvram"


@pytest.mark.parametrize("arg", ["--port 9", "--listen=0.0.0.0", "--cuda-device 1", "--output-directory /x"])
def test_comfy_args_that_conflict_with_the_plan_are_rejected(arg: str) -> None:
    with pytest.raises(PlanError, match="invalid COMFY_ARGS: --"):
        build_plan(load_settings({"COMFY_ARGS": arg}), gpus(1))


def test_database_url_is_per_instance_only_when_comfyui_has_the_flag(tmp_path: Path) -> None:
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "comfy" / "cli_args.py").write_text(
        'parser.add_argument("--listen", type=str)\nparser.add_argument(\n    "--database-url", type=str)\n'
    )
    flags = supported_flags(comfy)
    assert flags == {"--listen", "--database-url"}
    s = load_settings({"MOCK_GPU": "1", "ROOT": "/r"})
    plan = build_plan(s, gpus(2), flags)
    urls = [i.argv[i.argv.index("--database-url") + 1] for i in plan.instances]
    assert urls == ["sqlite:////r/comfyui_gpu0/user/comfyui.db", "sqlite:////r/comfyui_gpu1/user/comfyui.db"]
    assert "--database-url" not in build_plan(s, gpus(1), supported_flags(tmp_path / "missing")).instances[0].argv


def test_comfy_python_is_the_interpreter() -> None:
    plan = build_plan(load_settings({"COMFY_PYTHON": "/opt/venv/bin/python"}), gpus(1))
    assert plan.instances[0].argv[0] == "/opt/venv/bin/python"
    assert build_plan(load_settings({}), gpus(1)).instances[0].argv[0] == sys.executable


def test_plan_round_trips_through_json(tmp_path: Path) -> None:
    from orchestrator.core.plan import MachinePlan

    plan = build_plan(load_settings({"MOCK_GPU": "1", "ROOT": str(tmp_path)}), gpus(2))
    assert MachinePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    create_instance_dirs(plan)
    assert (tmp_path / "comfyui_gpu1" / "user").is_dir()
    assert (tmp_path / "comfyui_gpu1" / "temp").is_dir()


def test_a_port_held_by_a_foreign_process_is_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PlanError, match=rf"port {port} \(comfyui_gpu0\) is already in use by pid {os.getpid()}"):
            check_ports([(port, "comfyui_gpu0")])
        check_ports([(port, "comfyui_gpu0")], ours={os.getpid()})


def test_plan_cli_json_lists_instances_and_moves_with_the_base_port() -> None:
    env = {**os.environ, "MOCK_GPU": "1", "NUM_GPUS": "4"}
    out = subprocess.run([sys.executable, "-m", "orchestrator", "plan", "--json"], env=env, capture_output=True, text=True)
    assert [i["port"] for i in json.loads(out.stdout)["instances"]] == [8188, 8189, 8190, 8191]
    env["WORKER_BASE_COMFYUI_PORT"] = "9000"
    out = subprocess.run([sys.executable, "-m", "orchestrator", "plan", "--json"], env=env, capture_output=True, text=True)
    assert [i["port"] for i in json.loads(out.stdout)["instances"]] == [9000, 9001, 9002, 9003]
