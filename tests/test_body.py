"""The early model scanner: whatever the JSON and however it is split, what it reports is what
the full parse says (or it says nothing), where it says the name lies is where it lies, and a long
string is scanned once, not per chunk."""

from __future__ import annotations

import json
import time

from hypothesis import given
from hypothesis import strategies as st

from llmux.http.body import ModelScanner

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def _scan(body: bytes, cuts: list[int]) -> ModelScanner:
    scanner = ModelScanner()
    seen = b""
    for cut in [*sorted(cuts), len(body)]:
        seen = body[: max(cut, len(seen))]
        scanner.feed(seen)
    return scanner


@given(
    payload=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    model=st.one_of(st.none(), st.text(max_size=20), json_values),
    first=st.booleans(),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    indent=st.sampled_from([None, 1, "\t"]),
    ascii_only=st.booleans(),
)
def test_the_scanner_agrees_with_the_full_parse(payload, model, first, cuts, indent, ascii_only):
    payload = {k: v for k, v in payload.items() if k != "model"}
    if model is not None:
        payload = {"model": model, **payload} if first else {**payload, "model": model}
    body = json.dumps(payload, indent=indent, ensure_ascii=ascii_only).encode()
    scanner = _scan(body, cuts)
    assert scanner.done
    expected = payload.get("model")
    if scanner.model is not None or isinstance(expected, str):
        assert scanner.model == expected
    if scanner.model is not None:  # its span is the string's inside: a new name fits there
        assert scanner.span is not None
        start, end = scanner.span
        assert json.loads(b'"' + body[start:end] + b'"') == scanner.model
        renamed = body[:start] + json.dumps("x/\ud800y")[1:-1].encode() + body[end:]
        assert json.loads(renamed) == {**payload, "model": "x/\ud800y"}


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=5))
def test_any_bytes_give_a_model_the_full_parse_confirms_or_none(body, cuts):
    scanner = _scan(body, cuts)
    if scanner.model is None:
        return
    try:
        parsed = json.loads(body)
    except ValueError:
        return  # the full parse refuses it: the scanner's hint is never used alone
    if isinstance(parsed, dict) and list(parsed).count("model") == 1:
        assert parsed["model"] == scanner.model


def test_escapes_and_nesting():
    body = rb'{"mo\u0064el": "a\"b", "x": {"model": "inner"}}'
    assert _scan(body, [5, 11, 15]).model == 'a"b'
    nested_first = b'{"messages": [{"model": "no"}], "model": "yes"}'
    assert _scan(nested_first, [3, 20]).model == "yes"
    assert _scan(b'{"model": 5, "x": 1}', []).model is None
    assert _scan(b'[{"model": "a"}]', []).model is None
    assert _scan(b'{"model": "a\\', []).done is False  # an escape cut at the end: wait


def test_a_long_string_is_not_rescanned_for_every_chunk():
    big = b'{"messages": "' + b"x" * 8_000_000 + b'", "model": "a"}'
    scanner, body = ModelScanner(), bytearray()
    began = time.perf_counter()
    for start in range(0, len(big), 65536):
        body += big[start : start + 65536]  # the body grows as BodyReader's does
        scanner.feed(body)
    assert scanner.model == "a"
    # Rescanning from the string's start each time would read ~500 GB; one pass reads 8 MB.
    assert time.perf_counter() - began < 5
