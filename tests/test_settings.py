from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.core.errors import ConfigError
from orchestrator.core.settings import FIELDS, Settings, load_settings


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full = {k: v for k, v in os.environ.items() if k not in {"MOCK_GPU", "NUM_GPUS", "TEST_GPUS"}}
    full["XDG_RUNTIME_DIR"] = "/nonexistent-runtime-dir"  # a demo running on this machine is not ours to see
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=full, capture_output=True, text=True)


def test_every_field_is_a_settings_attribute_and_back() -> None:
    import dataclasses

    attrs = {f.name for f in dataclasses.fields(Settings)} - {"sources", "secret_values"}
    assert attrs == {f.attr for f in FIELDS}


def test_defaults_match_the_legacy_contract() -> None:
    s = load_settings({})
    assert s.worker_base_comfyui_port == 8188
    assert s.comfy_branch == "forward"
    assert s.comfy_commit == "02a1b01aad28470f06c8b4f95b90914413d3e4c8"
    assert s.orchestrator_port == 9090
    assert s.orchestrator_listen == "127.0.0.1"
    assert s.root == Path("/workspace")
    assert s.sources["ROOT"] == "default"


def test_flag_beats_env_beats_file(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("WORKER_BASE_COMFYUI_PORT: 7000\nprobe_interval: 2s\nnum_gpus: 3\n")
    s = load_settings({"WORKER_BASE_COMFYUI_PORT": "8000", "NUM_GPUS": "2"}, {"NUM_GPUS": "4"}, f)
    assert s.worker_base_comfyui_port == 8000
    assert s.sources["WORKER_BASE_COMFYUI_PORT"] == "env"
    assert s.probe_interval == 2.0
    assert s.sources["PROBE_INTERVAL"] == "file"
    assert s.num_gpus == 4
    assert s.sources["NUM_GPUS"] == "flag"


@pytest.mark.parametrize(
    ("env", "attr", "value"),
    [
        ({"TEST_GPUS": "3"}, "num_gpus", 3),
        ({"COMFY_FLAGS": "--lowvram --preview-method auto"}, "comfy_args", ("--lowvram", "--preview-method", "auto")),
        ({"AWS_TEST_MODE": "true"}, "storage_test_mode", True),
        ({"AZURE_TEST_MODE": "1"}, "storage_test_mode", True),
    ],
)
def test_legacy_aliases_are_read(env: dict[str, str], attr: str, value: object) -> None:
    s = load_settings(env)
    assert getattr(s, attr) == value
    assert s.sources[attr.upper()].startswith("env:")


def test_the_new_name_wins_over_its_alias() -> None:
    assert load_settings({"NUM_GPUS": "2", "TEST_GPUS": "5"}).num_gpus == 2


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKER_BASE_COMFYUI_PORT": "abc"}, "invalid WORKER_BASE_COMFYUI_PORT='abc': expected a port number 1-65535"),
        ({"WORKER_BASE_COMFYUI_PORT": "70000"}, "expected a port number 1-65535"),
        ({"MOCK_GPU": "maybe"}, "invalid MOCK_GPU='maybe'"),
        ({"PROBE_INTERVAL": "soon"}, "invalid PROBE_INTERVAL='soon': expected a duration"),
        ({"TEST_GPUS": "-1"}, "invalid TEST_GPUS='-1'"),
        ({"COMFY_ARGS": "--x 'unclosed"}, "invalid COMFY_ARGS"),
        ({"GPU_METRICS": "nvidia"}, "expected one of dcgm, off"),
    ],
)
def test_bad_values_name_the_variable_and_the_expectation(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert message in str(err.value)
    assert err.value.exit_code == 2


def test_a_bad_secret_value_is_not_echoed() -> None:
    # Secrets are free text, but the error path must never print one.
    s = load_settings({"HF_TOKEN": "hf_abc123456"})
    assert s.redact("token hf_abc123456 here") == "token *** here"


def test_settings_file_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("NOT_A_SETTING: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown setting 'NOT_A_SETTING'"):
        load_settings({}, None, f)
    f.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings({}, None, f)


def test_bad_port_exits_2_with_one_line_and_no_traceback() -> None:
    r = run_cli("plan", env={"WORKER_BASE_COMFYUI_PORT": "abc", "MOCK_GPU": "1"})
    assert r.returncode == 2
    assert r.stderr.strip() == "error: invalid WORKER_BASE_COMFYUI_PORT='abc': expected a port number 1-65535"
    assert "Traceback" not in r.stderr


def test_config_json_redacts_every_secret_and_tells_sources() -> None:
    r = run_cli(
        "config", "--json",
        env={"HF_TOKEN": "hf_secret123", "CUT_PK_1": "abcdef", "ORCHESTRATOR_TOKEN": "tok-999-xyz",
             "AWS_SECRET_ACCESS_KEY": "awsSECRET42", "SOME_SERVICE_PASSWORD": "pw-77777"},
    )
    assert r.returncode == 0, r.stderr
    for secret in ("hf_secret123", "abcdef", "tok-999-xyz", "awsSECRET42", "pw-77777"):
        assert secret not in r.stdout + r.stderr
    import json

    data = json.loads(r.stdout)
    assert data["HF_TOKEN"] == {"value": "***", "source": "env"}
    assert data["ROOT"]["source"] == "default"


def test_set_flag_overrides_and_unknown_names_are_refused() -> None:
    r = run_cli("--set", "PROBE_INTERVAL=7s", "config", "--json")
    import json

    assert json.loads(r.stdout)["PROBE_INTERVAL"] == {"value": 7.0, "source": "flag"}
    r = run_cli("--set", "NOPE=1", "config")
    assert r.returncode == 2
    assert "unknown setting 'NOPE'" in r.stderr


def test_every_command_has_help() -> None:
    from orchestrator.cli.main import COMMANDS, handler_for

    for key in COMMANDS:
        assert callable(handler_for(key)), key
        r = run_cli(*key.split(), "--help")
        assert r.returncode == 0, key
        assert "usage: orchestrator" in r.stdout
    assert run_cli("--version").stdout.startswith("orchestrator ")


def test_the_readme_documents_every_variable() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [f.env for f in FIELDS if f"`{f.env}`" not in readme]
    assert not missing


def test_main_in_process_leaves_logging_as_it_found_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from orchestrator.cli.main import main

    monkeypatch.setenv("ROOT", str(tmp_path))
    monkeypatch.setenv("LOG_LEVEL", "debug")
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("urllib3").level)
    assert main(["config", "--json"]) == 0
    assert main(["--set", "NOPE=1", "config"]) == 2
    assert (list(root.handlers), root.level, logging.getLogger("urllib3").level) == before
