"""The configuration reference page, `config.toml.example` and the JSON Schema file, written
from the key declarations (llmux/config.py TABLES), so that what the docs say a key does,
its default and its type are what the parser accepts.

`python -m llmux.config_docs --write` regenerates them; `--check` fails when one is stale
(CI runs it)."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from llmux.config import TABLES
from llmux.config_keys import NON_NEGATIVE, NUMBER, PORT, POSITIVE, UNSET, KeySpec, Table
from llmux.config_schema import schema_text
from llmux.policies.adaptive import AdaptivePolicy

ROOT = Path(__file__).parents[1]
REFERENCE = Path("docs/reference/configuration.md")
EXAMPLE = Path("config.toml.example")
SCHEMA = Path("docs/reference/config.schema.json")

# The keys the example sets in its one model (hooks); every other model key is shown commented.
_EXAMPLE_MODEL_KEYS = ("port", "wake", "sleep", "alive")
_COMMENTED_TABLES = ("groups.NAME", "machine")  # shown, but not in force, in the example


def toml_value(value: Any) -> str:
    """A TOML literal for a declared default or example (strings as JSON, which TOML's basic
    strings read the same)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def type_words(spec: KeySpec) -> str:
    """A key's type as the reference says it: the TOML type and its rule."""
    if spec.choices:
        return " or ".join(toml_value(choice) for choice in spec.choices)
    base = {str: "string", int: "integer", bool: "boolean", list: "array", dict: "table"}
    words = "number" if spec.toml == NUMBER else base[spec.toml]
    if spec.items is not None:
        words = f"array of {base[spec.items]}s"
    rule = {POSITIVE: " > 0", NON_NEGATIVE: " ≥ 0", PORT: " 1-65535"}.get(spec.rule or "", "")
    if spec.min_length:
        rule = f", {spec.min_length}+ characters"
    return words + rule


def _default_words(spec: KeySpec) -> str:
    if spec.note:
        return spec.note
    default = spec.shown_default
    if spec.required and (default is UNSET or default == 0):
        return "required " + spec.required
    if default is UNSET:
        return "unset"
    return f"`{toml_value(default)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def _header(table: Table) -> str:
    return "Top level" if not table.name else f"[{table.name}]"


def reference_text() -> str:
    """docs/reference/configuration.md."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from llmux/config.py by `python -m llmux.config_docs --write`: "
        "edit the declarations there, not this page. -->",
        "",
        "llmux reads one TOML file (`llmux serve -c FILE`; `llmux check -c FILE` checks it and "
        "names every problem at once). Only `[models.NAME]` is required. A commented example "
        "of every key is `config.toml.example` at the top of the repository; this page and "
        "it are generated from the same declarations.",
        "",
        "Editors that read TOML with a JSON Schema (taplo, VS Code's Even Better TOML) can "
        "check the file as you type: `llmux config-schema > llmux.schema.json` and put "
        "`#:schema ./llmux.schema.json` on the config's first line. The schema knows each "
        "key's type and range; rules between keys (hooks or a driver, sizes within a "
        "capacity) are `llmux check`'s.",
        "",
    ]
    for table in TABLES:
        lines += [f"## {_header(table)}", "", table.doc, ""]
        lines += ["| Key | Type | Default | What it does |", "|---|---|---|---|"]
        for spec in table.keys:
            if spec.toml is dict and not table.name:
                continue
            doc = spec.doc + (f" Required {spec.required}." if spec.required else "")
            row = (f"`{spec.name}`", type_words(spec), _default_words(spec), doc)
            lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
        lines.append("")
    lines += [
        "## [policy.options]",
        "",
        "Keyword arguments for the policy class. The default policy, `adaptive`, takes these "
        "(see [Switch policies](../policies.md)):",
        "",
        "| Key | Default |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | `{toml_value(value)}` |" for name, value in _adaptive_options()]
    return "\n".join(lines) + "\n"


def example_text() -> str:
    """config.toml.example: every key, set to its default or shown commented."""
    lines = [
        "# llmux configuration: every key, with its default or (commented) an example.",
        "# Generated from llmux/config.py by `python -m llmux.config_docs --write`; the",
        "# reference is docs/reference/configuration.md. Only [models.NAME] is required.",
        "# Hooks run with `sh -c` in this file's folder, so relative script paths work.",
        "# The hooks of [models.llama] are placeholders: write those scripts (examples/ has",
        "# working ones), or give the model `kind` and `cmd` instead; `llmux check` says",
        "# what is missing.",
    ]
    for table in TABLES:
        lines += _example_table(table)
    return "\n".join(lines) + "\n"


def _example_table(table: Table) -> list[str]:
    commented = table.name in _COMMENTED_TABLES
    mark = "# " if commented else ""
    header = {"models.NAME": "models.llama", "groups.NAME": "groups.gpu0"}.get(
        table.name, table.name
    )
    lines = [""]
    lines += [f"# {line}" for line in _wrap(table.doc)]
    if header:
        lines.append(f"{mark}[{header}]")
    for spec in table.keys:
        if spec.toml is dict:
            continue
        lines += [f"# {line}" for line in _wrap(_example_doc(spec))]
        value, set_here = _example_value(table, spec)
        if value is UNSET:
            continue
        prefix = "" if set_here and not commented else "# "
        lines.append(f"{prefix}{spec.name} = {toml_value(value)}")
    if table.name == "policy":
        lines += ["", "# Keyword arguments for the policy class; adaptive's, at their defaults:"]
        lines.append("[policy.options]")
        lines += [f"{name} = {toml_value(value)}" for name, value in _adaptive_options()]
    return lines


def _example_doc(spec: KeySpec) -> str:
    doc = spec.doc
    if spec.required:
        doc += f" Required {spec.required}."
    if spec.note:
        doc += f" Unset: {spec.note}."
    return doc


def _example_value(table: Table, spec: KeySpec) -> tuple[Any, bool]:
    """The value shown for a key, and whether the example sets it (else it is commented)."""
    if table.name == "models.NAME":
        value = spec.example if spec.example is not UNSET else spec.shown_default
        return value, spec.name in _EXAMPLE_MODEL_KEYS
    if spec.shown_default is not UNSET and spec.shown_default != ():
        return spec.shown_default, True
    return spec.example, False


def _wrap(text: str, width: int = 96) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def _adaptive_options() -> list[tuple[str, Any]]:
    parameters = inspect.signature(AdaptivePolicy.__init__).parameters.values()
    return [
        (p.name, p.default) for p in parameters if p.default not in (inspect.Parameter.empty, None)
    ]


def generated() -> dict[Path, str]:
    """Each generated file (relative to the repository) and the text it must hold."""
    return {REFERENCE: reference_text(), EXAMPLE: example_text(), SCHEMA: schema_text()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the generated files")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated().items():
        target = ROOT / path
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        if args.write:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
        else:
            stale.append(str(path))
    if stale:
        print(
            f"stale: {', '.join(stale)}: run `python -m llmux.config_docs --write`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
