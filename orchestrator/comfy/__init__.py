"""ComfyUI as a remote service: the one client for its HTTP API and WebSocket, in both dialects
(upstream, where the client names its ``clientId``; the fleet's fork, whose ``/ws`` assigns
one), and the parsing of what it sends (events, history entries, prompt rejections).

May import ``core`` only. Probes, the job tracker and the conformance tests all talk to
ComfyUI through this package.

    client.new_session()                 an aiohttp session for many instances (caller closes it)
    client.ComfyClient(session, url)     one instance; every method is async, ``timeout`` in s:
        system_stats / queue / free          -> Reply(status, body)   (.ok, .text, .json())
        upload_image / post_prompt / interrupt / delete_queued   -> Reply
        history(prompt_id)                   -> the /history entry, None while not ended
        queue_position(prompt_id)            -> "running" | "pending" | "missing"
        view(filename, subfolder, type_)     -> bytes
        connect(client_id, greet=True)       -> ComfySocket(.client_id, .dialect,
                                                receive(timeout) -> dict | None when closed)
    client.ComfyCallError                no usable answer: .reason, .kind (connect, disconnected,
                                         timeout, answer, other), .gone; __cause__ kept
    client.base_url(host, port), client.describe(exc)
    protocol                             pure parsing: classify_event, NodeProgress, greeting,
                                         history_entry/outcome/times/outputs, queue_position,
                                         queue_lengths, prompt_rejection (-> Failure, OutputRef)
"""
