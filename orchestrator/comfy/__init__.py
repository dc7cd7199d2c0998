"""ComfyUI as a remote service: the one client for its HTTP API and WebSocket, in both dialects
(upstream, where the client names its ``clientId``; the fleet's fork, whose ``/ws`` assigns
one), and the parsing of what it sends (events, history entries, prompt rejections).

May import ``core`` only. Probes, the job tracker and the conformance tests all talk to
ComfyUI through this package.
"""
