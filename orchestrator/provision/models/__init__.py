"""Weights: the shared model tree, the manifest of what to fetch, the download engine, the sync.

    tree        comfy_dir_config.yaml → the category folders and ComfyUI's extra_model_paths
    manifest    models.yaml / env lists → ModelEntry values (what to fetch, where, when)
    sources     ModelEntry → DownloadTask (URL per source kind, the token for that host only)
    tasks       the engine's values: DownloadTask, DownloadOptions, DownloadResult, ProgressSink
    downloads   the engine: verified, resumable, parallel (Engine), with retries and a space check
      responses   reading a server's answer (status → error, file name, ranges, the body)
      partfile    the .part file: resume state, streaming with a parallel hash, the final rename
      ranged      a large file over several ranged connections (MODELS_CONNECTIONS), one stream's fallback
      ranges      a ranged part's written ranges, chunks to do, and its in-order hash
      limits      what one download may take: the byte cap, the free-space floor, the retry budget
      verified    the verified-files record, so a sync skips files it already checked
    status      the status file (StatusWriter, read_status) and its Prometheus gauges
    sync        sync_models: tree + manifest + sources + engine → ModelsReport

Part of ``provision``: may import ``core`` and ``machine``; returns reports, never prints.
"""
