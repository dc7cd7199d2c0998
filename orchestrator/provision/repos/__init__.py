"""The ComfyUI code tree, the shared config repo and the SSH key for private repos.

    targets    settings -> where each checkout should be (pure), the git client and SSH key
    shipped    the shared config shipped with the package
    state      repos.json: the last sync's results, the code report read from the tree
    update     git steps on one checkout: pin, follow (fast-forward), fresh clone or adoption
    sync       sync_comfy, sync_shared, resolve_shared: the policies around those steps

ComfyUI, one tree for every instance at ``$ROOT/ComfyUI``:

* The fork follows ``COMFY_BRANCH`` (fetched and fast-forwarded when ``COMFY_UPDATE`` says an
  update is due: ``always``, ``never`` once cloned, or ``interval``, the default, once per
  ``COMFY_UPDATE_INTERVAL``; a changed URL, branch or commit is applied at once). A URL counts as
  the fork when it is :data:`~orchestrator.core.settings.FORK_URL` (ignoring case of the host, a
  trailing ``/`` or ``.git``) **or** when ``COMFY_BRANCH`` was set explicitly (flag, env or
  file): setting a branch means "follow it", whatever the URL.
* Any other URL is checked out at ``COMFY_COMMIT``; a pin already checked out costs no network
  and no git subprocess.
* When the configured repo cannot be cloned, ``COMFY_FALLBACK_URL`` at ``COMFY_COMMIT`` is
  used and said loudly: an error log line, ``RepoResult.fallback`` and ``repos.json`` in the
  state directory (read by ``status`` and the metrics).
* When ``COMFY_BRANCH`` does not exist in the fork, one line names the branches that do;
  ``COMFY_ON_MISSING_BRANCH=fail`` (default) stops there (:class:`MissingBranchError`),
  ``fallback`` keeps an existing tree as it is, or clones the fallback on a first boot.
  Whatever happens, the result reports what is checked out (branch and HEAD read from the
  tree), never the branch that was asked for.

The shared config repo at ``$ROOT/shared`` follows ``SHARED_BRANCH`` (default: the remote's
default branch; the same ``COMFY_UPDATE`` policy) or is pinned to ``SHARED_COMMIT``; it only
ever fast-forwards and never discards local changes. Without a configured or reachable repo on first boot, the shipped
defaults (:func:`shipped_shared_dir`) are copied in.

Every clone goes into a temp sibling that is renamed into place, so a killed clone is never
used; a folder without a valid HEAD is treated as broken and redone, keeping its untracked
files (custom nodes, models).
"""
