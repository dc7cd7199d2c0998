"""Bearer-token check shared by every mutating HTTP endpoint."""

from __future__ import annotations

import hmac


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
