"""Jobs: the API schemas, routing a workflow to the ready instance that will finish it first,
tracking it to completion over ComfyUI's WebSocket and history, the result store, job metrics, and the
RunPod serverless worker over the same API.

    schemas   request/response models          store    Job records, ResultStore, new_job
    tracker   JobManager (submit, route, run)  attempt  one instance: submit, collect, stop
    follow    /ws events backed by /history    metrics  comfyui_jobs_* collectors
    routes    jobs_router (POST /jobs, GET /jobs/{id})   runpod   the serverless handler
    speeds    run/load times learned per instance  vram     peak GPU memory from the monitor's samples
    webhooks  signed callbacks: each status change POSTed to the job's webhook, retried

Routing decisions are ``core.routing`` (capacity and affinity scoring: ``core.routing_score``);
ComfyUI calls and parsing are ``comfy``. May import ``core``, ``machine`` and ``comfy``; the
monitor mounts its routes.
"""
