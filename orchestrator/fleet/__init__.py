"""Fleet: a Redis job queue across machines, each machine's capacity heartbeat, and the client.

    queue      key names, connecting (one-line errors), the Lua scripts that finish a job
    capacity   free slots (pure), this machine's capacity read from its monitor, heartbeats,
               ``fleet status``
    worker     QueueWorker: consumes the stream with a consumer group under backpressure, holds
               each job under a renewed lease, reclaims dead machines' jobs (XAUTOCLAIM), retries,
               dead-letters, writes one result per job id
    client     enqueue a workflow and wait for its result

The worker submits each job to the LOCAL monitor's ``POST /jobs`` over HTTP, so a machine keeps
one router and one result store whether a job came from the queue, RunPod or a direct caller.
May import ``core``, ``machine`` and ``jobs`` (its schemas, to validate a job before enqueuing).
"""
