"""The aiohttp application: every route (also under ``/api``) and ComfyUI's origin or CORS middleware."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlparse, urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from orchestrator.simulator.instance import Simulator
from orchestrator.simulator.routes import FileRoutes, QueueRoutes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def origin_mismatch(host: str, origin: str) -> bool:
    """ComfyUI's rule: for a loopback Host, the Origin's host[:port] must match it."""
    host_domain = host.lower()
    parsed = urlparse(origin)
    origin_domain = parsed.netloc.lower()
    host_parsed = urlsplit("//" + host_domain)
    try:
        origin_port, host_port = parsed.port, host_parsed.port
    except ValueError:
        return True
    if not _is_loopback(host_parsed.hostname):
        return False
    if origin_port is None:
        host_domain = host_parsed.hostname or ""
    if host_port is None:
        origin_domain = parsed.hostname or ""
    return bool(host_domain) and bool(origin_domain) and host_domain != origin_domain


def _is_loopback(hostname: str | None) -> bool:
    if not hostname:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname.strip("[]")).is_loopback
    except ValueError:
        return False


def _origin_middleware(sim: Simulator) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # A browser on a foreign site may POST to 127.0.0.1; ComfyUI refuses when the Origin's
        # host differs from Host, and only checks that for loopback hosts.
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if host and origin and origin_mismatch(host, origin):
            sim.log(f"WARNING: request with non matching host and origin {host} != {origin}, returning 403")
            return web.Response(status=403)
        if request.method == "OPTIONS":
            return web.Response()
        return await handler(request)

    return middleware


def _cors_middleware(allow_origin: str) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = web.Response() if request.method == "OPTIONS" else await handler(request)
        response.headers["Access-Control-Allow-Origin"] = allow_origin
        response.headers["Access-Control-Allow-Methods"] = "POST, GET, DELETE, PUT, OPTIONS, PATCH"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        return response

    return middleware


def build_app(sim: Simulator) -> web.Application:
    """The application serving ``sim``: --enable-cors-header picks CORS over the origin check."""
    cors = sim.args.enable_cors_header
    middleware = _cors_middleware(str(cors)) if cors else _origin_middleware(sim)
    app = web.Application(client_max_size=int(sim.args.max_upload_size * 1024 * 1024), middlewares=[middleware])
    q, f = QueueRoutes(sim), FileRoutes(sim)
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/ws", sim.hub.websocket),
        ("GET", "/system_stats", q.system_stats),
        ("GET", "/queue", q.get_queue),
        ("POST", "/queue", q.post_queue),
        ("GET", "/prompt", q.get_prompt),
        ("POST", "/prompt", q.post_prompt),
        ("GET", "/history", q.get_history),
        ("GET", "/history/{prompt_id}", q.get_history_item),
        ("POST", "/history", q.post_history),
        ("GET", "/object_info", f.object_info),
        ("GET", "/object_info/{node_class}", f.object_info_one),
        ("GET", "/view", f.view),
        ("POST", "/upload/image", f.upload_image),
        ("POST", "/interrupt", q.interrupt),
        ("POST", "/free", q.free),
        ("GET", "/embeddings", f.embeddings),
        ("GET", "/extensions", f.extensions),
        ("GET", "/models", f.model_types),
        ("GET", "/models/{folder}", f.model_list),
        ("GET", "/features", f.features),
    ]
    for method, path, handler in routes:
        for prefix in ("", "/api"):
            app.router.add_route(method, prefix + path, handler)
    app.router.add_get("/", f.index)
    return app
