"""One error shape and one request discipline for every HTTP route (control API and job API).

Every error answer is ``{"error": code, "message": one line, ...}`` (:class:`ErrorResponse`;
``node_id``, ``field``, ``job_id`` where they apply). Routes use :class:`ApiRoute`, which:

- runs the route's :class:`~orchestrator.core.auth.BearerAuth` before reading a mutating body;
- bounds the body at ``max_request_bytes`` (413 ``too_large``), declared or chunked;
- accepts JSON whatever the Content-Type (``curl -d @workflow.json`` sends form-urlencoded);
- refuses JSON nested deeper than :data:`MAX_JSON_DEPTH` with 400 ``validation`` (parsed once
  here, iteratively checked, and handed on: no ``RecursionError`` reaches FastAPI's parser);
- answers request validation errors with 400 ``validation`` (one line naming node and field)
  and :class:`ApiError` with its own status.

Declaring routes is pure (nothing here serves or reaches the network); the monitor serves them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

Responses = dict[int | str, dict[str, Any]]
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# A ComfyUI workflow is ~4 levels deep (node → inputs → [node, slot]); 64 leaves room for nodes
# that take structured inputs and stays far below Python's recursion limit (pydantic, our walks).
MAX_JSON_DEPTH = 64
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CODES = {400: "validation", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class ErrorResponse(BaseModel):
    """Every error answer of the HTTP API."""

    error: str = Field(
        description="validation, unauthorized, too_large, not_found, no_instance, saturated, not_ready"
    )
    message: str
    node_id: str | None = None
    field: str | None = None
    job_id: str | None = None


class ApiError(Exception):  # noqa: N818 - an HTTP answer, raised from a handler or dependency
    """Answer the request with ``status`` and an ErrorResponse (raise it from a handler)."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        node_id: str | None = None,
        field: str | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=error, message=message, node_id=node_id, field=field, job_id=job_id)
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(exclude_none=True), status_code=self.status, headers=self.headers)


def error_json(status: int, error: str, message: str, **kw: Any) -> JSONResponse:
    """The JSONResponse of ``ApiError(status, error, message, **kw)``."""
    return ApiError(status, error, message, **kw).response()


def documented(descriptions: Mapping[int, str]) -> Responses:
    """OpenAPI ``responses=`` entries with the ErrorResponse model, e.g. ``{404: "no such GPU"}``."""
    return {code: {"model": ErrorResponse, "description": text} for code, text in descriptions.items()}


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None, str | None]:
    """One line from pydantic/FastAPI errors, plus the node id and field when the path has them."""
    parts: list[str] = []
    node_id = field = None
    for err in list(errors)[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"the body is not valid JSON ({ctx.get('error', 'decode error')})")
            continue
        path = ".".join(loc) or "body"
        parts.append(f"{path}: {err.get('msg', 'invalid')}")
        if loc and loc[0] == "workflow" and len(loc) > 1 and node_id is None:
            node_id, field = loc[1], ".".join(loc[2:]) or None
        elif loc and field is None:
            field = path
    return "; ".join(parts), node_id, field


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """App-wide: Starlette's own errors (unknown path, wrong method) in the same shape."""
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    code = _CODES.get(exc.status_code, "http_error")
    return error_json(exc.status_code, code, str(exc.detail), headers=exc.headers)


def _replay(body: bytes) -> Callable[[], Coroutine[Any, Any, dict[str, Any]]]:
    """An ASGI ``receive`` that hands the already-read body to the route's own parser."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class RequestCheck:
    """A route dependency that :class:`ApiRoute` also runs before reading the body (auth)."""

    def check(self, authorization: str | None) -> None:
        """Raises ApiError to refuse the request."""


class ApiRoute(APIRoute):
    """The route class of every router (see the module docstring); :func:`route_class` sizes it."""

    max_request_bytes = DEFAULT_MAX_REQUEST_BYTES

    def _auth_checks(self) -> list[Callable[[str | None], None]]:
        checks: list[Callable[[str | None], None]] = []
        for dep in self.dependencies:
            found: object = dep.dependency
            if isinstance(found, RequestCheck):
                checks.append(found.check)
        return checks

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()
        max_bytes = self.max_request_bytes
        auth = self._auth_checks()

        async def handler(request: Request) -> Response:
            try:
                if request.method in _MUTATING:
                    for check in auth:
                        check(request.headers.get("authorization"))
                    request = await _read_body(request, max_bytes)
                return await original(request)
            except RequestValidationError as exc:
                message, node_id, field = validation_message(exc.errors())
                return error_json(400, "validation", message, node_id=node_id, field=field)
            except ApiError as exc:
                return exc.response()

        return handler


async def _read_body(request: Request, max_bytes: int) -> Request:
    """The request with its body read (bounded) and a JSON content type.

    Raises:
        ApiError: 413 past ``max_bytes``; 400 when the body is not UTF-8.
    """
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "too_large", f"request body is larger than MAX_REQUEST_BYTES ({max_bytes} bytes)")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():  # counted too: a chunked body declares no length
        received += len(chunk)
        if received > max_bytes:
            raise ApiError(413, "too_large", f"request body is larger than MAX_REQUEST_BYTES ({max_bytes} bytes)")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "validation", f"body is not UTF-8 JSON (byte {exc.start})") from None
    scope = dict(request.scope)
    ctype = request.headers.get("content-type", "")
    as_json = not ctype or ctype.startswith(("application/x-www-form-urlencoded", "text/plain"))
    if as_json:
        scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
        scope["headers"].append((b"content-type", b"application/json"))
    replayed = Request(scope, _replay(raw))
    if raw and (as_json or "json" in ctype.split(";")[0]):
        parsed = _parse_bounded(raw)
        if parsed is not _INVALID:
            replayed._json = parsed  # starlette's cache: FastAPI's parser uses it as is
    return replayed


_INVALID = object()


def _parse_bounded(raw: bytes) -> Any:
    """The body as JSON, or ``_INVALID`` when it is not JSON (FastAPI reports where).

    Raises:
        ApiError: 400 when nested deeper than MAX_JSON_DEPTH (or too deep for the parser).
    """
    too_deep = ApiError(
        400, "validation", f"the body nests JSON lists or objects deeper than {MAX_JSON_DEPTH} levels"
    )
    try:
        parsed = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except ValueError:
        return _INVALID
    if json_depth(parsed, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise too_deep
    return parsed


def json_depth(value: Any, limit: int) -> int:
    """How deeply ``value`` (parsed JSON) nests lists and objects; stops counting past ``limit``.

    Iterative, so no depth of input can exhaust the stack.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def route_class(max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> type[ApiRoute]:
    """An :class:`ApiRoute` bounded at ``max_request_bytes`` (MAX_REQUEST_BYTES)."""
    return type("BoundedApiRoute", (ApiRoute,), {"max_request_bytes": max_request_bytes})
