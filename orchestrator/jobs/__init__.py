"""Jobs: the API schemas, routing a workflow to the least-busy ready instance, tracking it to
completion over ComfyUI's WebSocket and history, the result store, job metrics, and the
RunPod serverless worker over the same API.

    schemas   request/response models          store    Job records, ResultStore, new_job
    tracker   JobManager (submit, route, run)  attempt  one instance: submit, collect, stop
    follow    /ws events backed by /history    metrics  comfyui_jobs_* collectors
    routes    jobs_router (POST /jobs, GET /jobs/{id})   runpod   the serverless handler
    webhooks  signed callbacks: each status change POSTed to the job's webhook, retried

Routing decisions are ``core.routing``; ComfyUI calls and parsing are ``comfy``. May import
``core``, ``machine`` and ``comfy``; the monitor mounts its routes.
"""
