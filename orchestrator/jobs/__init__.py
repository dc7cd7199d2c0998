"""Jobs: the API schemas, routing a workflow to the least-busy ready instance, tracking it to
completion over ComfyUI's WebSocket and history, the result store, job metrics, and the
RunPod serverless worker over the same API.

May import ``core``, ``machine`` and ``comfy``; the monitor mounts its routes.
"""
