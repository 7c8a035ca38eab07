"""Config keys declared once, as metadata on the dataclass field each one fills: its TOML
type, default, rule and a one-line description. The parser's known-keys and type checks, the
reference page, `config.toml.example` and the JSON Schema are all derived from these
declarations, so none of them can drift from what llmux accepts."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from functools import cached_property
from typing import Any

NUMBER = (int, float)


class _Unset:
    """No value: a key with no default, or none to show as an example."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()

# Rules a value must also meet beyond its type; the parser and the schema both read them.
POSITIVE = "positive"
NON_NEGATIVE = "non_negative"
PORT = "port"


@dataclass(frozen=True)
class KeySpec:
    """One key of one table, as written in the file."""

    name: str
    toml: Any  # the Python type (or tuple of types) a TOML value may have
    default: Any  # UNSET: no default (see `required`)
    doc: str
    rule: str | None = None
    inherited: bool = False  # [defaults] may set it for every model
    example: Any = UNSET  # shown in the example and reference when there is no default
    choices: tuple[Any, ...] = ()
    items: Any = None  # an array's element type
    required: str = ""  # when it must be given, in words ("" : optional)
    min_length: int = 0  # strings: the fewest characters
    note: str = ""  # what the default means when it is computed (None, a factory)

    @property
    def shown_default(self) -> Any:
        """The default as a user would write it, or UNSET when there is none to write (none, or
        one computed when llmux starts, which `note` says in words)."""
        return UNSET if self.default is None or self.note else self.default


def config_key(
    toml: Any,
    default: Any = MISSING,
    doc: str = "",
    *,
    factory: Any = MISSING,
    also: tuple[KeySpec, ...] = (),
    **spec: Any,
) -> Any:
    """A dataclass field that is a config key. `also` declares other spellings that fill the
    same field (a model's `memory_gb` and `size`)."""
    declared = KeySpec("", toml, UNSET, doc, **spec)
    metadata = {"key": declared, "also": also}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def keys_of(cls: type, *, inherited_only: bool = False) -> list[KeySpec]:
    """The keys a dataclass declares, in declaration order, defaults filled in."""
    specs = []
    for f in fields(cls):
        declared = f.metadata.get("key")
        if declared is None:
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = UNSET
        for spec in (declared, *f.metadata["also"]):
            spec = _named(spec, spec.name or f.name, default)
            if spec.inherited or not inherited_only:
                specs.append(spec)
    return specs


def _named(spec: KeySpec, name: str, default: Any) -> KeySpec:
    return replace(spec, name=name, default=default if spec.default is UNSET else spec.default)


@dataclass(frozen=True)
class Table:
    """A table of the file: `name` as written in its header ("" for the top level,
    "models.NAME" for one table per model), the dataclass whose fields declare its keys."""

    name: str
    cls: type
    doc: str
    inherited_only: bool = False  # [defaults]: the model keys every model inherits
    extra: tuple[KeySpec, ...] = ()  # keys that fill no field of `cls` (the sub-tables)

    @cached_property
    def keys(self) -> list[KeySpec]:
        return [*keys_of(self.cls, inherited_only=self.inherited_only), *self.extra]

    @cached_property
    def allowed(self) -> dict[str, Any]:
        """Key name to TOML type: what the known-keys check accepts."""
        return {spec.name: spec.toml for spec in self.keys}
