"""The machine's lifecycle as services that return values: ``up`` as a pipeline of stages
(plan, provision, render, start, reconcile), ``down``, status, start/stop/restart, logs,
and the offline demo.

May import every package below the CLI: ``core``, ``machine``, ``comfy``, ``provision``,
``monitor``, ``jobs`` and (for the demo's code tree) ``simulator``.
"""
