"""Multi-GPU ComfyUI orchestrator: one ComfyUI per GPU under supervisord."""

__version__ = "0.1.0"
