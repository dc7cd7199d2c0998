"""The seams to the operating system: GPUs through NVML (or the mock) and their fault
events (``nvml_events``), cgroup v2 memory limits (``cgroups``), ports, the supervisord
XML-RPC client (credentials in ``.orchestrator/supervisor.auth``), the exec wrapper that makes
programs die with supervisord (``pdeath``), this ROOT's orphans on the plan's ports (``orphans``),
the one command runner (own process group, deadline, tree kill), atomic file
writes, the ROOT lock, the machine's own state files, and waiting (``clock.wait_for``, the one
polling helper).

May import ``core`` only. Everything above reaches the OS through here.
"""
