"""The rule a model's name (or alias) follows, checked once when the config is loaded.

A name travels far beyond the config: into request bodies, URL paths, log lines, metric labels,
and the HAProxy config and map file `llmux haproxy` writes, where a space splits a map line in
two and a newline starts a config line of its own. One rule here keeps every one of those
places safe without each having to guess what a name may hold.
"""

from __future__ import annotations

# Room for a Hugging Face id (repository names go up to 96 characters) under its owner, with a
# host prefix and a quantization tag, while a name stays short enough to read in a log line,
# a metric label or the list of known models in a 404.
MAX_MODEL_NAME_CHARS = 200


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot name a model, worded for the config's author; None if it can."""
    if not name:
        return "a model name must not be empty"
    if len(name) > MAX_MODEL_NAME_CHARS:
        return f"{name[:40]!r}... is {len(name)} characters long: at most {MAX_MODEL_NAME_CHARS}"
    if "\\" in name:
        return f"{name!r} holds a backslash, which no URL path may (/health/NAME, /v1/models/NAME)"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return (
            f"{name!r} has an empty, . or .. part between slashes, which no URL path may "
            "(/health/NAME, /v1/models/NAME)"
        )
    for char in name:
        if char.isspace():
            return f"{name!r} holds whitespace ({char!r}): a model name is one word"
        if not char.isprintable():
            return f"{name!r} holds a control or unprintable character ({char!r})"
    return None
