"""The bearer token that guards every mutating HTTP endpoint: one check, one FastAPI dependency."""

from __future__ import annotations

import hmac

from fastapi import Header

from orchestrator.core.http import ApiError, RequestCheck

UNAUTHORIZED_MESSAGE = "missing or wrong bearer token: send Authorization: Bearer $ORCHESTRATOR_TOKEN"


def bearer_ok(expected_token: str, authorization: str | None) -> bool:
    """True when no token is configured, or the header carries it (constant-time compare)."""
    if not expected_token:
        return True
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), expected_token.encode())


class BearerAuth(RequestCheck):
    """``dependencies=[Depends(BearerAuth(token))]``: 401 unless the request carries the token.

    :class:`orchestrator.core.http.ApiRoute` also runs it before reading a request's body, so an
    unauthenticated client cannot make the server read (up to MAX_REQUEST_BYTES of) its upload.
    """

    def __init__(self, token: str) -> None:
        self._token = token

    def check(self, authorization: str | None) -> None:
        """Raises ApiError 401 (with ``WWW-Authenticate: Bearer``) unless the header is right."""
        if not bearer_ok(self._token, authorization):
            raise ApiError(401, "unauthorized", UNAUTHORIZED_MESSAGE, headers={"WWW-Authenticate": "Bearer"})

    def __call__(self, authorization: str | None = Header(default=None)) -> None:
        self.check(authorization)
