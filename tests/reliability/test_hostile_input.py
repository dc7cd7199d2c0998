"""Hostile and broken input: every case is a clear one-line error or a success, nothing else.

Property-based (hypothesis) over config_nodes.json, comfy_dir_config.yaml, static-models.json,
the models manifest and every setting, in-process for speed; the named cases (path traversal,
git option and transport injection, refs starting with '-', YAML alias bombs, 10 MB files,
deep nesting) run the real CLI in a subprocess under a memory limit and a deadline. For every
case: no traceback, exit 0 or a non-zero exit with one line, nothing written outside $ROOT, and
nothing changed under $ROOT (apart from the CLI's own log file) when the input is invalid.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main as cli
from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import FIELDS, load_settings
from orchestrator.provision.git import urls as git_urls
from orchestrator.provision.models import manifest
from orchestrator.provision.models import tree as modeltree
from orchestrator.provision.nodes import config as nodes_config

SHIPPED = Path(__file__).resolve().parents[2] / "shared"
# A file that a successful command injection would create. It must never exist.
PWNED = Path(tempfile.gettempdir()) / f"orchestrator-hostile-pwned-{os.getpid()}"
FAST = settings(
    max_examples=100, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FAST, max_examples=30)


# ---------------------------------------------------------------- helpers
def assert_clear(message: str) -> None:
    """A user-facing error: one line, no traceback."""
    assert message.strip(), "an empty error"
    assert "\n" not in message.strip(), f"not one line: {message[:500]!r}"
    assert "Traceback" not in message


def snapshot(top: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """Every path under ``top`` with its kind, mode and content hash (symlinks: their target)."""
    out: dict[str, tuple[Any, ...]] = {}
    if not top.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            p = here / name
            if p in skip:
                continue
            st_ = p.lstat()
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                out[str(p)] = ("dir", st_.st_mode)
            else:
                out[str(p)] = ("file", st_.st_mode, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def run_cli(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """``orchestrator <args>`` in this process (fast enough for hypothesis). Any exception escapes.

    ``cli.main`` undoes its own logging set-up on return, so nothing needs restoring here."""
    out, err = io.StringIO(), io.StringIO()
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    with mock.patch.dict(os.environ, {**base, **env}, clear=True), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(args)
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def check_outcome(code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, (out + err)[-2000:]
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"exit {code} without exactly one error line: {err[-2000:]!r}"
        assert_clear(errors[0])


def orchestrator(args: list[str], env: dict[str, str], *, timeout: float = 120,
                 memory: int = 1 << 30) -> tuple[subprocess.CompletedProcess[str] | None, float]:
    """The real CLI in a subprocess with an address-space limit; (None, seconds) when it hangs."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CIVITAI_", "MODELS_", "ORCHESTRATOR_"))}
    full.update(env)
    start = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "orchestrator", *args], env=full, capture_output=True, text=True,
                           timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - start
    return r, time.monotonic() - start


def assert_clear_exit(r: subprocess.CompletedProcess[str] | None, took: float,
                      *, ok: tuple[int, ...] = (0, 2)) -> None:
    """A clear exit: answered (the subprocess timeout only tells a hang; speed is not measured
    here), no traceback, an allowed code, and one clear error line."""
    assert r is not None, f"hung: no answer within {took:.0f}s"
    assert "Traceback" not in r.stdout + r.stderr, (r.stderr or r.stdout)[-1500:]
    assert r.returncode in ok, (r.returncode, r.stderr[-1500:])
    if r.returncode:
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, r.stderr[-1500:]
        assert_clear(errors[0])


@pytest.fixture
def box(tmp_path: Path) -> dict[str, Path]:
    """ROOT, a folder for the hostile inputs (outside ROOT) and the folder around both."""
    root = tmp_path / "root"
    (root / "shared").mkdir(parents=True)
    (root / "shared" / "comfy_dir_config.yaml").write_text((SHIPPED / "comfy_dir_config.yaml").read_text())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return {"root": root, "inputs": inputs, "outside": tmp_path}


class Sandbox:
    """Snapshots of ROOT and of everything around it, to compare after a command."""

    def __init__(self, b: dict[str, Path]) -> None:
        self.b = b
        self.logs = b["root"] / "logs"
        self.take()

    def take(self) -> None:
        self.inside = snapshot(self.b["root"], skip=(self.logs,))
        self.around = snapshot(self.b["outside"], skip=(self.b["root"], self.b["inputs"]))

    def assert_nothing_outside(self) -> None:
        assert snapshot(self.b["outside"], skip=(self.b["root"], self.b["inputs"])) == self.around
        assert not PWNED.exists(), "a command injection ran"

    def assert_root_unchanged(self) -> None:
        after = snapshot(self.b["root"], skip=(self.logs,))
        changed = sorted(set(after.items()) ^ set(self.inside.items()))
        assert not changed, changed[:10]

    def assert_untouched(self) -> None:
        """Nothing changed in ROOT nor around it."""
        self.assert_root_unchanged()
        self.assert_nothing_outside()


def input_file(box: dict[str, Path], name: str, doc: Any, dump: Callable[[Any], str]) -> tuple[Path, Sandbox]:
    """Write fuzzed ``doc`` to ``inputs/name`` (a string as it is, anything else through ``dump``),
    then snapshot ROOT and around it: (the file, the sandbox)."""
    path = box["inputs"] / name
    path.write_text(doc if isinstance(doc, str) else dump(doc))
    return path, Sandbox(box)


def dry_run_on(sandbox: Sandbox, args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run a dry-run (or read-only) CLI command on fuzzed input: it succeeds or exits 2 in one clear
    line, and writes nothing in ROOT nor around it; its (code, stdout, stderr)."""
    code, out, err = run_cli(args, env)
    check_outcome(code, out, err)
    assert code in (0, 2), (code, err)
    sandbox.assert_untouched()
    return code, out, err


# ---------------------------------------------------------------- strategies
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8,
)

HOSTILE_NAMES = ["../x", "/etc", "a/b", ".", "..", "-rf", ".hidden", "__pycache__", "a\\b", "x\x00y", "\n",
                 " ", "ok-node", "ComfyUI-Manager", "é-node", "x" * 300]
HOSTILE_URLS = [
    f"ext::sh -c touch% {PWNED}", f"--upload-pack=touch {PWNED}", f"-oProxyCommand=touch {PWNED}",
    f"git clone --upload-pack=touch {PWNED}", f"git clone -oProxyCommand=touch {PWNED}",
    "git clone https://github.com/a/b.git", "https://github.com/a/b.git", "http://example.com/a.git",
    "git://example.com/a.git", "file:///etc", "/etc", "relative/path", "ssh://git@github.com/a/b.git",
    "git@github.com:a/b.git", "https://user:pass@github.com/a/b.git", "fd::17", "", " ", "https://github.com/a b",
    f"ssh://-oProxyCommand=touch%20{PWNED}/x",
]
HOSTILE_REFS = ["-x", f"--upload-pack=touch {PWNED}", "main", "a..b", "refs/heads/x", "@{-1}", "x.lock", "HEAD",
                "deadbeef", "DEADBEEF00", "-abcdef1", "g" * 40, "0" * 40, "", "a b", "x~1", "feature/x"]

# Mostly plausible values (so that many configs are valid and the safety of what passes is
# checked), some hostile ones, some arbitrary text.
safe_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_.-]{0,12}\Z")
safe_urls = st.sampled_from(["https://github.com/a/b.git", "git@github.com:a/b.git", "ssh://git@host.example/x.git",
                             "file:///tmp/x", "/srv/git/x.git", "git clone https://github.com/c/d", " https://e.com/f "])
safe_refs = st.from_regex(r"\A[a-z][a-z0-9_-]{0,8}(/[a-z0-9_-]{1,6})?\Z")
safe_commits = st.from_regex(r"\A[0-9a-fA-F]{7,40}\Z")


def mostly(safe: st.SearchStrategy[Any], hostile: list[Any], size: int = 12) -> st.SearchStrategy[Any]:
    return st.one_of(safe, safe, safe, st.sampled_from(hostile), st.text(max_size=size))


node_entry = st.fixed_dictionaries(
    {
        "name": mostly(safe_names, HOSTILE_NAMES, 16),
        "url": mostly(safe_urls, HOSTILE_URLS, 24),
    },
    optional={
        "branch": st.one_of(mostly(safe_refs, HOSTILE_REFS), st.none(), st.integers()),
        "commit": st.one_of(mostly(safe_commits, HOSTILE_REFS), st.none()),
        "recursive": st.one_of(st.booleans(), st.booleans(), json_scalars),
        "requirements": st.one_of(st.booleans(), st.booleans(), json_scalars),
        "env": st.one_of(
            st.dictionaries(
                mostly(st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,8}\Z"), ["1A", "A-B", "A\n", ""], 5),
                st.one_of(st.sampled_from(["${HF_TOKEN}", "${X:-d}", "a'b\"c", "line\nbreak", "x\x00y"]),
                          json_scalars, st.lists(st.integers(), max_size=2)),
                max_size=3,
            ),
            json_scalars,
        ),
        "custom_script": st.one_of(st.none(), st.text(max_size=10), st.integers()),
        "install_order": st.one_of(st.integers(), st.integers(), st.text(max_size=3), st.floats(allow_nan=False)),
        "unknown": json_values,
    },
)
nodes_configs = st.one_of(
    st.fixed_dictionaries(
        {"custom_nodes": st.lists(st.one_of(node_entry, node_entry, node_entry, json_values), max_size=3)},
        optional={"other": json_values},
    ),
    json_values,
)

FOLDERS = ["models/checkpoints/", "../x", "../../etc", "/etc", "~", "~/x", "a\\b", "a/../..", "x/./y",
           "ok\nok2", "ok\n../bad", "", " ", "a\x00b", "models/SD15/LCM/"]
# Relative or /workspace base paths only: absolute paths elsewhere (and '..') are the named cases below.
BASES = ["/workspace/ComfyUI", "/workspace", "ComfyUI", "relative/dir", "", " ", 3, None, ["a"]]
comfy_sections = st.dictionaries(
    st.one_of(st.sampled_from(["checkpoints", "loras", "custom_nodes", "is_default", "../x", "a b", "", "1"]),
              st.text(max_size=8)),
    st.one_of(st.sampled_from(FOLDERS), st.text(max_size=12), json_scalars),
    max_size=5,
)
comfy_configs = st.one_of(
    st.dictionaries(
        st.one_of(st.just("comfyui"), st.text(max_size=6)),
        st.one_of(
            st.builds(lambda base, body: {"base_path": base, **body}, st.sampled_from(BASES), comfy_sections),
            json_values,
        ),
        max_size=3,
    ),
    json_values,
)

static_configs = st.one_of(
    st.fixed_dictionaries(
        {"symlinks": st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {"source": st.one_of(st.sampled_from(["a.safetensors", "../../etc/passwd", "/etc/passwd",
                                                          "x/../../y", "sub/b.ckpt", ""]), json_scalars),
                     "target": st.one_of(st.sampled_from(["checkpoints/a.safetensors", "../../evil", "/tmp/evil",
                                                          "loras/../../../evil", "models", "x"]), json_scalars)},
                    optional={"description": json_scalars},
                ),
                json_values,
            ),
            max_size=4,
        )},
        optional={"no_index": json_values},
    ),
    json_values,
)

SAFE_DESTS = ["checkpoints", "checkpoints/SD15", "loras/style", "vae"]
HOSTILE_DESTS = ["../x", "/abs", "loras/../..", "unknown_category", "", "~", "a\\b", "./x"]
HOSTILE_FILENAMES = ["../x.safetensors", "a/b.safetensors", "..", ".", "x\x00y", "x" * 300, "a\\b", ""]
model_optional = {
    "filename": mostly(st.from_regex(r"\A[a-z][a-z0-9_.-]{0,12}\Z"), HOSTILE_FILENAMES),
    "sha256": st.one_of(st.from_regex(r"\A[0-9a-f]{64}\Z"), st.sampled_from(["g" * 64, "A" * 64, ""]), json_scalars),
    "size": st.one_of(st.integers(min_value=0), st.integers(), json_scalars),
    "optional": st.one_of(st.booleans(), json_scalars),
    "when": st.one_of(st.sampled_from(["before_start", "background", "never"]), json_scalars),
    "name": st.one_of(st.text(min_size=1, max_size=8), json_scalars),
}
model_dest = mostly(st.sampled_from(SAFE_DESTS), HOSTILE_DESTS)
model_entry = st.one_of(
    st.fixed_dictionaries(
        {"url": mostly(st.sampled_from(["https://example.invalid/a.safetensors", "http://x.invalid/b.bin",
                                        "https://example.invalid/f?token=t"]), ["ftp://x/y", "http://x/../../b", ""]),
         "dest": model_dest},
        optional=model_optional,
    ),
    st.fixed_dictionaries(
        {"hf": mostly(st.sampled_from(["owner/repo", "owner/repo/x.safetensors", "o/r/sub/dir/y.bin"]),
                      ["owner/repo/../../x", "../repo/x", "owner/repo/sub/..", "owner", "/owner/repo"]),
         "dest": model_dest},
        optional={**model_optional, "revision": mostly(st.sampled_from(["main", "v1.0"]), ["../x", "a b", "/x"])},
    ),
    st.fixed_dictionaries(
        {"civitai": st.one_of(st.integers(min_value=1), st.integers(), st.sampled_from(["123", "-1", "1e3"])),
         "dest": model_dest},
        optional=model_optional,
    ),
    st.fixed_dictionaries(  # anything goes: several sources, none, unknown keys
        {"dest": st.one_of(model_dest, json_scalars)},
        optional={"url": json_scalars, "hf": json_scalars, "civitai": json_scalars, "bogus": json_scalars,
                  **model_optional},
    ),
)
manifests = st.one_of(
    st.fixed_dictionaries({"models": st.one_of(st.lists(st.one_of(model_entry, json_values), max_size=4),
                                               json_values)}),
    json_values,
)


# ---------------------------------------------------------------- config_nodes.json
@FAST
@given(config=nodes_configs)
def test_any_config_nodes_json_is_a_clear_error_or_a_config_whose_every_field_is_safe(config: Any) -> None:
    try:
        parsed = nodes_config.parse_config_text(json.dumps(config), Path("config_nodes.json"))
    except ConfigError as exc:
        assert_clear(str(exc))
        return
    for spec in parsed.nodes:
        assert nodes_config.name_problem(spec.name) is None
        assert Path(spec.name).name == spec.name
        assert spec.name not in {".", ".."}
        assert "/" not in spec.name
        assert git_urls.url_problem(spec.url) is None
        assert not spec.url.startswith("-")
        assert "::" not in spec.url
        assert spec.branch is None or not spec.branch.startswith("-")
        assert spec.commit is None or (not spec.commit.startswith("-") and all(c in "0123456789abcdef" for c in spec.commit))


@FEW
@given(config=st.one_of(nodes_configs, st.text(max_size=40)))
def test_nodes_validate_and_a_dry_run_sync_end_in_one_line_or_success_and_write_nothing(
    config: Any, box: dict[str, Path]
) -> None:
    path, sandbox = input_file(box, "config_nodes.json", config, json.dumps)
    env = {"ROOT": str(box["root"])}
    for args in (["nodes", "validate", str(path)], ["nodes", "sync", "--dry-run", "--file", str(path)]):
        dry_run_on(sandbox, args, env)  # a dry run writes nothing, valid input or not


# ---------------------------------------------------------------- comfy_dir_config.yaml
@FAST
@given(config=st.one_of(comfy_configs, st.text(max_size=40)))
def test_any_comfy_dir_config_is_a_clear_error_or_a_tree_that_stays_inside_root(
    config: Any, box: dict[str, Path]
) -> None:
    root = box["root"]
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    (root / "shared" / "comfy_dir_config.yaml").write_text(text)
    sandbox = Sandbox(box)
    settings_ = load_settings({"ROOT": str(root)})
    try:
        tree = modeltree.prepare(settings_, Layout(root))
    except ConfigError as exc:
        assert_clear(str(exc))
        sandbox.assert_untouched()
        return
    for folder in tree.folders:
        assert root in folder.resolve().parents, f"{folder} is outside ROOT"
    sandbox.assert_nothing_outside()


# ---------------------------------------------------------------- static-models.json
@FAST
@given(static=static_configs)
def test_any_static_models_json_is_a_clear_error_or_links_that_stay_inside_root(
    static: Any, box: dict[str, Path]
) -> None:
    root = box["root"]
    sd = root / "shared" / "sd_models"
    sd.mkdir(exist_ok=True)
    (sd / "a.safetensors").write_text("weights")
    (root / "shared" / "static-models.json").write_text(json.dumps(static))
    sandbox = Sandbox(box)
    try:
        tree = modeltree.prepare(load_settings({"ROOT": str(root)}), Layout(root))
    except ConfigError as exc:
        assert_clear(str(exc))
        sandbox.assert_untouched()
        return
    for link in tree.links:
        assert root in link.target.parent.resolve().parents or link.target.parent.resolve() == root.resolve()
        assert sd.resolve() in link.source.resolve().parents
    sandbox.assert_nothing_outside()


# ---------------------------------------------------------------- the models manifest
@FAST
@given(doc=manifests)
def test_any_manifest_is_a_clear_error_or_entries_with_safe_destinations_and_file_names(doc: Any) -> None:
    try:
        entries = manifest.parse_manifest(yaml.safe_dump(doc))
    except ConfigError as exc:
        assert_clear(str(exc))
        return
    for e in entries:
        assert manifest.check_relative(e.dest) is None
        assert ".." not in e.dest.split("/")
        assert e.filename is None or manifest.check_filename(e.filename) is None
        if e.kind == "hf":
            assert ".." not in e.source.split("/")


@FEW
@given(doc=st.one_of(manifests, st.text(max_size=40)))
def test_models_sync_dry_run_on_any_manifest_ends_in_one_line_or_success_and_writes_nothing(
    doc: Any, box: dict[str, Path]
) -> None:
    path, sandbox = input_file(box, "models.yaml", doc, yaml.safe_dump)
    code, out, _ = dry_run_on(sandbox, ["models", "sync", "--dry-run", "--json"],
                              {"ROOT": str(box["root"]), "MODELS_MANIFEST": str(path)})
    if code == 0:
        json.loads(out)


# ---------------------------------------------------------------- settings
# Values an environment can hold (no NUL). A leading '~' is left to the named case below.
env_text = st.text(st.characters(exclude_characters="\x00", codec="utf-8"), max_size=30).filter(
    lambda s: not s.strip().startswith("~")
)
SETTING_SAMPLES = ["", " ", "-1", "0", "1", "65536", "1e999", "9" * 5000, "nan", "inf", "true", "yes", "auto",
                   "15m", "0s", "-5s", "1.5.5", "'", '"', "a,b,,c", "0.0.0.0", "::", "[::1]", "é", "${HOME}",
                   "/", "relative", "$(touch x)", "`id`", "\n", "\t1\t"]


SECRET_MARK = "S3CR3T-"


def setting_value(secret: bool) -> st.SearchStrategy[str]:
    value = st.one_of(st.sampled_from(SETTING_SAMPLES), env_text)
    return value.map(lambda v: SECRET_MARK + v) if secret else value


@FAST
@given(values=st.fixed_dictionaries({}, optional={f.env: setting_value(f.secret) for f in FIELDS}))
def test_any_setting_value_loads_or_is_a_config_error_naming_the_variable(values: dict[str, str]) -> None:
    error = ""
    try:
        s = load_settings(values)
    except ConfigError as exc:
        error = str(exc)
    if error:
        assert_clear(error)
        assert any(name in error for name in values), error
        assert SECRET_MARK not in error  # a secret's value is never echoed
        return
    # what `orchestrator config` prints can be built, and shows no secret
    assert SECRET_MARK not in json.dumps(s.effective(), default=str)


@FAST
@given(doc=st.dictionaries(st.one_of(st.sampled_from([f.env for f in FIELDS] + ["unknown", "root", "TEST_GPUS"]),
                                     st.text(max_size=8)),
                           st.one_of(json_scalars, st.lists(json_scalars, max_size=3),
                                     st.dictionaries(st.text(max_size=3), json_scalars, max_size=2)),
                           max_size=4))
def test_any_settings_file_loads_or_is_a_config_error_naming_the_file(doc: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    text = yaml.safe_dump(doc)
    if "\x00" in text or any(str(v).strip().startswith("~") for v in doc.values()):
        return  # NUL and '~user' values are the named cases below
    path.write_text(text)
    try:
        load_settings({}, config_file=path)
    except ConfigError as exc:
        assert_clear(str(exc))


# ---------------------------------------------------------------- named cases: the real CLI
NAMED_NODES = {
    "name ../x": {"name": "../x", "url": "https://github.com/a/b.git"},
    "name /etc": {"name": "/etc", "url": "https://github.com/a/b.git"},
    "name a/b": {"name": "a/b", "url": "https://github.com/a/b.git"},
    "name .": {"name": ".", "url": "https://github.com/a/b.git"},
    "url ext::": {"name": "u1", "url": f"ext::sh -c touch% {PWNED}"},
    "url --upload-pack": {"name": "u2", "url": f"--upload-pack=touch {PWNED}"},
    "url -oProxyCommand": {"name": "u3", "url": f"-oProxyCommand=touch {PWNED}"},
    "url git clone --upload-pack": {"name": "u4", "url": f"git clone --upload-pack=touch {PWNED}"},
    "branch starting with -": {"name": "r1", "url": "https://github.com/a/b.git", "branch": f"--upload-pack=touch {PWNED}"},
    "commit starting with -": {"name": "r2", "url": "https://github.com/a/b.git", "commit": "-abcdef1"},
}


@pytest.mark.parametrize("case", sorted(NAMED_NODES))
def test_named_hostile_node_entries_are_refused_before_any_git_or_write(case: str, box: dict[str, Path]) -> None:
    path = box["inputs"] / "config_nodes.json"
    path.write_text(json.dumps({"custom_nodes": [NAMED_NODES[case]]}))
    sandbox = Sandbox(box)
    env = {"ROOT": str(box["root"])}
    for args in (["nodes", "validate", str(path)], ["nodes", "sync", "--file", str(path)]):
        code, out, err = run_cli(args, env)
        check_outcome(code, out, err)
        assert code == 2, (case, out, err)
        assert "custom_nodes[0]" in err
        sandbox.assert_untouched()


def test_every_named_hostile_node_entry_is_named_in_one_line_by_the_real_cli(box: dict[str, Path]) -> None:
    path = box["inputs"] / "config_nodes.json"
    path.write_text(json.dumps({"custom_nodes": list(NAMED_NODES.values())}))
    sandbox = Sandbox(box)
    for args in (["nodes", "validate", str(path)], ["nodes", "sync", "--file", str(path)]):
        r, took = orchestrator(args, {"ROOT": str(box["root"])})
        assert_clear_exit(r, took, ok=(2,))
        assert r is not None
        for i in range(len(NAMED_NODES)):
            assert f"custom_nodes[{i}]" in r.stderr
    sandbox.assert_untouched()


def test_an_ssh_url_whose_host_is_an_option_never_runs_a_command(box: dict[str, Path]) -> None:
    # The validator lets ssh://-oProxyCommand=… through; git itself refuses such a host name.
    path = box["inputs"] / "config_nodes.json"
    path.write_text(json.dumps({"custom_nodes": [{"name": "u5", "url": f"ssh://-oProxyCommand=touch%20{PWNED}/x"}]}))
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    r, took = orchestrator(["nodes", "sync", "--file", str(path)],
                           {"ROOT": str(box["root"]), "SSH_PRIVATE_KEY": key, "GIT_TIMEOUT": "10"})
    assert r is not None, f"hung: no answer within {took:.0f}s"
    assert r.returncode == 1
    assert "FAILED: u5" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert not PWNED.exists()
    assert "BEGIN OPENSSH" not in r.stdout + r.stderr


@pytest.mark.parametrize(
    ("field", "value"),
    [("filename", "../x.safetensors"), ("filename", "a/b.safetensors"), ("filename", ".."),
     ("dest", "../escape"), ("dest", "/etc"), ("dest", "checkpoints/../../x"), ("hf", "owner/repo/../../x")],
)
def test_named_model_paths_with_dotdot_or_slash_are_refused_in_one_line(
    field: str, value: str, box: dict[str, Path]
) -> None:
    entry: dict[str, Any] = {"url": "https://example.invalid/x.safetensors", "dest": "checkpoints"}
    if field == "hf":
        entry = {"hf": value, "dest": "checkpoints"}
    else:
        entry[field] = value
    path = box["inputs"] / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    sandbox = Sandbox(box)
    for args in (["models", "sync", "--dry-run", "--json"], ["models", "sync"]):
        code, out, err = run_cli(args, {"ROOT": str(box["root"]), "MODELS_MANIFEST": str(path)})
        check_outcome(code, out, err)
        assert code == 2, (field, value, out, err)
        sandbox.assert_untouched()


# ---------------------------------------------------------------- YAML alias bombs
# Seconds before a bomb counts as a hang (python start-up included). Refused, a bomb is an error
# in well under a second; walked, 9**10 leaves take far longer than this even on a fast machine.
BOMB_TIMEOUT = 120.0


def alias_bomb(levels: int = 10) -> str:
    """A "billion laughs" YAML flow sequence: 9**10 leaves when expanded, a few hundred bytes on disk."""
    names = "abcdefghijklmnop"
    parts = ["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        parts.append(f"&{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


def test_an_alias_bomb_in_comfy_dir_config_is_a_fast_clear_error(box: dict[str, Path]) -> None:
    (box["root"] / "shared" / "comfy_dir_config.yaml").write_text(
        f"comfyui:\n  base_path: /workspace/ComfyUI\n  checkpoints: {alias_bomb()}\n"
    )
    sandbox = Sandbox(box)
    r, took = orchestrator(["models", "sync", "--dry-run"], {"ROOT": str(box["root"])}, timeout=BOMB_TIMEOUT)
    assert_clear_exit(r, took, ok=(2,))
    sandbox.assert_root_unchanged()


def test_an_alias_bomb_in_the_models_manifest_is_a_fast_clear_error(box: dict[str, Path]) -> None:
    path = box["inputs"] / "models.yaml"
    path.write_text(f"models:\n  - url: https://example.invalid/x.safetensors\n    dest: {alias_bomb()}\n")
    r, took = orchestrator(["models", "sync", "--dry-run", "--json"],
                           {"ROOT": str(box["root"]), "MODELS_MANIFEST": str(path)}, timeout=BOMB_TIMEOUT)
    assert_clear_exit(r, took, ok=(2,))


def test_an_alias_bomb_in_the_settings_file_is_a_fast_clear_error(box: dict[str, Path]) -> None:
    path = box["inputs"] / "settings.yaml"
    path.write_text(f"GPUS: {alias_bomb()}\n")
    r, took = orchestrator(["--config", str(path), "config"], {"ROOT": str(box["root"])}, timeout=BOMB_TIMEOUT)
    assert_clear_exit(r, took, ok=(2,))


# ---------------------------------------------------------------- deep nesting (a recursion bomb)
# In-process: an escaping RecursionError is the failure (the CLI would print its traceback).
DEEP = 100_000


def run_cli_shallow(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """run_cli, with an escaping RecursionError turned into a short failure (pytest would format 1000 frames)."""
    try:
        return run_cli(args, env)
    except RecursionError:
        raise AssertionError(f"orchestrator {' '.join(args)}: RecursionError escaped (a traceback)") from None


def test_deeply_nested_config_nodes_json_is_a_clear_error(box: dict[str, Path]) -> None:
    path = box["inputs"] / "config_nodes.json"
    path.write_text("[" * DEEP + "]" * DEEP)
    code, out, err = run_cli_shallow(["nodes", "validate", str(path)], {"ROOT": str(box["root"])})
    check_outcome(code, out, err)
    assert code == 2


def test_deeply_nested_static_models_json_is_a_clear_error(box: dict[str, Path]) -> None:
    (box["root"] / "shared" / "static-models.json").write_text('{"symlinks": ' + "[" * DEEP + "]" * DEEP + "}")
    code, out, err = run_cli_shallow(["models", "sync"], {"ROOT": str(box["root"])})  # (a dry run skips it)
    check_outcome(code, out, err)
    assert code == 2


@pytest.mark.parametrize("which", ["comfy_dir_config.yaml", "models.yaml", "settings file"])
def test_deeply_nested_yaml_is_a_clear_error(which: str, box: dict[str, Path]) -> None:
    deep = "[" * 800 + "]" * 800  # past the recursion limit (PyYAML slows down quadratically with depth)
    env = {"ROOT": str(box["root"])}
    args = ["models", "sync", "--dry-run"]
    if which == "comfy_dir_config.yaml":
        (box["root"] / "shared" / which).write_text(f"comfyui: {deep}\n")
    elif which == "models.yaml":
        (box["inputs"] / which).write_text(f"models: {deep}\n")
        env["MODELS_MANIFEST"] = str(box["inputs"] / which)
    else:
        (box["inputs"] / "s.yaml").write_text(f"GPUS: {deep}\n")
        args = ["--config", str(box["inputs"] / "s.yaml"), "config"]
    code, out, err = run_cli_shallow(args, env)
    check_outcome(code, out, err)
    assert code == 2


# ---------------------------------------------------------------- 10 MB files
TEN_MB = 10 * 1024 * 1024


def test_ten_megabyte_json_inputs_end_in_success_or_a_short_clear_error_within_seconds(box: dict[str, Path]) -> None:
    root, inputs = box["root"], box["inputs"]
    filler = "x" * TEN_MB
    ok_nodes = inputs / "ok_nodes.json"  # 10 MB in an unknown field: a warning
    ok_nodes.write_text(json.dumps({"custom_nodes": [], "notes": filler}))
    bad_nodes = inputs / "bad_nodes.json"  # a 10 MB url: an error that quotes 160 characters of it
    bad_nodes.write_text(json.dumps({"custom_nodes": [{"name": "n", "url": "ext::" + filler}]}))
    (root / "shared" / "static-models.json").write_text(json.dumps({"symlinks": [], "no_index": [filler]}))
    cases = [
        (["nodes", "validate", str(ok_nodes)], (0,)),
        (["nodes", "validate", str(bad_nodes)], (2,)),
        (["models", "sync"], (0,)),  # reads static-models.json
    ]
    for args, ok in cases:
        r, took = orchestrator(args, {"ROOT": str(root)})
        assert_clear_exit(r, took, ok=ok)
        assert r is not None
        assert len(r.stderr) < 4096, f"{args}: a {len(r.stderr)}-byte error"


TEN_MB_COMMENT = ("#" + "x" * 1023 + "\n") * (TEN_MB // 1024)


@pytest.mark.parametrize("which", ["comfy_dir_config.yaml", "models.yaml", "settings file"])
def test_ten_megabyte_yaml_inputs_end_in_success_or_a_clear_error_within_seconds(
    which: str, box: dict[str, Path]
) -> None:
    # Either is fine: parsed (PyYAML's pure-Python loader reads ~1 MB/s here), or refused as too
    # large for a config file (orchestrator.yamlfile.MAX_BYTES).
    root, inputs = box["root"], box["inputs"]
    env = {"ROOT": str(root)}
    args = ["models", "sync", "--dry-run", "--json"]
    if which == "comfy_dir_config.yaml":
        (root / "shared" / which).write_text(TEN_MB_COMMENT + (SHIPPED / which).read_text())
    elif which == "models.yaml":
        (inputs / which).write_text(TEN_MB_COMMENT + "models: []\n")
        env["MODELS_MANIFEST"] = str(inputs / which)
    else:
        (inputs / "s.yaml").write_text(TEN_MB_COMMENT + "LOG_LEVEL: warning\n")
        args = ["--config", str(inputs / "s.yaml"), "config"]
    r, took = orchestrator(args, env, timeout=240)
    assert_clear_exit(r, took, ok=(0, 2))
    assert r is not None
    print(f"\n10 MB {which}: exit {r.returncode} in {took:.1f} s: {(r.stderr.strip() or 'ok')[:120]}")


def test_an_error_about_a_huge_value_stays_short(box: dict[str, Path]) -> None:
    path = box["inputs"] / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"url": "https://e.invalid/a", "dest": "checkpoints",
                                                "filename": "a" * 1_000_000}]}))
    code, out, err = run_cli(["models", "sync", "--dry-run"], {"ROOT": str(box["root"]), "MODELS_MANIFEST": str(path)})
    assert code == 2
    assert len(err) < 4096, f"a {len(err)}-byte error line"


def test_an_error_about_thousands_of_bad_entries_stays_short(box: dict[str, Path]) -> None:
    path = box["inputs"] / "config_nodes.json"
    path.write_text(json.dumps({"custom_nodes": [{"name": "../x", "url": "ext::sh"}] * 20_000}))
    code, out, err = run_cli(["nodes", "validate", str(path)], {"ROOT": str(box["root"])})
    assert code == 2
    assert len(err) < 4096, f"a {len(err)}-byte error line"


@pytest.mark.slow
def test_a_ten_megabyte_config_nodes_json_with_seventy_thousand_nodes_validates_within_a_minute(
    box: dict[str, Path]
) -> None:
    path = box["inputs"] / "config_nodes.json"
    entries = [{"name": f"node-{i:06d}", "url": f"https://github.com/example/node-{i:06d}.git", "branch": "main",
                "requirements": True, "env": {"HF_TOKEN": "${HF_TOKEN}"}} for i in range(70_000)]
    path.write_text(json.dumps({"custom_nodes": entries}))
    assert path.stat().st_size > TEN_MB
    r, took = orchestrator(["nodes", "validate", str(path)], {"ROOT": str(box["root"])}, timeout=120)
    assert_clear_exit(r, took, ok=(0,))
    print(f"\n70 000-node config_nodes.json ({path.stat().st_size / 1e6:.1f} MB) validated in {took:.1f} s")


# ---------------------------------------------------------------- settings: named cases
@pytest.mark.parametrize("name", ["ROOT", "MODELS_MANIFEST"])
def test_a_path_setting_naming_an_unknown_home_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({name: "~no-such-user-here/x"})


def test_a_nul_byte_in_a_settings_file_value_is_a_config_error(box: dict[str, Path]) -> None:
    path = box["inputs"] / "settings.yaml"
    path.write_text(f'ROOT: "{box["root"]}\\0x"\n')
    r, took = orchestrator(["--config", str(path), "status"], {})
    assert_clear_exit(r, took, ok=(2,))


# ---------------------------------------------------------------- writes outside ROOT
def models_sync_with_base_path(box: dict[str, Path], base: str | Path) -> int:
    """``models sync`` with comfy_dir_config's base_path set to ``base``: it ends in one clear line
    or success and creates nothing outside ROOT; its exit code."""
    (box["root"] / "shared" / "comfy_dir_config.yaml").write_text(
        f"comfyui:\n  base_path: {base}\n  checkpoints: models/checkpoints/\n"
    )
    sandbox = Sandbox(box)
    code, out, err = run_cli(["models", "sync"], {"ROOT": str(box["root"])})
    check_outcome(code, out, err)
    sandbox.assert_nothing_outside()
    return code


@pytest.mark.parametrize("base", ["../outside", "/workspace/../outside"])
def test_a_base_path_climbing_out_of_root_is_refused(base: str, box: dict[str, Path]) -> None:
    assert models_sync_with_base_path(box, base) == 2


def test_an_absolute_base_path_outside_root_creates_nothing_outside_root(box: dict[str, Path]) -> None:
    models_sync_with_base_path(box, box["outside"] / "elsewhere")


def test_a_model_folder_name_longer_than_the_filesystem_allows_is_a_clear_error_before_any_write(
    box: dict[str, Path]
) -> None:
    (box["root"] / "shared" / "comfy_dir_config.yaml").write_text(
        "comfyui:\n  base_path: /workspace/ComfyUI\n  checkpoints: models/checkpoints/\n"
        f"  loras: models/{'x' * 300}/\n"
    )
    sandbox = Sandbox(box)
    r, took = orchestrator(["models", "sync"], {"ROOT": str(box["root"])})
    assert_clear_exit(r, took, ok=(2,))
    sandbox.assert_root_unchanged()


@pytest.mark.parametrize("args", [["nodes", "validate", "/dev/zero"], ["--config", "/dev/zero", "config"]])
def test_an_endless_input_file_is_a_clear_error(args: list[str], box: dict[str, Path]) -> None:
    r, took = orchestrator(args, {"ROOT": str(box["root"])}, timeout=120, memory=512 << 20)
    assert_clear_exit(r, took, ok=(2,))
