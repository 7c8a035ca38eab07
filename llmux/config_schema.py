"""The config file's JSON Schema, derived from the key declarations (llmux/config.py TABLES),
for editors that read TOML with a schema (taplo, Even Better TOML: `#:schema FILE`). It is
advisory: rules between keys (hooks or a driver, sizes within a capacity) stay in `llmux
check`, which is the authority."""

from __future__ import annotations

import json
from typing import Any

from llmux.config import TABLES
from llmux.config_keys import NON_NEGATIVE, NUMBER, PORT, POSITIVE, UNSET, KeySpec, Table
from llmux.model_names import MAX_MODEL_NAME_CHARS

# A model name (llmux/model_names.py): no whitespace, control or format characters, no
# backslash, no empty, . or .. part between slashes. The schema is advisory: `llmux check`
# applies the rule itself, and a few unassigned characters pass here.
_CHARS = r"[^\s\\/\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202f\u2060-\u206f\ufeff]"
_PART = rf"(?!\.{{1,2}}(/|$)){_CHARS}+"
MODEL_NAME = {"pattern": rf"^{_PART}(/{_PART})*$", "maxLength": MAX_MODEL_NAME_CHARS}

_JSON_TYPES = {str: "string", int: "integer", bool: "boolean", list: "array", dict: "object"}


def config_schema() -> dict[str, Any]:
    """The whole file: top-level keys, fixed tables, and per-name tables (models, groups)."""
    tables = {table.name: table for table in TABLES}
    properties = _properties(tables[""])
    for spec in tables[""].extra:
        if spec.name in ("models", "groups"):
            named = tables[f"{spec.name}.NAME"]
            properties[spec.name] = {
                "type": "object",
                "description": spec.doc,
                "additionalProperties": _object(named),
            }
            if spec.name == "models":  # printable, no whitespace (llmux/model_names.py)
                properties[spec.name]["propertyNames"] = MODEL_NAME
        else:
            properties[spec.name] = _object(tables[spec.name])
    properties["policy"]["properties"]["options"] |= {"additionalProperties": True}
    aliases = properties["models"]["additionalProperties"]["properties"]["aliases"]
    aliases["items"] |= MODEL_NAME
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "llmux config",
        "description": "llmux's config file (TOML). Advisory: `llmux check` is the authority.",
        "type": "object",
        "properties": properties,
        "required": ["models"],
        "additionalProperties": False,
    }


def schema_text() -> str:
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


def _object(table: Table) -> dict[str, Any]:
    return {
        "type": "object",
        "description": table.doc,
        "properties": _properties(table),
        "additionalProperties": False,
    }


def _properties(table: Table) -> dict[str, Any]:
    return {
        spec.name: _property(spec) for spec in table.keys if spec.toml is not dict or table.name
    }


def _property(spec: KeySpec) -> dict[str, Any]:
    described = spec.doc + (f" Required {spec.required}." if spec.required else "")
    schema: dict[str, Any] = {"description": described}
    if spec.choices:
        schema["enum"] = list(spec.choices)
    elif spec.toml == NUMBER:
        schema["type"] = "number"
    else:
        schema["type"] = _JSON_TYPES[spec.toml]
    if spec.items is not None:
        schema["items"] = {"type": _JSON_TYPES[spec.items]}
    if spec.rule == POSITIVE:
        schema["exclusiveMinimum"] = 0
    elif spec.rule == NON_NEGATIVE:
        schema["minimum"] = 0
    elif spec.rule == PORT:
        schema |= {"minimum": 1, "maximum": 65535}
    if spec.min_length:
        schema["minLength"] = spec.min_length
    default = spec.shown_default
    if default is not UNSET and spec.toml is not dict:
        schema["default"] = list(default) if isinstance(default, tuple) else default
    return schema
