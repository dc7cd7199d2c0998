"""``orchestrator.lock``: what a machine runs, written down so another machine can run exactly that.

    model     the Lock value (JSON, sorted, no timestamps: two equal machines write equal
              files), parsing with one error per bad field, the hash, and ``diff`` (pure)
    machine   read a machine into a Lock: the ComfyUI checkout, every node's URL and commit,
              every distribution in COMFY_PYTHON, the protected packages, the verified models
    locked    ``up --locked``: check before any change that the lock can be installed
              (offline first), pin the nodes' commits, install the packages that differ

Imports ``core``, ``machine`` and the rest of ``provision`` (nodes, git, repos), as its
package may.
"""
