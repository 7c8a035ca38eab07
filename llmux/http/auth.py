"""API-key checks for clients and for the admin API, in constant time.

Keys are compared with `hmac.compare_digest` against every configured key, without stopping at
the first match, so the time taken says nothing about which key, or how much of one, matched.
Keys never reach a log line, a metric label or a backend.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

# The headers a client may carry its key in: OpenAI's SDKs send a bearer token, Anthropic's
# send `x-api-key`. Both are credentials for llmux, and are never forwarded when llmux checks
# keys (see proxy.forwarded_request_headers).
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key"})


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The client's key: its bearer token, else its `x-api-key`."""
    headers = list(headers)
    token = bearer_token(headers)
    if token is not None:
        return token
    for name, value in headers:
        if name.lower() == b"x-api-key":
            return value.decode("latin-1").strip()
    return None


def token_matches(presented: str | None, accepted: Sequence[str]) -> bool:
    if presented is None:
        return False
    given = presented.encode()
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(given, key.encode())
    return matched
