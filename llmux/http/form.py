"""The `model` field of a multipart/form-data body (audio transcriptions, image edits), found
while the upload arrives, by python-multipart's streaming parser.

As for JSON bodies (body.py), what is found early lets llmux refuse at once; the whole body is
still parsed before it is forwarded, and a form that names `model` twice, or is not a form, is
refused. The field's byte span is kept so that an `upstream_model` can replace its value.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from llmux.errors import InvalidRequest
from llmux.http.asgi import Scope

MAX_MODEL_BYTES = 1024  # a model name longer than this is not one


def form_boundary(scope: Scope) -> bytes:
    """The boundary of a multipart/form-data request, or a 400 saying what is expected."""
    content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest("this endpoint takes a multipart/form-data body with a 'model' field")
    return boundary


class FormModelScanner:
    """Fed the body so far (like body.ModelScanner); `done` once the `model` field has ended,
    `model` its value, `span` where that value lies in the body."""

    def __init__(self, boundary: bytes) -> None:
        self.model: str | None = None
        self.span: tuple[int, int] | None = None
        self.done = False
        self._fed = 0
        self._offset = 0  # where the chunk being written starts in the body
        self._header_field = b""
        self._header_value = b""
        self._in_model = False
        self._value = bytearray()
        self._value_start: int | None = None
        self._models = 0
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._field,
                "on_header_value": self._header,
                "on_header_end": self._header_end,
                "on_part_data": self._data,
                "on_part_end": self._part_end,
            },
        )

    def feed(self, buf: bytes | bytearray) -> None:
        """Parse what arrived since the last call."""
        chunk = bytes(buf[self._fed :])
        self._offset, self._fed = self._fed, len(buf)
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise InvalidRequest(f"the multipart body is malformed: {exc}") from None

    def finish(self) -> str:
        """After the whole body was fed: its one `model` value, or a 400."""
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise InvalidRequest(f"the multipart body is malformed: {exc}") from None
        if self._models > 1:
            raise InvalidRequest("the form names 'model' more than once")
        if self.model is None:
            raise InvalidRequest("the form has no 'model' field")
        return self.model

    # ----- parser callbacks -----

    def _part_begin(self) -> None:
        self._in_model = False
        self._header_field = self._header_value = b""

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            _, options = parse_options_header(self._header_value)
            if options.get(b"name") == b"model":
                self._in_model = True
                self._models += 1
                self._value = bytearray()
                self._value_start = None
        self._header_field = self._header_value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_model:
            return
        if self._value_start is None:
            self._value_start = self._offset + start
        self._value += data[start:end]
        if len(self._value) > MAX_MODEL_BYTES:
            raise InvalidRequest("the form's 'model' field is too long to be a model name")

    def _part_end(self) -> None:
        if not self._in_model:
            return
        self._in_model = False
        if self._models > 1:
            return  # refused by finish()
        try:
            self.model = self._value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("the form's 'model' field is not UTF-8") from None
        start = self._value_start if self._value_start is not None else 0
        self.span = (start, start + len(self._value))
        self.done = True
