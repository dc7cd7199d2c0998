"""Manifest entries to download tasks: the URL of each source and the token it may carry.

Pure: builds :class:`~.tasks.DownloadTask` values; the only network read (a Hugging Face repo
listing) is the sync's, which hands the listing to :func:`repo_tasks`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

from orchestrator.core.errors import ConfigError, ModelError
from orchestrator.core.settings import Settings
from orchestrator.provision.models import manifest
from orchestrator.provision.models.manifest import ModelEntry
from orchestrator.provision.models.tasks import DownloadTask


def _origin(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))


def check_endpoints(settings: Settings) -> None:
    endpoints = (("HF_ENDPOINT", settings.hf_endpoint), ("CIVITAI_ENDPOINT", settings.civitai_endpoint))
    for var, value in endpoints:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"invalid {var}={value!r}: expected a URL such as https://huggingface.co")


def auth_for(settings: Settings, url: str) -> tuple[dict[str, str], str | None]:
    """The Authorization header for ``url`` and the variable it comes from.

    HF_TOKEN goes only to the HF_ENDPOINT host, CIVITAI_TOKEN only to the CIVITAI_ENDPOINT host
    (requests drops the header when a redirect leaves that host).
    """
    origin = _origin(url)
    for endpoint, token, var in (
        (settings.hf_endpoint, settings.hf_token, "HF_TOKEN"),
        (settings.civitai_endpoint, settings.civitai_token, "CIVITAI_TOKEN"),
    ):
        if origin == _origin(endpoint):
            return ({"Authorization": f"Bearer {token}"} if token else {}), var
    return {}, None


def _url_filename(url: str) -> str | None:
    """The URL's last path segment when it looks like a file name (has an extension)."""
    name = PurePosixPath(urlsplit(url).path).name
    if "." not in name.strip(".") or manifest.check_filename(name):
        return None
    return name


def hf_file_url(settings: Settings, repo: str, path: str, revision: str | None) -> str:
    base = settings.hf_endpoint.rstrip("/")
    return f"{base}/{repo}/resolve/{quote(revision or 'main', safe='')}/{quote(path)}"


def hf_listing_url(settings: Settings, repo: str, revision: str | None) -> str:
    base = settings.hf_endpoint.rstrip("/")
    rev = f"/revision/{quote(revision, safe='')}" if revision else ""
    return f"{base}/api/models/{repo}{rev}?blobs=true"


def civitai_url(settings: Settings, version_id: str) -> str:
    return f"{settings.civitai_endpoint.rstrip('/')}/api/download/models/{version_id}"


def entry_task(settings: Settings, entry: ModelEntry, dest_dir: Path) -> DownloadTask:
    """The download for a single-file entry (not a whole HF repo)."""
    if entry.kind == "url":
        url = entry.source
        filename = entry.filename or _url_filename(url)
    elif entry.kind == "hf":
        url = hf_file_url(settings, entry.hf_repo, entry.hf_path, entry.revision)
        filename = entry.filename or PurePosixPath(entry.hf_path).name
    else:
        url = civitai_url(settings, entry.source)
        filename = entry.filename
    headers, token_var = auth_for(settings, url)
    return DownloadTask(
        name=entry.name, url=url, dest_dir=dest_dir, filename=filename, sha256=entry.sha256,
        size=entry.size, optional=entry.optional, token_var=token_var, headers=headers,
    )


def repo_tasks(settings: Settings, entry: ModelEntry, dest_dir: Path, listing: Any) -> list[DownloadTask]:
    """Tasks for every file of a Hugging Face repo listing (``siblings[].rfilename``).

    Raises:
        ModelError: the listing is malformed or names a path that would leave ``dest_dir``.
    """
    siblings = listing.get("siblings") if isinstance(listing, dict) else None
    if not isinstance(siblings, list):
        raise ModelError(f"{entry.name}: the Hugging Face listing has no file list (siblings)")
    tasks = []
    for sib in siblings:
        rfilename = sib.get("rfilename") if isinstance(sib, dict) else None
        if not isinstance(rfilename, str):
            continue
        parts = rfilename.split("/")
        bad = next((p for p in parts if manifest.check_filename(p)), None)
        if bad is not None:
            raise ModelError(f"{entry.name}: the repo lists an unsafe path {rfilename!r}; nothing written")
        lfs = sib.get("lfs") if isinstance(sib.get("lfs"), dict) else {}
        sha = lfs.get("sha256") if isinstance(lfs.get("sha256"), str) else None
        size = lfs.get("size", sib.get("size"))
        url = hf_file_url(settings, entry.hf_repo, rfilename, entry.revision)
        headers, token_var = auth_for(settings, url)
        tasks.append(DownloadTask(
            name=f"{entry.hf_repo}/{rfilename}", url=url, dest_dir=dest_dir.joinpath(*parts[:-1]),
            filename=parts[-1], sha256=sha.lower() if sha else None,
            size=size if isinstance(size, int) else None, optional=entry.optional,
            token_var=token_var, headers=headers,
        ))
    return tasks


