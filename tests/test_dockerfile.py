"""No Docker engine here: parse the Dockerfile and check the instructions production needs; run
the entry point script and the dependency extraction it relies on; bake a ROOT the way
``BAKE=1`` does (``orchestrator up --provision-only``) and boot from it."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from support import clean_env, free_port_block, wait_until

from orchestrator.jobs.runpod import to_job_request

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "deploy" / "docker" / "entrypoint.sh"


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


def args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def index_of(op: str, needle: str) -> int:
    return next(i for i, (o, rest) in enumerate(instructions()) if o == op and needle in rest)


def test_base_is_a_cuda_pytorch_image_pinned_by_digest() -> None:
    froms = [rest for op, rest in instructions() if op == "FROM"]
    assert froms == ["${BASE_IMAGE}@${BASE_DIGEST}"]
    assert "pytorch" in args()["BASE_IMAGE"]
    assert "cuda" in args()["BASE_IMAGE"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", args()["BASE_DIGEST"])


def test_git_and_ssh_are_installed_and_comfyui_requirements_are_baked_in_from_a_build_arg() -> None:
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert "git" in runs
    assert "openssh-client" in runs
    assert '"${COMFY_REPO_URL}"' in runs
    assert '"${COMFY_REF}"' in runs
    assert "requirements.txt" in runs
    assert "-c /opt/torch-constraints.txt" in runs
    assert "pip install --no-deps /opt/orchestrator" in runs


def test_dependencies_are_a_layer_of_their_own_before_the_code() -> None:
    deps_copy = index_of("COPY", "setup.cfg pyproject.toml")
    deps_install = index_of("RUN", "/opt/orchestrator-requirements.txt")
    code_copy = index_of("COPY", ". /opt/orchestrator")
    assert deps_copy < deps_install < code_copy


def test_the_dependency_layer_reads_every_requirement_of_setup_cfg(tmp_path: Path) -> None:
    run = next(rest for op, rest in instructions() if op == "RUN" and "configparser" in rest)
    script = re.search(r'python -c "(.*?)" >', run)
    assert script is not None
    (tmp_path / "opt" / "orchestrator").mkdir(parents=True)
    shutil.copy(REPO / "setup.cfg", tmp_path / "opt" / "orchestrator" / "setup.cfg")
    code = script.group(1).replace("/opt/orchestrator/", str(tmp_path / "opt" / "orchestrator") + "/")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = {Requirement(line).name.lower() for line in out.splitlines() if line.strip()}
    assert {"fastapi", "supervisor", "uvicorn", "aiohttp", "runpod"} <= names
    assert len(names) >= 18


def test_tini_is_pid_1_and_the_entry_point_script_is_installed() -> None:
    ops = dict(instructions())
    assert json.loads(ops["ENTRYPOINT"]) == ["tini", "--", "orchestrator-entrypoint"]
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert re.search(r"apt-get install .*\btini\b", runs)
    assert "deploy/docker/entrypoint.sh /usr/local/bin/orchestrator-entrypoint" in runs
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR


def test_the_healthcheck_is_liveness_not_every_instance_ready() -> None:
    ops = dict(instructions())
    assert ops["HEALTHCHECK"].endswith('CMD ["orchestrator", "health", "--live"]')


def test_it_runs_as_a_non_root_user_whose_pip_installs_stay_in_its_home() -> None:
    users = [rest for op, rest in instructions() if op == "USER"]
    assert users == ["comfy"]
    assert index_of("USER", "comfy") < index_of("ENTRYPOINT", "tini")
    assert any(op == "ENV" and "PIP_USER=1" in rest for op, rest in instructions())


def test_bake_provisions_root_at_build_time_as_the_image_user() -> None:
    assert args()["BAKE"] == "0"
    bake = index_of("RUN", "orchestrator up --provision-only")
    assert index_of("USER", "comfy") < bake
    assert "/workspace/.orchestrator/baked" in instructions()[bake][1]


# ---------------------------------------------------------------- .dockerignore
def ignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, p.removeprefix("**/")) or fnmatch.fnmatch(prefix, p)
               for p in patterns for prefix in prefixes)


def test_the_build_context_leaves_out_git_tests_benchmarks_and_virtualenvs() -> None:
    for path in (".git/config", "tests/test_plan.py", "bench/results/x.json", ".venv/bin/python",
                 "orchestrator/__pycache__/x.pyc"):
        assert ignored(path), path
    needed = ["setup.cfg", "pyproject.toml", "README.md", "orchestrator/core/plan.py",
              "deploy/docker/entrypoint.sh", "test_input.json"]
    needed += re.findall(r"shared/[\w.-]+", (REPO / "setup.cfg").read_text())  # data_files
    for path in needed:
        assert not ignored(path), path


# ---------------------------------------------------------------- the entry point script
@pytest.fixture
def fake_orchestrator(tmp_path: Path) -> Path:
    """A PATH folder whose `orchestrator` records its arguments and COMFY_UPDATE, one call a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "orchestrator"
    script.write_text(f'#!/bin/sh\necho "$* COMFY_UPDATE=${{COMFY_UPDATE:-}}" >> {tmp_path / "calls"}\n')
    script.chmod(0o755)
    return bin_dir


def entry(bin_dir: Path, *argv: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    r = subprocess.run(
        [str(ENTRYPOINT), *argv], capture_output=True, text=True, timeout=30,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
    )
    calls = bin_dir.parent / "calls"
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return r, lines


def test_mode_machine_runs_up_in_the_foreground(fake_orchestrator: Path, tmp_path: Path) -> None:
    r, calls = entry(fake_orchestrator, ROOT=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert calls == ["up --foreground COMFY_UPDATE="]


def test_mode_runpod_starts_the_machine_then_the_serverless_worker(fake_orchestrator: Path, tmp_path: Path) -> None:
    r, calls = entry(fake_orchestrator, "--test_input", "{}", MODE="runpod", ROOT=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert calls == ["up COMFY_UPDATE=", "runpod-worker --test_input {} COMFY_UPDATE="]


def test_an_unknown_mode_is_one_line_and_exit_2(fake_orchestrator: Path, tmp_path: Path) -> None:
    r, calls = entry(fake_orchestrator, MODE="serverless", ROOT=str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == "invalid MODE=serverless: expected machine or runpod"
    assert calls == []


def test_a_baked_root_boots_without_fetching_unless_told(fake_orchestrator: Path, tmp_path: Path) -> None:
    (tmp_path / ".orchestrator").mkdir()
    (tmp_path / ".orchestrator" / "baked").touch()
    assert entry(fake_orchestrator, ROOT=str(tmp_path))[1] == ["up --foreground COMFY_UPDATE=never"]
    assert entry(fake_orchestrator, ROOT=str(tmp_path), COMFY_UPDATE="always")[1] == [
        "up --foreground COMFY_UPDATE=always"
    ]


def test_the_runpod_test_input_runs_the_example_workflow() -> None:
    test_input = json.loads((REPO / "test_input.json").read_text())
    example = json.loads((REPO / "examples" / "workflow.json").read_text())["workflow"]
    assert test_input["input"]["workflow"] == example
    body = to_job_request(test_input["input"])
    assert body["wait"] is True


# ---------------------------------------------------------------- baking: up --provision-only
@pytest.mark.integration
def test_provision_only_bakes_code_and_nodes_and_starts_nothing(tmp_path: Path) -> None:
    from orchestrator.lifecycle.demo import build_sources, demo_settings

    urls = build_sources(tmp_path / "src")
    root = tmp_path / "root"
    env = clean_env(**demo_settings(root, 1, urls), ORCHESTRATOR_PORT=str(free_port_block(1)),
                    WORKER_BASE_COMFYUI_PORT=str(free_port_block(2)), PIP_NO_INDEX="1")
    r = subprocess.run([sys.executable, "-m", "orchestrator", "up", "--provision-only"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "nothing started" in r.stdout
    assert (root / "ComfyUI" / "main.py").is_file()
    assert (root / "ComfyUI" / "custom_nodes" / "demo-script-nodes" / "installed.txt").is_file()
    status = json.loads((root / ".orchestrator" / "status.json").read_text())
    assert status["nodes"]["counts"].get("installed") == 3
    assert not (root / ".orchestrator" / "plan.json").exists()  # no plan, no supervisord
    assert not os.path.exists(root / ".orchestrator" / "supervisord.pid")

    # The boot of the baked ROOT: nothing fetched, nodes unchanged, every instance started.
    boot = subprocess.run([sys.executable, "-m", "orchestrator", "up"], env={**env, "COMFY_UPDATE": "never"},
                          capture_output=True, text=True, timeout=300)
    try:
        assert boot.returncode == 0, boot.stderr
        status = json.loads((root / ".orchestrator" / "status.json").read_text())
        counts = status["nodes"]["counts"]
        assert (counts["unchanged"], counts["installed"], counts["updated"]) == (3, 0, 0)
        assert wait_until(lambda: (root / ".orchestrator" / "plan.json").exists(), 10)
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator", "down"], env=env, capture_output=True, timeout=120)


def test_provision_only_refuses_foreground_and_skip_provision(tmp_path: Path) -> None:
    env = clean_env(ROOT=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "orchestrator", "up", "--provision-only", "--foreground"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "up --provision-only starts nothing" in r.stderr


# ---------------------------------------------------------------- COMFY_LISTEN: instances a fleet can reach
@pytest.mark.parametrize("value", ["127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "0.0.0.0,::"])
def test_comfy_listen_goes_to_every_instances_listen_flag(value: str) -> None:
    from orchestrator.core.gpus import Gpu
    from orchestrator.core.plan import build_plan
    from orchestrator.core.settings import load_settings

    settings = load_settings({"ROOT": "/r", "MOCK_GPU": "1", "COMFY_LISTEN": value})
    plan = build_plan(settings, [Gpu(i, f"GPU-{i}", f"0000:0{i}:00.0", "mock", 1, "0", mock=True) for i in range(2)])
    for inst in plan.instances:
        assert inst.argv[inst.argv.index("--listen") + 1] == value


def test_comfy_listen_defaults_to_loopback_and_refuses_one_other_address() -> None:
    from orchestrator.core.errors import ConfigError
    from orchestrator.core.settings import load_settings

    assert load_settings({}).comfy_listen == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"invalid COMFY_LISTEN='10.1.2.3': expected 127.0.0.1 .* 0.0.0.0 / ::"):
        load_settings({"COMFY_LISTEN": "10.1.2.3"})


def _outside_address() -> str | None:
    """An address of this host other than loopback (no packet is sent), or None."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.integration
def test_with_comfy_listen_0000_an_instance_answers_beyond_loopback_and_stays_monitored(tmp_path: Path) -> None:
    from support import answers, simulated_machine

    address = _outside_address()
    if address is None:
        pytest.skip("this host has no address but loopback")
    m = simulated_machine(tmp_path / "m", 1, COMFY_LISTEN="0.0.0.0")
    try:
        m.up()
        assert wait_until(m.ready, 60, 0.2)  # the monitor still reaches it on 127.0.0.1
        import requests

        stats = requests.get(f"http://{address}:{m.ports[0]}/system_stats", timeout=5)
        assert stats.status_code == 200
        assert answers(m.ports[0])
    finally:
        m.down()


# ---------------------------------------------------------------- SIGTERM while provisioning: tini as PID 1
def _pid_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30)
    return r.returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("tini") is None, reason="tini (Debian: tini) not installed")
def test_sigterm_during_provisioning_stops_the_container_under_tini_not_with_python_as_pid_1(
    tmp_path: Path,
) -> None:
    import signal
    import time

    import psutil
    from support import commit_file

    from orchestrator.lifecycle.demo import build_sources, demo_settings

    if not _pid_namespaces():
        pytest.skip("no PID namespaces here (unshare --pid needs root or user namespaces)")
    urls = build_sources(tmp_path / "src")
    shared = tmp_path / "src" / "shared"
    nodes = json.loads((shared / "config_nodes.json").read_text())
    for node in nodes["custom_nodes"]:
        if node.get("custom_script"):
            node["custom_script"] = "sleep 300"  # a long provisioning step (a clone, a pip install)
    commit_file(shared, "config_nodes.json", json.dumps(nodes))

    def boot(root: Path, *init: str) -> tuple[subprocess.Popen[bytes], psutil.Process]:
        env = clean_env(**demo_settings(root, 1, urls), ORCHESTRATOR_PORT=str(free_port_block(1)),
                        WORKER_BASE_COMFYUI_PORT=str(free_port_block(2)), PIP_NO_INDEX="1")
        argv = ["unshare", "--pid", "--fork", "--mount-proc", *init,
                sys.executable, "-m", "orchestrator", "up", "--foreground"]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def sleeping() -> bool:
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if p.cmdline()[:2] == ["sleep", "300"]:
                        return True
                except psutil.Error:  # gone or a zombie meanwhile (git, pip of earlier steps)
                    continue
            return False

        assert wait_until(sleeping, 120), "provisioning never reached the long step"
        return proc, psutil.Process(proc.pid).children()[0]  # PID 1 in the container

    bare, python_init = boot(tmp_path / "bare")
    try:
        python_init.send_signal(signal.SIGTERM)  # what `docker stop` sends PID 1
        time.sleep(3)
        assert bare.poll() is None, "python as PID 1 was expected to ignore SIGTERM (no handler)"
    finally:
        python_init.kill()  # SIGKILL: the end of `docker stop`'s grace period
        bare.wait(30)

    tini, tini_init = boot(tmp_path / "tini", "tini", "--")
    descendants = tini_init.children(recursive=True)
    try:
        tini_init.send_signal(signal.SIGTERM)
        assert tini.wait(60) is not None  # tini forwarded it; the container ends without SIGKILL
        assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in descendants)
    finally:
        if tini.poll() is None:
            tini_init.kill()
            tini.wait(30)
