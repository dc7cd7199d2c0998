from __future__ import annotations

import configparser
import os
from pathlib import Path

import pytest
from supervisor.datatypes import dict_of_key_value_pairs

from orchestrator.core.errors import PlanError
from orchestrator.core.layout import Layout
from orchestrator.core.plan import build_plan
from orchestrator.core.render import Program, RenderOptions, render_environment, render_supervisord_conf
from orchestrator.core.settings import load_settings
from orchestrator.machine.gpu import MockBackend

GOLDEN = Path(__file__).parent / "golden" / "supervisord_2gpu.conf"


def render_two() -> str:
    s = load_settings({"MOCK_GPU": "1", "NUM_GPUS": "2", "ROOT": "/ws", "COMFY_PYTHON": "/usr/bin/python3"})
    plan = build_plan(s, MockBackend(2, 2**30).list_gpus())
    layout = Layout(Path("/ws"))
    programs = [
        Program(
            "monitor", ("/usr/bin/python3", "-m", "orchestrator", "serve"), "/ws", {"A": "1"}, priority=50,
            die_with_supervisord=False,
        ),
        Program("cleanup", ("/usr/bin/python3", "-m", "orchestrator", "cleanup"), "/ws", {}),
    ]
    return render_supervisord_conf(plan, layout, RenderOptions(username="u", password="p", wrapper=WRAPPER), programs)


WRAPPER = ("/usr/bin/python3", "-I", "-S", "/opt/orchestrator/machine/pdeath.py", "--")


def test_instances_and_batch_programs_go_through_the_pdeath_wrapper_and_the_monitor_does_not() -> None:
    import shlex

    parser = configparser.RawConfigParser()
    parser.read_string(render_two())
    for sec in ("program:comfyui_gpu0", "program:comfyui_gpu1", "program:cleanup"):
        argv = shlex.split(parser.get(sec, "command"))
        assert tuple(argv[: len(WRAPPER)]) == WRAPPER, sec
    assert shlex.split(parser.get("program:monitor", "command"))[:3] == ["/usr/bin/python3", "-m", "orchestrator"]


def test_render_matches_the_golden_file() -> None:
    text = render_two()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_render_parses_back_with_configparser_and_has_every_program() -> None:
    parser = configparser.RawConfigParser()
    parser.read_string(render_two())
    assert parser.get("unix_http_server", "file") == "/ws/.orchestrator/supervisor.sock"
    assert parser.get("unix_http_server", "chmod") == "0700"
    assert "inet_http_server" not in parser.sections()
    for n in (0, 1):
        sec = f"program:comfyui_gpu{n}"
        assert parser.get(sec, "directory") == "/ws/ComfyUI"
        assert parser.get(sec, "stopasgroup") == "true"
        assert parser.get(sec, "killasgroup") == "true"
        assert parser.get(sec, "stdout_logfile") == f"/ws/comfyui_gpu{n}/logs/output.log"
        assert f"--port {8188 + n}" in parser.get(sec, "command")
    assert parser.has_section("program:monitor")


@pytest.mark.parametrize(
    "value", ["plain", "a,b,c", 'say "hi" now', "it's ok", "100%", "%(here)s", "a=b", "x y", "/p:/q", "€uro"]
)
def test_environment_values_survive_supervisords_parser(value: str) -> None:
    rendered = render_environment({"K": value, "OTHER": "1"})
    # supervisord expands %(…)s first (%% → %), then parses KEY=value pairs.
    expanded = rendered % {}
    assert dict_of_key_value_pairs(expanded) == {"K": value, "OTHER": "1"}


@pytest.mark.parametrize("value", ["both ' and \"", "line\nbreak", '"quoted"'])
def test_unrepresentable_environment_values_are_refused_by_name(value: str) -> None:
    with pytest.raises(PlanError, match="environment variable K"):
        render_environment({"K": value})


def test_command_with_spaces_and_percent_round_trips() -> None:
    import shlex

    from orchestrator.core.render import render_command

    argv = ["/opt/my python/bin/python", "main.py", "--x", "50%", "a'b"]
    assert shlex.split(render_command(argv) % {}) == argv


def test_an_event_listener_renders_as_one_that_supervisord_accepts(tmp_path: Path) -> None:
    from supervisor.options import ServerOptions

    s = load_settings({"MOCK_GPU": "1", "NUM_GPUS": "1", "ROOT": str(tmp_path), "COMFY_PYTHON": "/usr/bin/python3"})
    plan = build_plan(s, MockBackend(1, 2**30).list_gpus())
    watchdog = Program("watchdog", ("/usr/bin/python3", "-m", "w"), str(tmp_path), {}, events="TICK_5", priority=60)
    text = render_supervisord_conf(plan, Layout(tmp_path), RenderOptions(username="u", password="p"), [watchdog])
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    sec = "eventlistener:watchdog"
    assert parser.get(sec, "events") == "TICK_5"
    assert parser.get(sec, "stderr_logfile") == str(tmp_path / "logs" / "watchdog.log")
    assert not parser.has_option(sec, "redirect_stderr")  # stdout is the listener protocol
    conf = tmp_path / "supervisord.conf"
    conf.write_text(text)
    (tmp_path / "logs").mkdir()
    (tmp_path / ".orchestrator").mkdir()
    (tmp_path / "comfyui_gpu0" / "logs").mkdir(parents=True)
    options = ServerOptions()
    options.realize(["-c", str(conf)])  # supervisord's own parser: raises on a section it refuses
    assert "watchdog" in {g.name for g in options.process_group_configs}
