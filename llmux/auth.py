"""Bearer-token checks for clients and for the admin API, in constant time.

Keys are compared with `hmac.compare_digest` against every configured key, without stopping at
the first match, so the time taken says nothing about which key, or how much of one, matched.
Keys never reach a log line or a metric label.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def token_matches(presented: str | None, accepted: Sequence[str]) -> bool:
    if presented is None:
        return False
    given = presented.encode()
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(given, key.encode())
    return matched
