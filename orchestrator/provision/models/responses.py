"""Reading a model server's answer: status codes to errors, names, ranges, and the body.

Nothing here quotes a URL with its query string or a header value: both may hold a token.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import requests
import urllib3

from orchestrator.core.errors import ModelError
from orchestrator.provision.models.manifest import check_filename
from orchestrator.provision.models.tasks import DownloadTask

_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)
# What reading a body can raise: socket errors and timeouts, http.client's, urllib3's, requests'.
READ_ERRORS = (*NETWORK_ERRORS, http.client.HTTPException, OSError)


class TransientError(Exception):
    """Worth retrying (and resuming): network trouble, 5xx, 429."""


def describe(exc: BaseException) -> str:
    """A short reason for a network error that never quotes the URL (it may hold a token)."""
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
        return "timed out"
    dropped = (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError,
               http.client.HTTPException, ConnectionError)
    if isinstance(exc, dropped):
        return "connection dropped during the transfer"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__


def redirect_error(name: str, source: str, exc: requests.TooManyRedirects) -> ModelError:
    """A redirect loop or a chain past ``Session.max_redirects``: fails at once, never retried."""
    resp = exc.response
    chain = list(resp.history) if resp is not None else []
    if resp is not None and not any(r is resp for r in chain):  # requests < 2.32 lists it already
        chain.append(resp)
    hops = [r.url for r in chain]
    loop = len(set(hops)) < len(hops)
    limit = re.search(r"Exceeded (\d+) redirects", str(exc))  # requests' own message names its limit
    what = "a redirect loop" if loop else f"more than {limit[1] if limit else 'the allowed'} redirects"
    return ModelError(f"{name}: {source} answers with {what}; not retried (check the URL in the manifest)")


def filename_from_disposition(value: str | None) -> str | None:
    """The file name a Content-Disposition header suggests (RFC 6266 / 5987), unchecked."""
    if not value:
        return None
    match = re.search(r"filename\*\s*=\s*([^;]+)", value, re.I)
    if match:
        raw = match.group(1).strip().strip('"')
        charset, sep, rest = raw.partition("''")
        if sep:
            try:
                return unquote(rest, encoding=charset or "utf-8", errors="replace").strip()
            except LookupError:
                return unquote(rest).strip()
        return unquote(raw).strip()
    match = re.search(r'filename\s*=\s*"((?:[^"\\]|\\.)*)"', value, re.I)
    if match:
        return re.sub(r"\\(.)", r"\1", match.group(1)).strip()
    match = re.search(r"filename\s*=\s*([^;]+)", value, re.I)
    return match.group(1).strip().strip("'") if match else None


def parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` → (100, 1000); ``bytes */1000`` → (None, 1000)."""
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "", re.I)
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def check_status(task: DownloadTask, resp: requests.Response) -> None:
    """Raise for an error status: :class:`TransientError` when worth retrying, else ModelError.

    416 passes: the caller decides whether the part is complete or must start again.
    """
    code = resp.status_code
    if code < 400 or code == 416:
        return
    host = urlsplit(resp.url or task.url).hostname or "the server"
    if code in (401, 403):
        if task.token_var and any(k.lower() == "authorization" for k in task.headers):
            raise ModelError(
                f"{task.name}: {host} refused the token in {task.token_var} (HTTP {code}); "
                f"check that it is valid and has access to {task.source}"
            )
        if task.token_var:
            raise ModelError(f"{task.name}: {host} needs a token (HTTP {code}); set {task.token_var}")
        raise ModelError(f"{task.name}: {host} refused access (HTTP {code}) to {task.source}")
    if code == 404:
        raise ModelError(f"{task.name}: not found (HTTP 404) at {task.source}; check the source in the manifest")
    if code in _TRANSIENT_STATUS or code >= 500:
        raise TransientError(f"HTTP {code} from {host}")
    raise ModelError(f"{task.name}: HTTP {code} from {host} for {task.source}")


def pick_filename(task: DownloadTask, resp: requests.Response) -> str:
    """The manifest's file name, else the server's (Content-Disposition, else the URL), checked."""
    if task.filename:
        return task.filename
    suggested = filename_from_disposition(resp.headers.get("Content-Disposition"))
    where = "Content-Disposition"
    if not suggested:
        suggested = unquote(urlsplit(resp.url or task.url).path.rsplit("/", 1)[-1])
        where = "URL"
    why = check_filename(suggested) if suggested else "no file name"
    if why:
        raise ModelError(
            f"{task.name}: the server's file name {suggested!r} ({where}) is unsafe ({why}); "
            "nothing was written: set filename: for this model in models.yaml"
        )
    return suggested


def is_encoded(resp: requests.Response) -> bool:
    """Whether the body has a Content-Encoding (lengths and ranges then count encoded bytes)."""
    return resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")


def body_reader(resp: requests.Response, chunk_size: int) -> Callable[[bytearray | memoryview], int]:
    """A ``readinto`` for the response body.

    An unencoded body is read straight from the stdlib response under urllib3
    (``resp.raw._fp``): urllib3's own read path copies every chunk again, and skipping it costs
    about 40 % less CPU per byte (measured with bench/bench_downloads.py). Anything else goes
    through ``iter_content``.
    """
    fp = getattr(resp.raw, "_fp", None)
    if isinstance(fp, http.client.HTTPResponse) and not is_encoded(resp):
        return fp.readinto
    chunks = resp.iter_content(chunk_size)
    pending = memoryview(b"")

    def readinto(buf: bytearray | memoryview) -> int:
        nonlocal pending
        while not pending:
            chunk = next(chunks, None)
            if chunk is None:
                return 0
            pending = memoryview(chunk)
        n = min(len(buf), len(pending))
        buf[:n] = pending[:n]
        pending = pending[n:]
        return n

    return readinto
