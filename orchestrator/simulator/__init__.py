"""A ComfyUI API simulator: the stand-in for ComfyUI in tests and in ``orchestrator demo``.

    tree.write_code_tree(dest)   a code tree that starts like ComfyUI (``python main.py <flags>``)
    server.run(...) / main()     the aiohttp server (HTTP API and /ws); SIM_PROTOCOL picks the
                                 /ws dialect: upstream (default: honours ?clientId=) or fork
                                 (stakeordie/ComfyUI master: its own client_id first, ping/pong,
                                 prompt -> prompt_queued/error, node_executing per node)
    cli_args                     the flags, declared like ComfyUI's comfy/cli_args.py
    faults                       SIM_* variables and <user-directory>/simulator_faults.json

Importing this package starts nothing and imports no third-party module. May import ``core``
and ``machine`` (atomic writes); only the demo (``lifecycle``) and the tests import it.
"""
