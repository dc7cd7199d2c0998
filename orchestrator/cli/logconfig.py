"""Logging: one line per event, text or JSON, to stderr and a rotating file; secrets redacted."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Iterable
from pathlib import Path

REDACTED = "***"


class RedactingFilter(logging.Filter):
    """Replaces every known secret value in the rendered message."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for secret in self.secrets:
            message = message.replace(secret, REDACTED)
        if record.exc_info:
            # Tracebacks may quote secrets too; keep only the exception line.
            exc = record.exc_info[1]
            message = f"{message}: {type(exc).__name__}: {exc}"
            for secret in self.secrets:
                message = message.replace(secret, REDACTED)
            record.exc_info = None
            record.exc_text = None
        record.msg = message.replace("\n", "\\n")
        record.args = ()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        self.converter = time.gmtime


def setup_logging(
    *, fmt: str, level: str, secrets: Iterable[str], log_file: Path | None, stream: bool = True
) -> None:
    """Configure the root logger once, for the CLI process (never at import time)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(getattr(logging, level.upper()))
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    redact = RedactingFilter(secrets)
    handlers: list[logging.Handler] = []
    if stream:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(
                logging.handlers.RotatingFileHandler(log_file, maxBytes=10 * 1024 * 1024, backupCount=5)
            )
        except OSError:
            pass  # an unwritable ROOT is reported by the command that needs it
    for handler in handlers:
        handler.addFilter(redact)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    for noisy in ("urllib3", "git", "httpx", "httpcore", "asyncio", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
