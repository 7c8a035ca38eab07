"""What a request target may hold, in one place: the route table checks every request with it,
and the config checks a model's `passthrough_paths` with it (so that config needs no HTTP code).

A path is held to plain origin form and a query to what a client that encodes sends; routes.py
says why.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from llmux.errors import InvalidPath, InvalidQuery

_DECODE_ROUNDS = 3  # %252e%252e is `..` to a server that decodes twice; three rounds see it


def check_path(raw_path: bytes) -> None:
    """Refuse (400) a path that is not plain origin form: dot segments in any encoding,
    backslashes, fragments, empty segments, bytes outside printable ASCII."""
    if not raw_path.startswith(b"/"):
        raise InvalidPath("the request target must be a path starting with / (origin form)")
    if b"//" in raw_path:
        raise InvalidPath("the path must not hold an empty segment (//)")
    if any(byte < 0x21 or byte > 0x7E for byte in raw_path):
        raise InvalidPath("the path holds a byte outside printable ASCII")
    if b"#" in raw_path:
        raise InvalidPath("the request target must not hold a fragment (#)")
    decoded = raw_path
    for _ in range(_DECODE_ROUNDS):
        if b"\\" in decoded:
            raise InvalidPath("the path must not hold a backslash, raw or encoded")
        if any(segment in (b".", b"..") for segment in decoded.split(b"/")):
            raise InvalidPath("the path must not hold . or .. segments, raw or encoded")
        if b"%" not in decoded:
            return
        decoded = unquote_to_bytes(decoded)
    if b"\\" in decoded or any(s in (b".", b"..") for s in decoded.split(b"/")):
        raise InvalidPath("the path must not hold . or .. segments, raw or encoded")


def check_query(query: bytes) -> None:
    """Refuse (400) a query string holding what a client would have percent-encoded: it would
    reach the backend's request line as is (a space there splits it)."""
    if any(byte < 0x21 or byte > 0x7E for byte in query):
        raise InvalidQuery(
            "the query string holds a space, a control or a byte outside printable ASCII; "
            "percent-encode it"
        )
    if b"#" in query:
        raise InvalidQuery("the query string must not hold a raw # (a fragment); write %23")
