"""The SSH key for ssh repository URLs, from CUT_PK_1..3 (split base64) or SSH_PRIVATE_KEY.

The key is decoded and written (mode 0600) only when an ssh URL first needs it; messages name
the variable, never the material.
"""

from __future__ import annotations

import base64
import binascii
import shlex
import threading
from pathlib import Path

from orchestrator.machine.fs import atomic_write
from orchestrator.provision.git.command import SshKeyError
from orchestrator.provision.git.urls import redact_url


def decode_private_key(material: str) -> bytes:
    """The private key file content from PEM/OpenSSH text or its base64 encoding.

    Raises:
        ValueError: not a private key (the message never quotes the material).
    """
    text = material.strip()
    if "-----BEGIN" not in text:
        compact = "".join(text.split())
        try:
            raw = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
            text = raw.decode("ascii").strip()
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
    text = text.replace("\\n", "\n")
    if "-----BEGIN" not in text or "PRIVATE KEY-----" not in text:
        raise ValueError("not a PEM/OpenSSH private key")
    return (text.strip() + "\n").encode()


class SshKey:
    """The key for ssh URLs, written lazily (mode 0600) the first time an ssh URL needs it."""

    def __init__(self, material: str, key_file: Path, source: str) -> None:
        self._material = material
        self.key_file = key_file
        self.source = source  # the variable names, for messages
        self._lock = threading.Lock()
        self._env: dict[str, str] | None = None

    def env(self, url: str) -> dict[str, str]:
        """``GIT_SSH_COMMAND`` for ``url``.

        Raises:
            SshKeyError: the key is missing or undecodable (the key itself is never quoted).
        """
        with self._lock:
            if self._env is not None:
                return self._env
            shown = redact_url(url)
            if not self._material:
                raise SshKeyError(
                    f"{shown} needs an SSH key: set CUT_PK_1..3 (base64, split) or SSH_PRIVATE_KEY",
                    url=shown,
                )
            try:
                key = decode_private_key(self._material)
            except ValueError as exc:
                raise SshKeyError(
                    f"{shown} needs an SSH key but {self.source} is {exc}: check the variable", url=shown
                ) from None
            self.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.key_file.parent.chmod(0o700)
            atomic_write(self.key_file, key, mode=0o600)
            known_hosts = self.key_file.parent / "known_hosts"
            command = [
                "ssh",
                "-i",
                str(self.key_file),
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                f"UserKnownHostsFile={known_hosts}",
                "-o",
                "BatchMode=yes",
            ]
            self._env = {"GIT_SSH_COMMAND": shlex.join(command)}
            return self._env
