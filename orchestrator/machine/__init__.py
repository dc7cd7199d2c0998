"""The seams to the operating system: GPUs through NVML (or the mock), ports, the supervisord
XML-RPC client, the one command runner (own process group, deadline, tree kill), atomic file
writes, the ROOT lock and the machine's own state files.

May import ``core`` only. Everything above reaches the OS through here.
"""
