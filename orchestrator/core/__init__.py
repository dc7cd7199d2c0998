"""Pure values and decisions: states, errors, settings, the on-disk layout, the machine plan,
the supervisord.conf renderer, health decisions, GPU fault classification, memory budgets,
workflow checks and job routing (least queue, or capacity and model affinity).

Owns every rule that can be decided without touching the machine, and the HTTP API's one
error shape and bearer check (``http``, ``auth``: declarations, no serving). May import only
the standard library, pure third-party libraries (PyYAML, jsonschema, pydantic, FastAPI's
declarations) and itself —
never another ``orchestrator`` package, and nothing that reaches the OS or the network
(subprocess, sockets, HTTP clients, NVML, supervisor). A test keeps it that way.
"""
