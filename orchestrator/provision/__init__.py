"""Getting a machine ready: the ComfyUI code and shared config repositories (git), custom
nodes (config, plan, apply, dependencies), the model tree, manifest and downloads, and the
cleanup of old outputs.

Services return frozen reports and raise domain errors; they never print. May import
``core`` and ``machine``.
"""
