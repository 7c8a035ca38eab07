"""`llmux haproxy`: an HAProxy configuration for several llmux boxes, routed by model.

The model is inside the JSON body, which HAProxy reads with `option http-buffer-request` and
`req.body,json_query('$.model')` (or, for `GET /v1/models/MODEL`, from the path). Each model
(and each alias) gets a backend of the boxes that serve it, balanced by a consistent hash of the
model's name: while those boxes are healthy, every request for a model goes to one of them, so
no box switches all day because a round robin sent it everyone's models; when that box fails or
drains, the model moves to the next box that serves it. Each server is health-checked with
`GET /health/MODEL`, which answers 503 once that llmux drains. Requests with no model in their
body (`GET /v1/models`, a multipart upload) go to any healthy box.

The front speaks OpenAI like the boxes do: every answer HAProxy makes itself (no box up, a box
that broke off, a timeout, a request it cannot parse) is an OpenAI-shaped JSON error, and the
answers that concern every box at once are the front's, not one box's: `GET /v1/models` lists
what all boxes serve, and a model no box serves gets a 404 that names all of theirs. Both are
put in place of a box's own answer only once that box has answered it (200, or 404), so a box
that wants an API key still answers 401 first. They are static text written here.

The configuration is generated from what the boxes say they serve (`GET /llmux/status` and
`GET /v1/models`), so the front never drifts from the boxes: run it again after a box's config
changes. Everything written is escaped for where it goes: a model name is percent-encoded in a
health-check path, JSON-escaped in bodies and comments, and refused unless it is one printable
word (llmux/model_names.py), which is all a line of the map file can hold.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from llmux.errors import (
    BackendTimeout,
    BackendUnavailable,
    BodyTooLarge,
    InternalError,
    InvalidRequest,
    LlmuxError,
    ModelNotFound,
    ModelUnavailable,
    RequestTimeout,
)
from llmux.model_names import model_name_problem

# Request bodies up to this size are read whole to find `model` (HAProxy's default buffer is
# 16 KB: a 40 KB prompt whose `model` comes after `messages` would not route). Larger bodies
# are refused by HAProxy with 413 unless routed another way (see examples/several-boxes).
BUFFER_BYTES = 1024 * 1024
ANY_BACKEND = "llmux_any"
REQUEST_TIMEOUT = "75s"  # for a request's head and body: llmux's request_head_timeout_secs
# The front's 404 echoes at most this much of the name asked for (a real name is far shorter):
# a client's megabyte-long `model` must not make an answer larger than HAProxy's buffer.
ECHOED_NAME_BYTES = 256
_ASKED = f"%[var(txn.model),bytes(0,{ECHOED_NAME_BYTES}),json(utf8s)]"
_PLACEHOLDER = "\x00"  # stands for _ASKED until the 404's JSON is written (names hold no NUL)

# What HAProxy may write into its config unquoted: proxy and server names (its own rule), and
# the operator's addresses, times and map path, which also go inside `map(...)` arguments.
_HAPROXY_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_.:/@*+=\[\]-]+")


@dataclass(frozen=True)
class Box:
    name: str
    url: str
    models: dict[str, tuple[str, ...]]  # model -> its aliases
    list_aliases: bool = False  # its /v1/models lists aliases beside models ([server])
    created: dict[str, int] = field(default_factory=dict)  # /v1/models' `created` per name

    @property
    def address(self) -> str:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{self.url}: an http://HOST:PORT address is needed")
        return _plain(f"{parts.hostname}:{parts.port or 80}", f"{self.name}'s address")


def fetch_box(name: str, url: str, api_key: str | None = None, timeout: float = 10.0) -> Box:
    """What one llmux serves (its /llmux/status), and whether it lists aliases (/v1/models)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client:
        models = _get_json(client, "/llmux/status")["models"]
        listed = _get_json(client, "/v1/models")["data"]
    return Box(
        name,
        url,
        {m: tuple(info.get("aliases", ())) for m, info in models.items()},
        list_aliases=any((entry.get("llmux") or {}).get("alias_of") for entry in listed),
        created={
            entry["id"]: entry["created"]
            for entry in listed
            if isinstance(entry.get("id"), str) and type(entry.get("created")) is int
        },
    )


def _get_json(client: httpx.Client, path: str) -> Any:
    response = client.get(path)
    response.raise_for_status()
    return response.json()


def backend_name(index: int, model: str) -> str:
    """An HAProxy-safe backend name for a model (names may hold dots, slashes, colons)."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in model)
    return f"model{index}_{safe}"


@dataclass(frozen=True)
class _Served:
    """What the boxes serve, merged: the front's view of every model and name."""

    hosts: dict[str, list[Box]]  # model -> the boxes that serve it, in the order given
    names: dict[str, str]  # a name clients may send (model or alias) -> the model it is
    listed: dict[str, str]  # what /v1/models lists -> the model it is, in order
    # An alias that not every box of its model knows -> the boxes that do: it gets a backend
    # of its own, so that no box is sent a name it would answer 404.
    alias_hosts: dict[str, list[Box]]

    def boxes_of(self, name: str) -> list[Box]:
        return self.alias_hosts.get(name) or self.hosts[self.names[name]]

    def created(self, name: str) -> int:
        """When the boxes were configured with it (the earliest); 0 if none says."""
        times = [box.created[name] for box in self.boxes_of(name) if name in box.created]
        return min(times, default=0)


def _merge(boxes: list[Box]) -> _Served:
    hosts: dict[str, list[Box]] = {}
    names: dict[str, str] = {}
    listed: dict[str, str] = {}
    for box in boxes:
        for model, aliases in box.models.items():
            for name in (model, *aliases):
                if problem := model_name_problem(name):
                    raise ValueError(f"{box.name} serves a name the front cannot route: {problem}")
            hosts.setdefault(model, []).append(box)
            names[model] = listed[model] = model
            for alias in aliases:
                names.setdefault(alias, model)
                if box.list_aliases:
                    listed.setdefault(alias, model)
    knowing: dict[str, list[Box]] = {}
    for box in boxes:
        for model, aliases in box.models.items():
            for alias in aliases:
                if names[alias] == model:  # an alias two boxes give two models: the first's
                    knowing.setdefault(alias, []).append(box)
    partial = {alias: by for alias, by in knowing.items() if by != hosts[names[alias]]}
    return _Served(hosts, names, listed, partial)


def haproxy_config(
    boxes: list[Box],
    *,
    map_path: str,
    bind: str = ":8080",
    check_interval: str = "1s",
    timeout: str = "10m",
) -> tuple[str, str]:
    """The haproxy.cfg text and the map file's (model or alias -> backend); the config reads
    the map from `map_path`."""
    for box in boxes:
        _haproxy_name(box.name, "a box's name")
    for value, what in (
        (map_path, "the map's path"),
        (bind, "the bind address"),
        (check_interval, "the check interval"),
        (timeout, "the timeout"),
    ):
        _plain(value, what)
    served = _merge(boxes)
    own = [*served.hosts, *served.alias_hosts]  # the models, then the aliases of some boxes
    backends = {name: backend_name(i, name) for i, name in enumerate(own, 1)}
    lines = _head(timeout)
    lines += _frontend(bind, map_path, served)
    for name in own:
        lines += _model_backend(backends[name], name, served.boxes_of(name), check_interval)
    lines += [f"backend {ANY_BACKEND}", "    balance roundrobin", "    option httpchk GET /health"]
    lines += [_server(box, check_interval) for box in boxes]
    mapping = "".join(
        _map_line(name, backends.get(name) or backends[model])
        for name, model in sorted(served.names.items())
    )
    return "\n".join(lines) + "\n", mapping


def _head(timeout: str) -> list[str]:
    return [
        "# Generated by `llmux haproxy`: one backend per model, the boxes that serve it.",
        "global",
        f"    tune.bufsize {BUFFER_BYTES}",
        "",
        "defaults",
        "    mode http",
        "    option http-buffer-request  # read the body, to route by its model",
        "    timeout connect 5s",
        f"    timeout client {timeout}  # long generations, and streams between tokens",
        f"    timeout server {timeout}",
        f"    timeout http-request {REQUEST_TIMEOUT}",
        "    retries 2",
        "    retry-on 503 conn-failure empty-response  # a box drains, is gone or closed: next",
        "    option redispatch 1  # every retry goes to the next box, not the same one again",
        "    # HAProxy's own answers, in the JSON shape OpenAI clients read (not its HTML pages)",
        *[_http_error(status, error) for status, error in _own_errors(timeout)],
        "",
    ]


def _own_errors(timeout: str) -> list[tuple[int, LlmuxError]]:
    """The answers HAProxy may make itself, as llmux's own errors would word them. (HAProxy
    before 3.5 still writes its HTML for errors met before a request is parsed at all:
    malformed HTTP, or no request head within `timeout http-request`.)"""
    return [
        (400, InvalidRequest("the front (HAProxy) could not read this HTTP request")),
        (408, RequestTimeout(f"the request did not arrive within {REQUEST_TIMEOUT}")),
        (413, BodyTooLarge("the request is larger than the front (HAProxy) takes")),
        (500, InternalError("the front (HAProxy) failed to answer this request")),
        (501, InvalidRequest("the front (HAProxy) does not implement what this request asks")),
        (502, BackendUnavailable("the box that took this request broke off or answered nonsense")),
        (503, ModelUnavailable("no llmux box is up to take this request")),
        (504, BackendTimeout(f"the box that took this request sent nothing within {timeout}")),
    ]


def _http_error(status: int, error: LlmuxError) -> str:
    return f"    http-error status {status} content-type application/json string {_quoted(error)}"


def _frontend(bind: str, map_path: str, served: _Served) -> list[str]:
    in_map = f"var(txn.model),map({map_path})"
    return [
        "frontend llm",
        f"    bind {bind}",
        "    http-request set-var(txn.model) req.body,json_query('$.model')",
        "    http-request set-var(txn.model) path,regsub(^/v1/models/,),url_dec "
        "if { path_beg /v1/models/ }",
        "    # The front's own answers, once a box has answered (and so checked the key):",
        "    # the list of every box's models, and a 404 that names them all.",
        "    http-request set-var(txn.listing) bool(true) if { method GET } { path /v1/models }",
        "    http-request set-var(txn.unknown) bool(true) "
        f"if {{ var(txn.model) -m found }} !{{ {in_map} -m found }}",
        "    http-response return status 200 content-type application/json "
        f"string {_quoted(_model_list(served))} if {{ var(txn.listing) -m bool }} {{ status 200 }}",
        "    http-response return status 404 content-type application/json "
        f"lf-string {_not_served(served)} if {{ var(txn.unknown) -m bool }} {{ status 404 }}",
        f"    use_backend %[{in_map}] if {{ {in_map} -m found }}",
        f"    default_backend {ANY_BACKEND}",
        "",
    ]


def _model_list(served: _Served) -> bytes:
    """`GET /v1/models` as each box writes it, for every name any box lists. The live fields
    of a box's own list (state, queue) have no meaning across boxes: `llmux` names the boxes."""
    data = []
    for name, model in served.listed.items():
        about: dict[str, Any] = {"boxes": [box.name for box in served.boxes_of(name)]}
        if name != model:
            about["alias_of"] = model
        created = served.created(name)
        entry = {"id": name, "object": "model", "created": created, "owned_by": "llmux"}
        data.append({**entry, "llmux": about})
    return json.dumps({"object": "list", "data": data}).encode()


def _not_served(served: _Served) -> str:
    """llmux's own 404 for an unknown model, naming every box's models: a log-format string
    that echoes the name asked for, JSON-escaped by HAProxy."""
    known = ", ".join(served.hosts)
    error = ModelNotFound(f"model '{_PLACEHOLDER}' is not served here; known models: {known}")
    text = error.body().decode().replace("%", "%%")
    escaped = json.dumps(_PLACEHOLDER)[1:-1]
    assert text.count(escaped) == 1
    return _quoted(text.replace(escaped, _ASKED))


def _model_backend(name: str, model: str, hosts: list[Box], check_interval: str) -> list[str]:
    down = ModelUnavailable(
        f"no box that serves model {model!r} is up "
        f"({', '.join(box.name for box in hosts)}: down or draining)"
    )
    return [
        f"backend {name}  # {json.dumps(model)}",
        "    balance hash var(txn.model)",
        "    hash-type consistent",
        f"    option httpchk GET /health/{_path_segment(model)}",
        _http_error(503, down),
        *[_server(box, check_interval) for box in hosts],
        "",
    ]


def _server(box: Box, check_interval: str) -> str:
    return f"    server {box.name} {box.address} check inter {check_interval} fall 2 rise 2"


def _path_segment(model: str) -> str:
    """A model name as the path of a health check (slashes stay: llmux reads {model*})."""
    return quote(model, safe="/:")


def _map_line(name: str, backend: str) -> str:
    """One line of the map: HAProxy's map files have no escapes, so a key is one word, and one
    that starts with `#` is indented (a `#` in the first column makes the line a comment)."""
    assert model_name_problem(name) is None
    return f"{' ' if name.startswith('#') else ''}{name} {backend}\n"


def _quoted(text: str | bytes | LlmuxError) -> str:
    """`text` as one HAProxy config word: strongly quoted, a single quote written as `\\'`
    between quotes (HAProxy joins the pieces). Only for text with no control characters."""
    if isinstance(text, LlmuxError):
        text = text.body()
    if isinstance(text, bytes):
        text = text.decode()
    if any(not char.isprintable() for char in text):
        raise ValueError(f"{text[:60]!r}: cannot be written on one config line")
    return "'" + text.replace("'", "'\\''") + "'"


def _plain(text: str, what: str) -> str:
    """An operator's value written as is: refused if HAProxy would read it as more than one
    word, a comment, a quote, a variable or an argument separator."""
    if not _PLAIN_WORD.fullmatch(text):
        raise ValueError(f"{what} {text!r} holds characters HAProxy's config would misread")
    return text


def _haproxy_name(text: str, what: str) -> str:
    if not _HAPROXY_NAME.fullmatch(text):
        raise ValueError(f"{what} {text!r}: use letters, digits, '-', '_', '.' and ':' only")
    return text


def parse_boxes(specs: list[str]) -> Mapping[str, str]:
    boxes: dict[str, str] = {}
    for spec in specs:
        name, equals, url = spec.partition("=")
        if not equals or not name or not url:
            raise ValueError(f"{spec!r}: give each box as NAME=http://HOST:PORT")
        boxes[_haproxy_name(name, "a box's name")] = url
    return boxes
