"""The route table: every path llmux answers or forwards, and the rules a path must pass first.

Why it is shaped like this:
- Routing happens on the path exactly as the client sent it (`raw_path`), never on a decoded or
  normalised form, and a forwarded request carries exactly the bytes that were routed. A proxy
  that checks one spelling of a path and forwards another lets `/v1/../sleep` through to a
  backend's control API.
- Only the table's entries reach a backend. Being under `/v1/` is not enough: vLLM's
  `/v1/load_lora_adapter` is there too. Anything else a backend offers is reachable only through
  `/upstream/{model}/...` and a per-model allow-list (`passthrough_paths`), off by default.
- A path with dot segments (in any percent-encoding), a backslash, a fragment or anything but
  origin form is refused with 400 before any route is looked at: such a path means something
  different to each server that reads it. `%2F` is accepted only inside a model-name parameter,
  which llmux decodes and consumes itself (model names such as `Qwen/Qwen2.5-7B` hold slashes).
- The query string goes upstream as received too, so it is held to what a client that encodes
  sends: printable ASCII, no space, no raw `#`. Over HTTP/1.1 the parser refuses most of the
  rest already, but llmux does not rely on a parser (HTTP/2 carries any byte but CR, LF, NUL).

This module does no I/O: it turns (method, raw path, query) into a `RouteMatch` or an
`LlmuxError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote_to_bytes

from llmux.errors import InvalidPath, MethodNotAllowed, RouteNotFound
from llmux.request_target import check_path, check_query


class ModelFrom(Enum):
    """Where a route finds the model a request is for."""

    JSON_BODY = "the body's top-level `model` string"
    FORM_FIELD = "the `model` field of a multipart/form-data body"
    PATH = "a {model} parameter of the path"
    NONE = "nowhere: the route names no model"


class Endpoint(Enum):
    """What llmux does with a matched request."""

    PROXY = "forward to the model's backend"
    UPSTREAM = "forward to an allow-listed path of the model's backend"
    MODEL_LIST = "list the models"
    MODEL = "describe one model"
    HEALTH = "say that llmux runs and takes requests"
    MODEL_HEALTH = "say whether a model can be asked for here"
    METRICS = "Prometheus text"
    STATUS = "llmux's state as JSON"
    ADMIN_WAKE = "wake a model"
    ADMIN_SLEEP = "put a model to sleep"
    ADMIN_SLEEP_ALL = "put every model to sleep"


class Access(Enum):
    """Who may use a route."""

    PUBLIC = "anyone who reaches the port"
    CLIENT = "clients with an API key, when keys are set"
    METRICS = "clients with an API key, unless auth.public_metrics"
    STATUS = "clients with an API key, unless auth.public_status"
    ADMIN = "the admin token holder; absent without auth.admin_token"


@dataclass(frozen=True)
class Route:
    """One entry: methods, a path pattern, where its model is, what happens, who may.

    Patterns are literal but for `{name}` (one path segment, percent-decoded, `%2F` allowed)
    and `{name*}` (one or more segments: raw `/` allowed too). `{rest*}` at the end of an
    upstream route is the backend path, forwarded as received."""

    methods: tuple[str, ...]
    pattern: str
    endpoint: Endpoint
    model_from: ModelFrom
    access: Access

    @property
    def forwards(self) -> bool:
        return self.endpoint in (Endpoint.PROXY, Endpoint.UPSTREAM)


def _api(path: str) -> Route:
    return Route(("POST",), path, Endpoint.PROXY, ModelFrom.JSON_BODY, Access.CLIENT)


def _form(path: str) -> Route:
    return Route(("POST",), path, Endpoint.PROXY, ModelFrom.FORM_FIELD, Access.CLIENT)


def _admin(path: str, endpoint: Endpoint, model_from: ModelFrom) -> Route:
    return Route(("POST",), path, endpoint, model_from, Access.ADMIN)


_NO_MODEL = ModelFrom.NONE
ROUTES: tuple[Route, ...] = (
    # The model APIs routed by the `model` of a JSON body (OpenAI, Anthropic, vLLM, llama.cpp).
    _api("/v1/chat/completions"),
    _api("/v1/completions"),
    _api("/v1/embeddings"),
    _api("/v1/responses"),
    _api("/v1/messages"),
    _api("/v1/messages/count_tokens"),
    _api("/v1/moderations"),
    _api("/v1/images/generations"),
    _api("/v1/audio/speech"),
    _api("/v1/rerank"),
    _api("/rerank"),  # vLLM and llama.cpp serve both spellings
    _api("/v1/score"),
    _api("/infill"),  # llama.cpp's fill-in-the-middle
    # Uploads: the model is a field of a multipart/form-data body.
    _form("/v1/audio/transcriptions"),
    _form("/v1/audio/translations"),
    _form("/v1/images/edits"),
    # A backend's other paths, per model, only when its `passthrough_paths` lists them.
    Route(
        ("GET", "POST", "PUT", "PATCH", "DELETE"),
        "/upstream/{model}{rest*}",
        Endpoint.UPSTREAM,
        ModelFrom.PATH,
        Access.CLIENT,
    ),
    # What llmux answers itself.
    Route(("GET",), "/v1/models", Endpoint.MODEL_LIST, _NO_MODEL, Access.CLIENT),
    Route(("GET",), "/v1/models/{model*}", Endpoint.MODEL, ModelFrom.PATH, Access.CLIENT),
    Route(("GET", "HEAD"), "/health", Endpoint.HEALTH, _NO_MODEL, Access.PUBLIC),
    # For a front's per-model health checks (examples/several-boxes): as public as /health.
    Route(
        ("GET", "HEAD"), "/health/{model*}", Endpoint.MODEL_HEALTH, ModelFrom.PATH, Access.PUBLIC
    ),
    Route(("GET",), "/metrics", Endpoint.METRICS, _NO_MODEL, Access.METRICS),
    Route(("GET",), "/llmux/status", Endpoint.STATUS, _NO_MODEL, Access.STATUS),
    _admin("/llmux/models/{model*}/wake", Endpoint.ADMIN_WAKE, ModelFrom.PATH),
    _admin("/llmux/models/{model*}/sleep", Endpoint.ADMIN_SLEEP, ModelFrom.PATH),
    _admin("/llmux/sleep", Endpoint.ADMIN_SLEEP_ALL, _NO_MODEL),
)


@dataclass(frozen=True)
class RouteMatch:
    route: Route
    model: str | None = None  # the decoded {model} parameter, for ModelFrom.PATH
    forward_path: bytes | None = None  # what a forwarding route sends upstream (no query)


class RouteTable:
    """Matches requests against a tuple of routes; built once."""

    def __init__(self, routes: tuple[Route, ...], admin: bool) -> None:
        # Without an admin token the admin routes do not exist: 404, as for any unknown path.
        self.routes = tuple(r for r in routes if admin or r.access is not Access.ADMIN)
        self._compiled = [(route, _compile(route.pattern)) for route in self.routes]

    def match(self, method: str, raw_path: bytes, query: bytes = b"") -> RouteMatch:
        """The route for a request; raise InvalidPath or InvalidQuery (400), RouteNotFound
        (404) or MethodNotAllowed (405)."""
        check_path(raw_path)
        check_query(query)
        allowed: list[str] = []
        for route, pattern in self._compiled:
            found = pattern.fullmatch(raw_path)
            if found is None:
                continue
            if _encoded_slash(_outside_model(found, raw_path)):
                raise InvalidPath("an encoded slash (%2F) is allowed only in a model name")
            if method not in route.methods:
                allowed += [m for m in route.methods if m not in allowed]
                continue
            return _build_match(route, found.groupdict(), raw_path)
        if allowed:
            raise MethodNotAllowed(
                f"{method} is not allowed on {_printable(raw_path)}; use {', '.join(allowed)}",
                allowed,
            )
        if _encoded_slash(raw_path):
            raise InvalidPath("an encoded slash (%2F) is allowed only in a model name")
        raise RouteNotFound(
            f"no route for {method} {_printable(raw_path)}; llmux serves "
            + ", ".join(f"{' '.join(r.methods)} {r.pattern}" for r in self.routes)
        )


def _build_match(route: Route, params: dict[str, bytes], raw_path: bytes) -> RouteMatch:
    model = None
    if "model" in params:
        model = unquote_to_bytes(params["model"]).decode("utf-8", errors="replace")
    forward = None
    if route.endpoint is Endpoint.PROXY:
        forward = raw_path
    elif route.endpoint is Endpoint.UPSTREAM:
        forward = params["rest"]
    return RouteMatch(route, model, forward)


_PARAM = re.compile(r"\{(\w+)(\*?)\}")


def _compile(pattern: str) -> re.Pattern[bytes]:
    """A pattern as a regex over raw path bytes: literals escaped, parameters as groups."""
    out, last = [], 0
    for param in _PARAM.finditer(pattern):
        out.append(re.escape(pattern[last : param.start()]))
        name, many = param.group(1), param.group(2)
        if name == "rest":
            out.append(rf"(?P<{name}>/[^?]*)")  # a backend path: starts with /
        else:
            out.append(rf"(?P<{name}>[^/]+(?:/[^/]+)*)" if many else rf"(?P<{name}>[^/]+)")
        last = param.end()
    out.append(re.escape(pattern[last:]))
    return re.compile("".join(out).encode())


def _outside_model(found: re.Match[bytes], raw_path: bytes) -> bytes:
    if "model" not in found.groupdict():
        return raw_path
    start, end = found.span("model")
    return raw_path[:start] + raw_path[end:]


def _encoded_slash(raw: bytes) -> bool:
    return b"%2f" in raw.lower()


def _printable(raw: bytes) -> str:
    return raw.decode("ascii", errors="backslashreplace")[:200]


def prefix_allows(prefix: str, path: bytes) -> bool:
    """Whether an allow-listed prefix covers a backend path, on segment boundaries:
    `/tokenize` covers `/tokenize` and `/tokenize/x`, not `/tokenizer`."""
    wanted = prefix.rstrip("/").encode()
    if not wanted:  # "/": the operator opened every path of this backend
        return True
    return path == wanted or path.startswith(wanted + b"/")
