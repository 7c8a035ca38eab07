"""The route table and path rules, without sockets: what matches, what is refused, and that
nothing but a table path (or an upstream remainder) is ever forwarded."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmux.errors import InvalidPath, InvalidQuery, LlmuxError, MethodNotAllowed, RouteNotFound
from llmux.http.proxy import forwarded_request_headers, forwarded_response_headers
from llmux.http.routes import ROUTES, Endpoint, ModelFrom, RouteTable, prefix_allows
from llmux.request_target import check_path

TABLE = RouteTable(ROUTES, admin=True)
LITERAL_API_PATHS = {r.pattern.encode() for r in ROUTES if r.endpoint is Endpoint.PROXY}


def test_every_api_route_finds_its_model_in_the_body_and_forwards_its_own_path():
    uploads = {b"/v1/audio/transcriptions", b"/v1/audio/translations", b"/v1/images/edits"}
    for path in LITERAL_API_PATHS:
        match = TABLE.match("POST", path)
        body = ModelFrom.FORM_FIELD if path in uploads else ModelFrom.JSON_BODY
        assert match.route.model_from is body, path
        assert match.forward_path == path


def test_model_parameters_decode_and_may_hold_slashes():
    assert TABLE.match("GET", b"/v1/models/Qwen%2FQwen2.5-7B").model == "Qwen/Qwen2.5-7B"
    assert TABLE.match("GET", b"/v1/models/Qwen/Qwen2.5-7B").model == "Qwen/Qwen2.5-7B"
    wake = TABLE.match("POST", b"/llmux/models/org/m%20x/wake")
    assert (wake.route.endpoint, wake.model) == (Endpoint.ADMIN_WAKE, "org/m x")
    upstream = TABLE.match("POST", b"/upstream/org%2Fm/tokenize/x")
    assert (upstream.model, upstream.forward_path) == ("org/m", b"/tokenize/x")


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../x",
        b"/v1/%2e%2E/x",
        b"/v1/%252e%252e/x",
        b"/v1/..%2fx",
        b"/a\\b",
        b"/a%5Cb",
        b"/v1/.",
        b"x/v1/chat/completions",
        b"http://h/v1/chat/completions",
        b"/v1/chat/completions#f",
        b"//v1/chat/completions",
        b"/v1/chat%2Fcompletions",
        b"/upstream/a/tok%2Fenize",
        b"/v1/\x01",
    ],
)
def test_paths_that_mean_different_things_to_different_servers_are_refused(path):
    with pytest.raises(InvalidPath):
        TABLE.match("POST", path)


@pytest.mark.parametrize("query", [b"a b", b"a#b", b"#", b"x=\xff", b"a\tb", b"a\x00", b"a\x7f"])
def test_queries_holding_what_clients_encode_are_refused(query):
    with pytest.raises(InvalidQuery):
        TABLE.match("POST", b"/v1/chat/completions", query)


def test_encoded_queries_pass_as_they_are():
    match = TABLE.match("POST", b"/v1/chat/completions", b"a=%20&b=%23&c=..%2f/x\\y&d=?")
    assert match.forward_path == b"/v1/chat/completions"  # the query is appended as received


def test_unknown_paths_and_wrong_methods():
    with pytest.raises(RouteNotFound):
        TABLE.match("POST", b"/v1/load_lora_adapter")
    with pytest.raises(MethodNotAllowed) as refused:
        TABLE.match("DELETE", b"/health")
    assert refused.value.allowed == ["GET", "HEAD"]
    with pytest.raises(RouteNotFound):
        RouteTable(ROUTES, admin=False).match("POST", b"/llmux/sleep")


def test_allow_list_prefixes_end_on_segment_boundaries():
    assert prefix_allows("/tokenize", b"/tokenize") and prefix_allows("/tokenize", b"/tokenize/x")
    assert prefix_allows("/tokenize/", b"/tokenize/x")
    assert not prefix_allows("/tokenize", b"/tokenizer")
    assert prefix_allows("/", b"/anything")


@given(st.binary(max_size=60), st.sampled_from(["GET", "POST", "PUT", "HEAD"]))
def test_whatever_is_forwarded_is_a_table_path_or_an_upstream_remainder(raw, method):
    path = b"/" + raw
    try:
        match = TABLE.match(method, path)
    except LlmuxError as error:
        assert error.status in (400, 404, 405)
        return
    if match.forward_path is None:
        return
    check_path(match.forward_path)  # a forwarded path passes the rules on its own
    if match.route.endpoint is Endpoint.PROXY:
        assert match.forward_path in LITERAL_API_PATHS
    else:
        assert path.endswith(match.forward_path) and b"%2f" not in match.forward_path.lower()


def test_connection_named_and_credential_headers_are_dropped_both_ways():
    sent = [
        (b"authorization", b"Bearer k"),
        (b"x-api-key", b"k"),
        (b"connection", b"keep-alive, X-Hop"),
        (b"connection", b"x-other"),
        (b"x-hop", b"1"),
        (b"x-other", b"1"),
        (b"x-kept", b"1"),
    ]
    kept = forwarded_request_headers(sent, strip_credentials=True, backend_api_key=None)
    assert [name for name, _ in kept] == [b"x-kept", b"accept-encoding"]
    keyed = forwarded_request_headers(sent, strip_credentials=False, backend_api_key="b")
    assert (b"authorization", b"Bearer b") in keyed and (b"x-api-key", b"k") not in keyed
    answered = [(b"connection", b"x-secret"), (b"x-secret", b"1"), (b"x-fine", b"1")]
    assert [name for name, _ in forwarded_response_headers(answered)] == [b"x-fine"]
