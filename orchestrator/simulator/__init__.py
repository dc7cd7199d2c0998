"""A ComfyUI API simulator: the stand-in for ComfyUI in tests and in ``orchestrator demo``.

    tree.write_code_tree(dest)   a code tree that starts like ComfyUI (``python main.py <flags>``)
    server.run(...) / main()     the entry point: startup log, bind, serve until stopped
    instance.Simulator           one running simulator's state; POST /prompt's logic
    app, routes                  the aiohttp application and its HTTP handlers
    hub                          /ws: the sockets and both dialects, picked by SIM_PROTOCOL:
                                 upstream (default: honours ?clientId=) or fork
                                 (stakeordie/ComfyUI master: its own client_id first, ping/pong,
                                 prompt -> prompt_queued/error, node_executing per node)
    prompt_queue, executor       the queue and history; the graph runner (one prompt at a time)
    behaviours, failures         what each node does when it runs; how it fails
    nodedefs, nodes, graph       node declarations, the node catalogue, prompt validation
    cli_args                     the flags, declared like ComfyUI's comfy/cli_args.py
    faults, faultwatch           SIM_* variables and <user-directory>/simulator_faults.json; acting on them

Importing this package starts nothing and imports no third-party module. May import ``core``
and ``machine`` (atomic writes); only the demo (``lifecycle``) and the tests import it.
"""
