"""Secrets: every secret variable set to a unique marker, every command and endpoint run, no marker anywhere.

A full `up` provisions from local repositories: a custom node whose .env references every secret
(and a variable whose name does not look secret), a private node over ssh (the CUT_PK_1..3 key
is written and used; the ssh binary is a stub that refuses), a Hugging Face and a CivitAI model
whose server demands the token, and a model URL with a token in its query. Then status, config,
plan, gpus, nodes sync, models sync/status, logs, health and every HTTP endpoint (the token where
needed), cleanup, up again, down. All output, the command line of every process of the machine
and every file under $ROOT are grepped for every marker; only the SSH key file and the nodes'
.env files and each orchestrator program's env file (its own secrets only) may hold one, and they
(and supervisord.conf) are 0600.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support import http_client, wait_until

from orchestrator.core.layout import Layout
from reliability.test_crash_safety import World, build_world, monitor_ready, run

pytestmark = pytest.mark.integration

SECRET_VARS = (
    "SSH_PRIVATE_KEY", "HF_TOKEN", "CIVITAI_TOKEN", "ORCHESTRATOR_TOKEN", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY_ENCODED", "AZURE_STORAGE_KEY", "OPENAI_API_KEY",
)
# Referenced by a node's env block; its name does not look secret, its value must not leak either.
NODE_VAR = "EMPROPS_NODE_CREDENTIAL"

SSH_STUB = """#!/bin/sh
# Stands in for ssh: records how it was called, then refuses like a server without our key.
printf '%s\\n' "$@" > "$SSH_CALLS"
for a in "$@"; do case "$a" in */id_orchestrator) stat -c %a "$a" > "$SSH_CALLS.mode";; esac; done
echo "git@127.0.0.1: Permission denied (publickey)." >&2
exit 255
"""


def marker(name: str) -> str:
    return f"mk{secrets.token_hex(6)}{name.replace('_', '')[:6]}"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = build_world(tmp_path / "world")
    yield w
    w.server.stop()


def ssh_key_parts(tmp_path: Path) -> tuple[list[str], list[str]]:
    """A real ed25519 private key, base64-encoded and split in three; and its body lines."""
    key = tmp_path / "id_test"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(key)], check=True)
    text = key.read_text()
    encoded = base64.b64encode(text.encode()).decode()
    third = len(encoded) // 3
    parts = [encoded[:third], encoded[third : 2 * third], encoded[2 * third :]]
    body = [line for line in text.splitlines() if line and "-----" not in line and len(line) >= 16]
    return parts, body


def test_no_secret_reaches_output_logs_metrics_or_files_and_secret_files_are_0600(
    world: World, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    markers = {name: marker(name) for name in (*SECRET_VARS, NODE_VAR, "URL_TOKEN")}
    parts, key_body = ssh_key_parts(tmp_path)
    cut = {f"CUT_PK_{i + 1}": part for i, part in enumerate(parts)}
    needles = {**markers, **cut, **{f"key body line {i}": line for i, line in enumerate(key_body)}}

    # The model host demands the tokens.
    data = b"weights-" * 4096
    world.server.files["/owner/repo/resolve/main/model.safetensors"] = data
    world.server.tokens["/owner/repo/resolve/main/model.safetensors"] = markers["HF_TOKEN"]
    world.server.files["/api/download/models/4242"] = data
    world.server.tokens["/api/download/models/4242"] = markers["CIVITAI_TOKEN"]
    world.server.files["/files/public.safetensors"] = data
    env_block = {name: f"${{{name}}}" for name in SECRET_VARS if name not in {"ORCHESTRATOR_TOKEN", "SSH_PRIVATE_KEY"}}
    env_block["NODE_CREDENTIAL"] = f"${{{NODE_VAR}}}"
    env_block["DEBUG"] = "${EMPROPS_DEBUG_LOGGING:-false}"
    world.publish({
        "config_nodes.json": json.dumps({"custom_nodes": [
            {"name": "env-node", "url": world.node_urls["env-node"], "env": env_block,
             "custom_script": "test -f .env && echo env written"},
            {"name": "alpha-node", "url": world.node_urls["alpha-node"]},
            {"name": "private-node", "url": "ssh://git@127.0.0.1:9/private/node.git"},
        ]}),
        "models.yaml": (
            "models:\n"
            "  - hf: owner/repo/model.safetensors\n    dest: checkpoints\n"
            "  - civitai: 4242\n    dest: loras\n    filename: civ.safetensors\n    when: background\n"
            f"  - url: {world.server.url('/files/public.safetensors')}?token={markers['URL_TOKEN']}\n"
            "    dest: vae\n"
        ),
    })
    bin_dir = world.bin_dir
    (bin_dir / "ssh").write_text(SSH_STUB)
    (bin_dir / "ssh").chmod(0o755)
    calls = tmp_path / "ssh-calls"
    env = world.env(root, SSH_CALLS=str(calls), **cut, **{k: v for k, v in markers.items() if k != "URL_TOKEN"})
    base = f"http://127.0.0.1:{env['ORCHESTRATOR_PORT']}"
    auth = {"Authorization": f"Bearer {markers['ORCHESTRATOR_TOKEN']}"}
    outputs: list[tuple[str, str]] = []

    def cli(*args: str, ok: tuple[int, ...] = (0,)) -> str:
        r = run(env, *args)
        outputs.append((f"orchestrator {' '.join(args)}", r.stdout + r.stderr))
        assert r.returncode in ok, f"orchestrator {' '.join(args)}: exit {r.returncode}\n{r.stdout}{r.stderr}"
        return r.stdout

    try:
        out = cli("up")
        assert "private-node" in out  # the ssh node failed (the stub refused) and up went on
        assert wait_until(lambda: monitor_ready(env), 60, 0.2), run(env, "status").stdout
        layout = Layout(root)
        assert (root / "ComfyUI" / "models" / "checkpoints" / "model.safetensors").read_bytes() == data
        assert (root / "ComfyUI" / "models" / "vae" / "public.safetensors").read_bytes() == data
        # the ssh key was decoded from CUT_PK_1..3, written 0600 before ssh saw it, and used
        assert calls.exists()
        assert "id_orchestrator" in calls.read_text()
        assert (Path(f"{calls}.mode")).read_text().strip() == "600"
        for args in (("status",), ("status", "--json"), ("config",), ("config", "--json"), ("plan", "--json"),
                     ("gpus", "--json"), ("models", "status"), ("models", "status", "--json"), ("health",),
                     ("logs", "all", "-n", "2000"), ("logs", "0", "-n", "2000"), ("cleanup", "--once")):
            cli(*args)
        # command lines are world-readable (ps): no secret on any of the machine's processes
        sup = psutil.Process(json.loads(cli("status", "--json"))["supervisord"]["pid"])
        for proc in [sup, *sup.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                outputs.append((f"command line of pid {proc.pid}", " ".join(proc.cmdline())))
        cli("nodes", "sync", ok=(1,))  # private-node still fails
        cli("nodes", "sync", "--json", ok=(1,))
        cli("models", "sync")
        cli("models", "sync", "--json")
        assert wait_until(lambda: (root / "ComfyUI" / "models" / "loras" / "civ.safetensors").exists(), 30, 0.2)
        sent = {(r["path"], r["auth"]) for r in world.server.requests}
        assert ("/owner/repo/resolve/main/model.safetensors", f"Bearer {markers['HF_TOKEN']}") in sent
        assert ("/api/download/models/4242", f"Bearer {markers['CIVITAI_TOKEN']}") in sent

        with http_client(base, timeout=10, trust_env=False) as client:
            for url_path in ("/healthz", "/health", "/readyz", "/ready", "/instances", "/instances/0", "/gpus",
                             "/status", "/metrics", "/openapi.json", "/jobs/nope", "/instances/7"):
                resp = client.get(url_path)
                outputs.append((f"GET {url_path}", f"{resp.status_code} {resp.headers} {resp.text}"))
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                resp = client.post("/instances/0/restart", headers=headers)
                assert resp.status_code == 401
                outputs.append(("POST restart unauthenticated", f"{resp.headers} {resp.text}"))
            resp = client.post("/jobs", headers=auth, json={"workflow": {"1": {"class_type": "Nope", "inputs": {}}}})
            outputs.append(("POST /jobs", f"{resp.status_code} {resp.headers} {resp.text}"))
            resp = client.post("/instances/0/restart", headers=auth)
            assert resp.status_code == 202, resp.text
            outputs.append(("POST restart", f"{resp.headers} {resp.text}"))
        assert wait_until(lambda: monitor_ready(env), 60, 0.2)
        cli("up")  # a warm up: reconcile, nothing changed
        cli("logs", "all", "-n", "5000")
        # files that must hold a secret, and the modes that keep them private
        key_file = layout.state_dir / "ssh" / "id_orchestrator"
        dotenv = root / "ComfyUI" / "custom_nodes" / "env-node" / ".env"
        assert key_file.read_text().strip().splitlines()[1] == key_body[0]
        for name in (*SECRET_VARS[1:3], *SECRET_VARS[4:]):
            assert f"{name}={markers[name]}" in dotenv.read_text()
        assert f"NODE_CREDENTIAL={markers[NODE_VAR]}" in dotenv.read_text()
        # each orchestrator program's variables: its own secrets only (the monitor the token, the
        # background downloads the model hosts' tokens), never SSH material or the cloud keys
        env_files = {p.stem: p for p in (layout.state_dir / "env").glob("*.json")}
        assert {"monitor", "models", "cleanup"} <= set(env_files)
        for program, path in env_files.items():
            held = {name for name, needle in needles.items() if needle in path.read_text()}
            assert held == {"monitor": {"ORCHESTRATOR_TOKEN"}, "models": {"HF_TOKEN", "CIVITAI_TOKEN"}}.get(
                program, set()), f"{program}: {held}"
        for path, mode in ((key_file, 0o600), (dotenv, 0o600), (layout.supervisord_conf, 0o600),
                           (key_file.parent, 0o700), (layout.state_dir, 0o700),
                           (layout.state_dir / "env", 0o700), *((f, 0o600) for f in env_files.values())):
            assert stat.S_IMODE(path.stat().st_mode) == mode, f"{path} is {oct(path.stat().st_mode)}"
    finally:
        outputs.append(("orchestrator down", (lambda r: r.stdout + r.stderr)(run(env, "down"))))

    leaks = [f"{what}: {name}" for what, text in outputs for name, needle in needles.items() if needle in text]
    allowed = {key_file, dotenv, *env_files.values()}  # the env files: checked above, one program's own
    scanned = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink() or path in allowed:
            continue
        scanned += 1
        blob = path.read_bytes()
        for name, needle in needles.items():
            if name == "URL_TOKEN" and root / "shared" in path.parents:
                continue  # the manifest that carries it, in the shared repo's checkout
            if needle.encode() in blob:
                leaks.append(f"{path.relative_to(root)}: {name}")
    assert scanned > 20
    assert (root / "logs" / "monitor.log").exists()
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)
