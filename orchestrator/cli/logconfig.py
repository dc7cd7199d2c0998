"""Logging: one line per event, text or JSON, to stderr and a rotating file; secrets redacted."""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

REDACTED = "***"


# urllib3 logs request paths (at debug level, and in retry warnings); a query string may hold a token.
_QUERY = re.compile(r"\?[^\s\"']*")


class RedactingFilter(logging.Filter):
    """Replaces every known secret value in the rendered message, and urllib3's query strings."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name.startswith("urllib3"):
            message = _QUERY.sub("?…", message)
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


NOISY = ("urllib3", "git", "httpx", "httpcore", "asyncio", "uvicorn.access")


class LoggingSetup:
    """What :func:`setup_logging` changed in the process's logging, and how to undo it.

    Used as a context manager by ``cli.main``: the handlers it added are removed and closed, and
    the levels it set are put back, when the command returns (so calling ``main()`` in-process,
    as tests do, leaves logging as it found it).
    """

    def __init__(self, handlers: list[logging.Handler], levels: dict[str, int]) -> None:
        self.handlers = handlers
        self._levels = levels  # logger name ("" for the root) -> level before setup

    def restore(self) -> None:
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
            handler.close()
        self.handlers = []
        for name, level in self._levels.items():
            logging.getLogger(name or None).setLevel(level)

    def __enter__(self) -> LoggingSetup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def setup_logging(
    *, fmt: str, level: str, secrets: Iterable[str], log_file: Path | None, stream: bool = True
) -> LoggingSetup:
    """Send log records to stderr and ``log_file`` through our own handlers on the root logger.

    Called by the CLI entry point only (never at import time); handlers it did not add are left
    alone. Returns the handle that undoes it.
    """
    root = logging.getLogger()
    levels = {name: logging.getLogger(name or None).level for name in ("", *NOISY)}
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
    root.setLevel(getattr(logging, level.upper()))
    for handler in handlers:
        handler.addFilter(redact)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return LoggingSetup(handlers, levels)
