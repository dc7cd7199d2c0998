"""No Docker engine here: parse the Dockerfile and check the instructions production needs."""

from __future__ import annotations

import json
import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def test_base_is_a_cuda_pytorch_image() -> None:
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))
    froms = [rest for op, rest in instructions() if op == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    assert "pytorch" in args["BASE_IMAGE"]
    assert "cuda" in args["BASE_IMAGE"]


def test_git_and_ssh_are_installed_and_comfyui_requirements_are_baked_in_from_a_build_arg() -> None:
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert "git" in runs
    assert "openssh-client" in runs
    assert '"${COMFY_REPO_URL}"' in runs
    assert '"${COMFY_REF}"' in runs
    assert "requirements.txt" in runs
    assert "-c /opt/torch-constraints.txt" in runs
    assert "pip install /opt/orchestrator" in runs


def test_healthcheck_and_foreground_entrypoint() -> None:
    ops = dict(instructions())
    assert ops["HEALTHCHECK"].endswith('CMD ["orchestrator", "health"]')
    assert json.loads(ops["ENTRYPOINT"]) == ["orchestrator", "up", "--foreground"]
