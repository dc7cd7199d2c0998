"""GPU tier: cross-checks NVML detection against nvidia-smi; skips itself without a driver."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA driver (nvidia-smi missing)"),
]


def smi() -> list[dict[str, str]]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid,pci.bus_id,name,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = []
    for line in out.strip().splitlines():
        index, uuid, bus, name, mem = (p.strip() for p in line.split(","))
        rows.append({"index": index, "uuid": uuid, "bus": bus, "name": name, "mem_mib": mem})
    return rows


def test_orchestrator_gpus_matches_nvidia_smi() -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"MOCK_GPU", "GPUS", "NUM_GPUS"}}
    r = subprocess.run([sys.executable, "-m", "orchestrator", "gpus", "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    theirs = smi()
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs, strict=True):
        assert str(o["index"]) == t["index"]
        assert o["uuid"] == t["uuid"]
        assert o["pci_bus_id"].lower().endswith(t["bus"].lower()[-12:])
        assert o["name"] == t["name"]
        assert abs(o["memory_total"] // 2**20 - int(t["mem_mib"])) <= 64
    print(json.dumps(ours, indent=1))


def test_plan_pins_each_instance_by_uuid() -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"MOCK_GPU", "GPUS", "NUM_GPUS"}}
    r = subprocess.run([sys.executable, "-m", "orchestrator", "plan", "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    uuids = [t["uuid"] for t in smi()]
    for inst in plan["instances"]:
        assert inst["env"]["CUDA_VISIBLE_DEVICES"] == uuids[inst["gpu"]["index"]]
        assert inst["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert "--cpu" not in inst["argv"]
