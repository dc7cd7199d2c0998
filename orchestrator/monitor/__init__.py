"""Watching a running machine: probes of each instance, the GPU sampler, the loop that turns
probe results into restarts (through ``core.health`` decisions), the Prometheus collectors
and the HTTP app (health, control, metrics, and the job API mounted from ``jobs``); GPU fault
events (``gpuhealth``) and instance memory budgets and recycling (``recycle``).

May import ``core``, ``machine``, ``comfy``, ``provision`` (its collectors) and ``jobs``.
"""
