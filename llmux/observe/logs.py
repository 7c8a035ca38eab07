"""Structured log events: every switch, hook run and timeout is one record with a stable name.

`log_event(logger, "switch_started", "a -> b", **fields)` writes a normal log record that carries
`event` and `fields`. The text format shows them as `key=value` pairs after the message; the JSON
format (`--log-format json`, one object per line) puts them at the top level, for log shippers.

Logged text can come from clients (a path, a model name) and from hooks (their stderr): in the
text format every control character (CR, LF, ESC, ...) and every Unicode line or bidi control is
escaped as `\\xNN`/`\\uNNNN`, so no field can start a forged line or repaint the terminal. One
record is one line; only a traceback spans several. JSON escapes them by itself.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

EVENTS = (
    "switch_started",
    "model_activated",
    "switch_failed",
    "switch_cancelled",
    "hook_completed",
    "hook_failed",
    "hook_timeout",
    "request_timeout",
    "model_dead",
    "request",
    "internal_error",
    "config_rejected",
    "config_reloaded",
    "backend_timeout",
    "client_send_timeout",
    "connection_refused",
    "hook_survivor_stopped",
)


# C0 and C1 controls, DEL, Unicode line/paragraph separators and bidirectional overrides.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape: safe on one log line."""
    return _CONTROLS.sub(_escape_one, text)


def _escape_one(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def log_event(
    logger: logging.Logger, event: str, message: str, level: int = logging.INFO, **fields: Any
) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"event": event, "fields": fields})


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        event = getattr(record, "event", None)
        if event is None:
            return line
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in getattr(record, "fields", {}).items())
        return f"{line} [{event}{' ' + pairs if pairs else ''}]"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None),
            "message": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = escape_controls(str(value))
    if text and not any(c in text for c in ' ="'):
        return text
    return '"' + text.replace('"', '\\"') + '"'  # controls are escaped already


# What setup_logging was last given: workers are started with the same (workers/supervisor.py).
current_setup: dict[str, str] = {"level": "info", "format": "text"}


def setup_logging(level: str = "info", log_format: str = "text") -> None:
    current_setup.update(level=level, format=log_format)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # Per-request lines from the upstream client and hypercorn's banner are noise next to ours.
    for noisy in ("httpx", "httpcore", "hypercorn.error"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
