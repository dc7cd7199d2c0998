"""Least privilege for secrets and local trust: who gets which variables, and private file modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from support import SECRET_MARKERS, Machine, answers, http_client, process_environ, txt2img, wait_for

from orchestrator.core.environment import (
    base_environment,
    check_passthrough,
    is_secret,
    passthrough_environment,
    program_environment,
)
from orchestrator.core.errors import ConfigError
from orchestrator.core.plan import build_plan
from orchestrator.core.settings import FIELDS, load_settings
from orchestrator.machine import envexec
from orchestrator.machine.gpu import MockBackend
from orchestrator.machine.state import create_instance_dirs

ENVIRON = {
    "PATH": "/usr/bin", "HOME": "/home/u", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC",
    "PYTHONPATH": "/p", "CUDA_HOME": "/usr/local/cuda", "NVIDIA_VISIBLE_DEVICES": "all", "HF_HOME": "/cache/hf",
    "ORCHESTRATOR_TOKEN": "tok-MARKER", "HF_TOKEN": "hf-MARKER", "CIVITAI_TOKEN": "civ-MARKER",
    "SSH_PRIVATE_KEY": "ssh-MARKER", "CUT_PK_1": "pk-MARKER", "SSH_AUTH_SOCK": "/tmp/agent",
    "AWS_SECRET_ACCESS_KEY": "aws-MARKER", "AZURE_STORAGE_KEY": "az-MARKER", "OPENAI_API_KEY": "oa-MARKER",
    "RANDOM_THING": "x", "HTTPS_PROXY": "http://proxy:3128", "PROBE_INTERVAL": "2s",
}


def test_every_secret_setting_is_a_secret_name() -> None:
    for f in FIELDS:
        if f.secret:
            assert all(is_secret(n) for n in (f.env, *f.aliases)), f.env


def test_supervisords_environment_is_the_allow_list_without_secrets() -> None:
    env = base_environment(ENVIRON)
    assert env == {k: ENVIRON[k] for k in (
        "PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "CUDA_HOME", "NVIDIA_VISIBLE_DEVICES", "HF_HOME",
    )}


def test_passthrough_forwards_names_and_globs_but_never_a_secret() -> None:
    environ = {**ENVIRON, "MY_APP_MODE": "fast", "MY_APP_API_TOKEN": "t", "OTHER": "1"}
    assert passthrough_environment(environ, ("MY_APP_*", "RANDOM_THING", "HTTPS_PROXY", "ABSENT")) == {
        "MY_APP_MODE": "fast", "RANDOM_THING": "x", "HTTPS_PROXY": "http://proxy:3128",
    }
    assert passthrough_environment(environ, ("*",)) == {
        k: v for k, v in environ.items() if not is_secret(k)
    }


@pytest.mark.parametrize("name", ["ORCHESTRATOR_TOKEN", "HF_TOKEN", "SSH_PRIVATE_KEY", "CUT_PK_2",
                                  "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY", "SSH_AUTH_SOCK", "MY_PASSWORD"])
def test_a_secret_name_in_the_passthrough_is_refused_in_one_line(name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        check_passthrough(("LANG", name))
    message = str(exc.value)
    assert "\n" not in message
    assert "INSTANCE_ENV_PASSTHROUGH" in message
    assert name in message


def test_a_malformed_passthrough_entry_is_refused() -> None:
    with pytest.raises(ConfigError, match="INSTANCE_ENV_PASSTHROUGH entry 'A=B'"):
        check_passthrough(("A=B",))


def test_each_orchestrator_program_gets_the_settings_and_only_its_own_secrets() -> None:
    settings = load_settings({"ROOT": "/ws"})
    flags = {"LOG_LEVEL": "debug", "ORCHESTRATOR_TOKEN": "tok-FLAG"}
    monitor = program_environment(settings, ENVIRON, flags, "monitor")
    assert monitor == {
        "ROOT": "/ws", "PROBE_INTERVAL": "2s", "LOG_LEVEL": "debug", "ORCHESTRATOR_TOKEN": "tok-FLAG",
        "HTTPS_PROXY": "http://proxy:3128",
    }
    models = program_environment(settings, ENVIRON, {}, "models")
    assert models["HF_TOKEN"] == "hf-MARKER"
    assert models["CIVITAI_TOKEN"] == "civ-MARKER"
    assert "ORCHESTRATOR_TOKEN" not in models
    cleanup = program_environment(settings, ENVIRON, {}, "cleanup")
    assert not any("MARKER" in v for v in cleanup.values())


def test_the_monitor_holds_the_storage_keys_only_when_it_uploads_outputs() -> None:
    env = {**ENVIRON, "AWS_ACCESS_KEY_ID": "AKIA-MARKER", "OUTPUT_UPLOAD": "s3://b/p", "AWS_ENDPOINT_URL": "http://s3"}
    uploading = program_environment(load_settings(env), env, {}, "monitor")
    assert uploading["AWS_SECRET_ACCESS_KEY"] == "aws-MARKER"
    assert uploading["AWS_ACCESS_KEY_ID"] == "AKIA-MARKER"
    assert uploading["AWS_ENDPOINT_URL"] == "http://s3"
    assert "HF_TOKEN" not in uploading
    del env["OUTPUT_UPLOAD"]
    plain = program_environment(load_settings(env), env, {}, "monitor")
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(plain)
    assert "AWS_SECRET_ACCESS_KEY" not in program_environment(load_settings(env), env, {}, "models")


@pytest.mark.parametrize("raw", ["888", "0777", "700", "abc", "-1", "07777", ""])
def test_an_invalid_umask_is_one_line_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"UMASK": raw})
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("invalid UMASK=")


@pytest.mark.parametrize(("raw", "value"), [("077", 0o77), ("022", 0o22), ("27", 0o27), ("0", 0)])
def test_a_valid_umask(raw: str, value: int) -> None:
    assert load_settings({"UMASK": raw}).umask == value


@pytest.mark.parametrize(("umask", "mode"), [(0o077, 0o700), (0o022, 0o755)])
def test_instance_folders_get_the_umasks_mode_and_old_ones_are_tightened(tmp_path: Path, umask: int, mode: int) -> None:
    plan = build_plan(load_settings({"ROOT": str(tmp_path), "MOCK_GPU": "1"}), MockBackend(1, 2**30).list_gpus())
    inst = plan.instances[0]
    inst.output_dir.mkdir(parents=True)
    inst.output_dir.chmod(0o755)
    create_instance_dirs(plan, umask)
    for d in (inst.directory, inst.output_dir, inst.temp_dir, inst.input_dir, inst.user_dir, inst.logs_dir,
              tmp_path / "logs"):
        assert stat.S_IMODE(d.stat().st_mode) == mode, d


def test_envexec_adds_the_files_variables_and_execs(tmp_path: Path) -> None:
    path = tmp_path / "env.json"
    path.write_text(json.dumps({"ADDED": "quote\"s, commas and 'more'"}))
    code = "import os; print(os.environ['ADDED']); print(os.environ.get('KEPT'))"
    r = subprocess.run(
        [sys.executable, "-I", "-S", envexec.__file__, str(path), "--", sys.executable, "-c", code],
        env={"KEPT": "k", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30,
    )
    assert r.stdout.splitlines() == ["quote\"s, commas and 'more'", "k"], r.stderr


@pytest.mark.parametrize("content", [None, "not json", "[1]", '{"A": 1}'])
def test_envexec_refuses_a_missing_or_damaged_file_in_one_line(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "env.json"
    if content is not None:
        path.write_text(content)
    r = subprocess.run(
        [sys.executable, "-I", "-S", envexec.__file__, str(path), "--", "true"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr == f"{path} is missing or damaged: run `orchestrator up` to rewrite it\n"


# ---------------------------------------------------------------- a running machine
MARKERS = SECRET_MARKERS
_environ = process_environ


def _processes(m: Machine) -> tuple[int, list[int], int]:
    """supervisord's pid, the instances' and the monitor's."""
    sup = psutil.Process(m.status()["supervisord"]["pid"])
    children = sup.children()

    def pids(word: str) -> list[int]:
        return [p.pid for p in children if word in p.cmdline()]

    instances = wait_for(lambda: (lambda found: found if len(found) == m.num_gpus else None)(pids("main.py")))
    monitor = wait_for(lambda: (pids("serve") or [None])[0])
    return sup.pid, instances, monitor


@pytest.mark.integration
def test_no_instance_holds_a_secret_the_monitor_holds_the_token_and_outputs_are_private(
    machine: Callable[..., Machine],
) -> None:
    m = machine(2, **MARKERS, INSTANCE_ENV_PASSTHROUGH="FORWARDED_*,HF_HOME", FORWARDED_SETTING="fwd-7f3a",
                HF_HOME="/cache/hf", NOT_FORWARDED="nf-7f3a")
    m.up()
    assert m.wait_all_answer()
    sup, instances, monitor = _processes(m)
    for pid in (sup, *instances):
        env = _environ(pid)
        leaked = [name for name, value in MARKERS.items() if value.encode() in env]
        assert not leaked, f"pid {pid} holds {leaked}"
        assert b"nf-7f3a" not in env
    for pid in instances:
        env = _environ(pid)
        assert b"\0FORWARDED_SETTING=fwd-7f3a\0" in env
        assert b"\0HF_HOME=/cache/hf\0" in env
        assert b"ORCHESTRATOR_TOKEN" not in env
        assert b"\0ROOT=" not in env
    monitor_env = _environ(monitor)
    assert f"ORCHESTRATOR_TOKEN={MARKERS['ORCHESTRATOR_TOKEN']}".encode() in monitor_env
    assert not [n for n, v in MARKERS.items() if n != "ORCHESTRATOR_TOKEN" and v.encode() in monitor_env]
    # the token is in force: the monitor read it from its own environment
    wait_for(lambda: answers(m.monitor_port, "/healthz") or None, 60)
    with http_client(m.monitor_url, trust_env=False) as client:
        assert client.post("/instances/0/restart").status_code == 401
    # neither supervisord.conf nor anything else but the monitor's 0600 env file holds the token
    assert MARKERS["ORCHESTRATOR_TOKEN"] not in m.layout.supervisord_conf.read_text()
    env_file = m.layout.state_dir / "env" / "monitor.json"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(env_file.parent.stat().st_mode) == 0o700

    # folders 0700, an output file and the instance log 0600
    inst_dir = m.root / "comfyui_gpu1"
    for d in (inst_dir, inst_dir / "output", inst_dir / "temp", inst_dir / "input", inst_dir / "user",
              inst_dir / "logs", m.root / "logs"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    with http_client(f"http://127.0.0.1:{m.ports[1]}", trust_env=False) as client:
        assert client.post("/prompt", json={"prompt": txt2img("private/out")}).status_code == 200
    out = wait_for(lambda: next(iter((inst_dir / "output" / "private").glob("*.png")), None), 60)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE((inst_dir / "logs" / "output.log").stat().st_mode) == 0o600


@pytest.mark.integration
def test_a_secret_in_the_passthrough_fails_up_before_anything_starts(machine: Callable[..., Machine]) -> None:
    m = machine(1, INSTANCE_ENV_PASSTHROUGH="LANG,HF_TOKEN", HF_TOKEN="hf-MARKER-7f3a")
    r = m.run("up", "--skip-provision")
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "INSTANCE_ENV_PASSTHROUGH entry HF_TOKEN" in errors[0]
    assert "stage detect" not in r.stderr  # refused before anything was detected, cloned or started
    assert "hf-MARKER-7f3a" not in r.stderr + r.stdout
    assert not m.layout.supervisord_pid.exists()


def test_supervisord_runs_with_the_allow_list_and_in_the_foreground_with_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.core.layout import Layout
    from orchestrator.lifecycle import launch

    monkeypatch.setenv("ORCHESTRATOR_TOKEN", "tok-MARKER")
    monkeypatch.setenv("LC_TIME", "C")
    env = launch.child_environment()
    assert "ORCHESTRATOR_TOKEN" not in env
    assert env["LC_TIME"] == "C"
    seen: list[int] = []

    def fake_execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        mask = os.umask(0)
        os.umask(mask)
        seen.append(mask)

    before = os.umask(0o022)
    try:
        launch.exec_supervisord(Layout(tmp_path), env, fake_execve, umask=0o027)
        assert seen == [0o027]
        assert os.umask(0o022) == 0o022  # put back after a returning execve
    finally:
        os.umask(before)
