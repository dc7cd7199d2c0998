"""``python -m orchestrator.simulator <flags>``: the simulator with the current directory as its tree."""

from __future__ import annotations

from orchestrator.simulator.server import main

if __name__ == "__main__":
    main()
