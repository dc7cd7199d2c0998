"""Weights: the shared model tree (``comfy_dir_config.yaml``), the manifest of what to fetch,
the verified, resumable download engine, and the sync that ties them together.

Part of ``provision``: may import ``core`` and ``machine``.
"""
