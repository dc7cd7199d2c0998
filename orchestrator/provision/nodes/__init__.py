"""Custom nodes from ``config_nodes.json``: validate, diff against recorded state, apply.

    config      parse and validate config_nodes.json -> NodesConfig (NodeSpec per entry)
    state       nodes_state.json: NodeRecord per node, markers of what was applied
    plan        observe (file reads) and plan_actions (pure)
    deps        .env rendering, pip command and torch constraints, the command seam (run_command)
    engine      RunState: one sync's records, outcomes and warnings; removing a folder
    checkout    the git step of one node, under NODE_TIMEOUT
    steps       the pip, .env and custom_script steps
    report      NodeResult / NodesReport, and the last report for status and metrics
    firewall    pure: each node's requirements against the protected packages (torch stack,
                numpy major, one OpenCV) -> refusals, OpenCV rewrites, the set to install
    imports     every node imported in a child interpreter the way ComfyUI's loader does
    sync        sync_nodes: config -> plan -> execute -> report

    load_config(path)            schema (jsonschema) + normalisation + safety → NodesConfig;
                                 ConfigError names the JSON path, nothing touched on disk
    observe(dir, specs, state)   what is on disk: file reads only, no git subprocess
    plan_actions(...)            pure: install | update | unchanged | remove for each node
    sync_nodes(...)              git in parallel (bounded pool, per-node timeout) → firewall →
                                 ONE uv/pip install of every node's accepted requirements (the
                                 protected packages pinned by a constraints file) → .env files →
                                 custom_script → import check → NodesReport

State (``$ROOT/.orchestrator/nodes_state.json``): per node the URL, branch, commit, resolved
commit and hashes of the requirements, env template and script that were applied. It is
written atomically after each step that succeeds, so a run killed at any point leaves a state
that the next run repairs; a failed step is not recorded and is therefore retried next time.
A warm run with nothing changed starts no git, no pip and no script.
"""
