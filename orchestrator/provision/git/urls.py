"""Pure rules for repository URLs, branch names and commit ids, and for git's error messages.

No I/O: what is safe to hand to git (``url_problem``, ``ref_problem``, ``commit_problem``),
how to show a URL without its credentials (``redact_url``), when a URL needs the SSH key, and
whether a failure is worth retrying (``is_transient``).
"""

from __future__ import annotations

import re

SHA_RE = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")

_PERMANENT = re.compile(
    r"not found|does not exist|does not appear to be a git repository|authentication failed"
    r"|permission denied|could not read (username|password)|terminal prompts disabled"
    r"|couldn't find remote ref|invalid refspec|unknown revision|not a valid|bad object"
    r"|host key verification failed|returned error: 40[134]|not our ref",
    re.I,
)
_TRANSIENT = re.compile(
    r"could not resolve host|connection (timed out|refused|reset|closed)|operation timed out|timed out"
    r"|early eof|rpc failed|remote end hung up|failed to connect|temporary failure|try again"
    r"|network is unreachable|no route to host|tls|ssl|gnutls|http/2 stream|unexpected disconnect"
    r"|returned error: (5\d\d|429)|index-pack failed|broken pipe|did not complete in",
    re.I,
)


def is_transient(detail: str, *, timed_out: bool = False) -> bool:
    """Whether a git failure is worth retrying: network trouble and timeouts, not a missing repo."""
    if timed_out:
        return True
    if _PERMANENT.search(detail):
        return False
    return bool(_TRANSIENT.search(detail))


_USERINFO = re.compile(r"(://)[^/@\s]+@")


def redact_url(text: str) -> str:
    """Hide credentials embedded in URLs (``https://user:token@host`` → ``https://***@host``)."""
    return _USERINFO.sub(r"\1***@", text)


_SCP_LIKE = re.compile(r"^[A-Za-z0-9._~+-]+@[A-Za-z0-9.-]+:(?!//)")
_SCP_LIKE_HOST = re.compile(r"^[A-Za-z0-9._~+-]+@([A-Za-z0-9.-]+):(?!//)")


def needs_ssh(url: str) -> bool:
    """True for ``ssh://``, ``git+ssh://`` and scp-like ``git@host:path`` URLs."""
    lowered = url.lower()
    return lowered.startswith(("ssh://", "git+ssh://", "ssh+git://")) or bool(_SCP_LIKE.match(url))


_HOST = re.compile(r"^[A-Za-z0-9+.-]+://(?:[^/@]*@)?(\[[^\]]+\]|[^/:]+)")


def url_host(url: str) -> str | None:
    """The host a URL talks to; None for local repositories."""
    if is_local(url):
        return None
    match = _HOST.match(url) or _SCP_LIKE_HOST.match(url)
    return match.group(1).lower() if match else None


def is_local(url: str) -> bool:
    return url.startswith(("file://", "/"))


_TRANSPORT = re.compile(r"^[A-Za-z0-9+.-]+::")


def url_problem(url: str) -> str | None:
    """Why ``url`` is not an acceptable repository URL, or None.

    Allowed: ``https://``, ``ssh://``, scp-like ``user@host:path``, ``file://`` and absolute
    local paths. Rejected: ``ext::``-style transports, anything that git could read as an
    option (a leading ``-``), whitespace and control characters.
    """
    if not url:
        return "is empty"
    if url.startswith("-"):
        return "must not start with '-'"
    if _TRANSPORT.match(url):
        return "uses a '<transport>::' URL (such as ext::), which can run commands"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "must not contain whitespace or control characters"
    lowered = url.lower()
    if lowered.startswith(("https://", "ssh://", "git+ssh://", "ssh+git://")):
        return None
    if lowered.startswith("file://") or url.startswith("/"):
        return None
    if _SCP_LIKE.match(url):
        return None
    if lowered.startswith(("http://", "git://")):
        return "uses an unauthenticated transport: use https:// or ssh"
    return "is not an https://, ssh://, git@host:path, file:// URL or absolute path"


_BAD_REF = re.compile(r"\.\.|@\{|[\x00-\x20\x7f~^:?*\[\\]|//|/\.|\.lock$|\.$|/$")


def ref_problem(ref: str) -> str | None:
    """Why ``ref`` is not a safe branch name, or None (git check-ref-format, simplified)."""
    if not ref:
        return "is empty"
    if ref.startswith("-"):
        return "must not start with '-'"
    if ref.startswith(("/", ".")) or _BAD_REF.search(ref):
        return "is not a valid branch name"
    return None


_COMMIT = re.compile(r"^[0-9a-fA-F]{7,64}$")


def commit_problem(commit: str) -> str | None:
    """Why ``commit`` is not an acceptable commit id (7-64 hex digits), or None."""
    if commit.startswith("-"):
        return "must not start with '-'"
    if not _COMMIT.match(commit):
        return "must be a commit id of 7-40 hex digits (use branch for a branch or tag)"
    return None


def same_commit(head: str | None, wanted: str) -> bool:
    """Whether the full sha ``head`` is ``wanted`` (which may be abbreviated)."""
    return bool(head) and len(wanted) >= 7 and str(head).lower().startswith(wanted.lower())


def normalise_repo_url(url: str) -> str:
    """For comparisons: lower-case scheme/host part, no trailing slash or ``.git``."""
    value = url.strip().rstrip("/")
    if value.endswith(".git"):
        value = value[: -len(".git")]
    scheme, sep, rest = value.partition("://")
    if sep:
        host, slash, path = rest.partition("/")
        return f"{scheme.lower()}://{host.lower()}{slash}{path}"
    return value


def same_url(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and normalise_repo_url(a) == normalise_repo_url(b)
